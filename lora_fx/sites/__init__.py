"""Sites: the base ops of a graph that LoRA can adapt, what each kind of site is, and matching."""

from lora_fx.sites.match import all_sites, find_sites, match_modules_to_save
from lora_fx.sites.site import ConvSpec, Site

__all__ = ["ConvSpec", "Site", "all_sites", "find_sites", "match_modules_to_save"]
