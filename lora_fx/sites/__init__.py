"""Sites: the base ops of a graph that LoRA can adapt, what each kind of site is, and matching."""

from lora_fx.sites.match import all_sites, find_sites, match_modules_to_save, pattern_key
from lora_fx.sites.moe_targets import convert_moe_config
from lora_fx.sites.site import ConvSpec, Site

__all__ = [
    "ConvSpec",
    "Site",
    "all_sites",
    "convert_moe_config",
    "find_sites",
    "match_modules_to_save",
    "pattern_key",
]
