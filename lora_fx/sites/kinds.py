"""The table of site kinds: every pass finds a site's kind here (`kind_of`), by its name.

    KINDS = {"mha": MHA, "linear": LINEAR, "conv": CONV, "embedding": EMBEDDING, "param": PARAM,
             "tokens": TOKENS}

Adding a kind: a module beside `linear.py` with its matchers, factor shapes and emitters, one
`SiteKind` entry, its place in `KINDS`, and its tests. Matchers run in table order; the first
match of a node wins: MHA comes first, so the ops reading an MHA's packed in-projection are
claimed by its site rather than taken for linear sites.
"""

from __future__ import annotations

from lora_fx.core.keys import LoraPaths
from lora_fx.sites.conv import CONV
from lora_fx.sites.embedding import EMBEDDING
from lora_fx.sites.kind import SiteKind
from lora_fx.sites.linear import LINEAR
from lora_fx.sites.mha import MHA
from lora_fx.sites.param import PARAM
from lora_fx.sites.site import Site
from lora_fx.sites.tokens import TOKENS

__all__ = ["KINDS", "MATCHERS", "kind_of", "lora_paths"]

KINDS: dict[str, SiteKind] = {
    kind.name: kind for kind in (MHA, LINEAR, CONV, EMBEDDING, PARAM, TOKENS)
}
MATCHERS = tuple(matcher for kind in KINDS.values() for matcher in kind.matchers)


def kind_of(site: Site | str) -> SiteKind:
    """The `SiteKind` of a site (or of a kind name, as adapter records keep it)."""
    return KINDS[site if isinstance(site, str) else site.kind]


def lora_paths(kind: str, site: str, adapter: str) -> LoraPaths:
    """Module-tree paths and PEFT file keys of `adapter`'s tensors on `site` of kind `kind`."""
    return KINDS[kind].paths(site, adapter)
