"""Keys lora_fx writes into `node.meta` / `gm.meta`, and the state record kept on the graph.

Every node a pass creates carries `node.meta[LORA_META] = {"adapter", "site", "role"}` so later
passes find branches without guessing from names. Everything that must last between calls lives
in one `LoraState` at `gm.meta[STATE_META]`: no module-level registries. The last merge's rounding
report is kept apart, at `gm.meta[MERGE_REPORT_META]`: it describes the weights, which keep the
merge after `unload` drops the state (`merge_and_unload`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_fx.errors import AdapterError, NotAGraphModuleError

if TYPE_CHECKING:
    import torch.fx

    from lora_fx.config import LoraConfig

__all__ = [
    "CAPTURE_META",
    "CHECKPOINT_META",
    "INPUT_GRAD_META",
    "LORA_META",
    "MERGE_REPORT_META",
    "ROLES",
    "STATE_META",
    "AdapterRecord",
    "ArrowRoute",
    "LoraState",
    "SiteRecord",
    "get_state",
    "lora_tag",
    "require_flat",
    "require_graph_module",
    "require_no_arrow",
    "require_no_tokens",
    "require_state",
    "resolve_adapters",
    "state_or_none",
]

LORA_META = "lora_fx"
STATE_META = "lora_fx"
CAPTURE_META = "lora_fx_capture"
# Block paths `checkpoint_blocks` outlined (absent when the graph is flat).
CHECKPOINT_META = "lora_fx_checkpointed"
MERGE_REPORT_META = "lora_fx_merge_report"
# On the `requires_grad_` node prepare_for_kbit_training puts after an input embedding.
INPUT_GRAD_META = "lora_fx_input_requires_grad"

# Roles of nodes in a branch: y' = add(y, scale * lora_b(lora_a(dropout(x))))
# "cast": dtype casts around a float32 adapter on a half-precision site (autocast_adapter_dtype).
# "dora": DoRA's weight norm and magnitude rescaling (use_dora=True).
# "route": an Arrow router's per-token expert coefficients (arrow_config).
ROLES = ("dropout", "lora_a", "lora_b", "scale", "add", "weight", "mask", "cast", "dora", "route")


@dataclass(frozen=True)
class ArrowRoute:
    """What an Arrow router routes among on one site: its experts, their scales, top_k, T."""

    experts: tuple[str, ...]
    scales: tuple[float, ...]
    top_k: int
    temperature: float


@dataclass
class SiteRecord:
    """What one adapter put on one site: enough to rebuild its branch or fold it."""

    kind: str
    r: int
    lora_alpha: float
    scale: float
    dropout: float
    lora_bias: bool
    use_dora: bool = False
    use_kasa: bool = False  # KaSA: `lora_diag` between A and B, base weight truncated
    block_diagonal: str = ""  # BD-LoRA: "a" or "b", the factor stored as `nblocks` blocks
    nblocks: int = 1
    # VeLoRA: (num_groups, scale, init_type); None: A's gradient is exact
    velora: tuple[int, float, str] | None = None
    alora: bool = False  # aLoRA: the branch acts from the invocation tokens on (`_alora.py`)
    qalora_group_size: int = 0  # QALoRA: A reads x averaged over groups this wide; 0: off
    monteclora: int = 0  # MonteCLoRA: the number of samples averaged into A; 0: off
    rows: tuple[int, ...] = ()  # trainable tokens: the embedding rows the adapter replaces
    arrow: ArrowRoute | None = None  # an Arrow router: its branch mixes the experts per token

    @classmethod
    def from_config(cls, cfg: LoraConfig, site: str, kind: str) -> SiteRecord:
        """Rank, alpha and scale for `site` after the config's rank / alpha patterns."""
        return cls(
            kind,
            cfg.rank_for(site),
            cfg.alpha_for(site),
            cfg.scale_for(site),
            float(cfg.lora_dropout),
            bool(cfg.lora_bias),
            bool(cfg.use_dora),
            cfg.kasa_config is not None,
            cfg.bdlora_side(site),
            cfg.use_bdlora["nblocks"] if cfg.use_bdlora else 1,
            velora=_velora_triple(cfg.velora_config),
            alora=cfg.alora_invocation_tokens is not None,
            qalora_group_size=cfg.qalora_group_size if cfg.use_qalora else 0,
            monteclora=cfg.monteclora_config["num_samples"] if cfg.monteclora_config else 0,
        )

    @property
    def variant(self) -> str | None:
        """The LoRA variant's name for messages (None: plain LoRA)."""
        names = {
            "DoRA": self.use_dora,
            "KaSA": self.use_kasa,
            "BD-LoRA": bool(self.block_diagonal),
            "VeLoRA": self.velora is not None,
            "aLoRA": self.alora,
            "an Arrow router": self.arrow is not None,
            "QALoRA": bool(self.qalora_group_size),
            "MonteCLoRA": bool(self.monteclora),
        }
        return next((name for name, used in names.items() if used), None)


def _velora_triple(velora: dict | None) -> tuple[int, float, str] | None:
    """`velora_config` as the record keeps it: (num_groups, scale, init_type)."""
    if velora is None:
        return None
    return velora["num_groups"], float(velora["scale"]), velora["init_type"]


@dataclass
class AdapterRecord:
    """One named adapter: its config, its sites and where its `modules_to_save` copies are."""

    config: LoraConfig
    sites: dict[str, SiteRecord]
    modules_to_save: list[str] = field(default_factory=list)
    merged: bool = False


@dataclass
class LoraState:
    """The adapters on a graph, which are active, and what merged adapters need to unmerge."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    owned_modules: set[str] = field(default_factory=set)
    # Mixed-batch mode (None: normal mode): the slot table, one adapter name (None: free) per slot
    # of the stacks that batch rows gather from (`passes/_gather.py`); its length is the capacity.
    batch_adapters: list[str | None] | None = None
    # Mixed batch set in training mode (stacks built in the graph from the adapters' parameters).
    batch_training: bool = False
    # Rank every site's stacks are padded to at least (room for adapters loaded later).
    batch_rank: int | None = None
    # The layout key the mixed-batch graph was built for (`_gather.layout_key`).
    batch_key: tuple | None = None
    # What each fold needs to undo itself, by (adapter, site), in fold order (a DoRA weight norm,
    # a quantized weight before the merge; None for a plain fold). Unmerge walks it backwards.
    merge_undo: dict[tuple[str, str], Any] = field(default_factory=dict)
    # How branches are laid out: "auto" | "fused" | "plain" | "weight" (`set_layout`,
    # `_branch.py` rule 7).
    layout: str = "auto"


def require_graph_module(gm: Any) -> None:
    """Refuse anything but a GraphModule, saying what to call instead of `AttributeError: meta`."""
    import torch.fx

    if isinstance(gm, torch.fx.GraphModule):
        return
    import torch.export

    if isinstance(gm, torch.export.ExportedProgram):
        raise NotAGraphModuleError(
            "got a torch.export.ExportedProgram; lora_fx passes work on the GraphModule that "
            "lora_fx.capture returns: call lora_fx.capture(model, args), or pass the program to "
            "lora_fx.inject (or load_adapter), which accepts it, and use the GraphModule it returns"
        )
    raise NotAGraphModuleError(
        f"expected a torch.fx.GraphModule from lora_fx.capture, got {type(gm).__name__}; "
        "capture the model first: gm = lora_fx.capture(model, args)"
    )


def state_or_none(gm: torch.fx.GraphModule) -> LoraState | None:
    """The graph's LoRA state, or None if nothing was injected.

    Raises:
        NotAGraphModuleError: `gm` is an `nn.Module` or `ExportedProgram`, not a captured graph.
    """
    require_graph_module(gm)
    return gm.meta.get(STATE_META)


def get_state(gm: torch.fx.GraphModule) -> LoraState:
    """The graph's LoRA state, created empty on first use."""
    require_graph_module(gm)
    state = gm.meta.get(STATE_META)
    if state is None:
        state = gm.meta[STATE_META] = LoraState()
    return state


def lora_tag(node: torch.fx.Node) -> dict[str, Any] | None:
    """The lora_fx tag of a node, or None for nodes lora_fx did not create."""
    return node.meta.get(LORA_META)


def require_flat(gm: torch.fx.GraphModule) -> None:
    """Refuse LoRA passes on a checkpointed graph: its blocks' nodes live in submodules."""
    blocks = gm.meta.get(CHECKPOINT_META)
    if blocks:
        raise AdapterError(
            f"the graph has {len(blocks)} checkpointed blocks (e.g. {blocks[0]!r}); call "
            "lora_fx.uncheckpoint_blocks(gm) first, and checkpoint_blocks(gm) again afterwards"
        )


def require_state(gm: torch.fx.GraphModule) -> LoraState:
    """The LoRA state, or a clear error when nothing was injected."""
    state = state_or_none(gm)
    if state is None or not state.adapters:
        raise AdapterError("this graph has no LoRA adapter; call lora_fx.inject(gm, cfg) first")
    require_flat(gm)
    return state


def require_no_tokens(state: LoraState, names: Iterable[str], action: str) -> None:
    """Refuse `action` on adapters with trainable tokens (their rows are not low-rank factors)."""
    with_tokens = [n for n in names if state.adapters[n].config.trainable_token_indices]
    if with_tokens:
        raise AdapterError(
            f"{action} does not support adapters with trainable_token_indices: {with_tokens}; "
            "their embedding rows are replaced, not low-rank factors"
        )


def require_no_arrow(
    state: LoraState, names: Iterable[str], action: str, error: type[Exception] = AdapterError
) -> None:
    """Refuse `action` on Arrow routers: per-token routing has no single low-rank delta (PEFT)."""
    routers = [n for n in names if state.adapters[n].config.arrow_config is not None]
    if routers:
        raise error(
            f"{action} does not support Arrow router adapters {routers}: each token mixes its "
            "own top-k experts, so there is no single B @ A; delete or deactivate the router first"
        )


def resolve_adapters(state: LoraState, adapter_names: Iterable[str] | None) -> list[str]:
    """Adapter names to act on (default: the active ones), checked against the known ones."""
    if adapter_names is None:
        return list(state.active)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise AdapterError(
            f"unknown adapter(s) {unknown}; adapters on this graph: {list(state.adapters)}"
        )
    return names
