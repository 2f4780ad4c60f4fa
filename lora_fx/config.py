"""`LoraConfig`: PEFT's LoRA fields, names and defaults, validated on construction.

`from_dict` reads a PEFT `adapter_config.json` dict: known fields become attributes, every other
key is kept in `extra` and written back by `to_dict`, so a config PEFT wrote round-trips without
loss and never crashes on keys lora_fx does not use.

Every field is type-checked in `__post_init__`, so a config read from a file gets exactly the
checks of a `LoraConfig(...)` call (`"use_rslora": "false"` is refused, not read as true); its
errors name the file. Patterns are checked here and matched by `lora_fx.patterns`, which never
backtracks: a pattern from a downloaded file cannot hang a load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from lora_fx import patterns
from lora_fx.errors import ConfigError, ReplicationError

__all__ = [
    "DUMMY_TARGET_MODULES",
    "ArrowConfig",
    "BdLoraConfig",
    "CordaConfig",
    "EvaConfig",
    "KasaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "MontecloraConfig",
    "VeloraConfig",
    "read_config_file",
]

_BIAS_MODES = ("none", "all", "lora_only")
_VELORA_INITS = ("batch_average", "batch_average_once", "random")
# and "pissa_niter_<K>"
_INITS = (
    *(True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq", "mica", "eva", "corda"),
    "lora_ga",
)
_PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d*")
_LOFTQ_BITS = (4, 8)
ALL_LINEAR = "all-linear"
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
_BOOLS = (
    "fan_in_fan_out",
    "use_rslora",
    "lora_bias",
    "use_dora",
    "inference_mode",
    "ensure_weight_tying",
)
_OPTIONAL_STRS = ("task_type", "base_model_name_or_path", "revision", "megatron_core")
# PEFT's `target_modules` value for an adapter with no LoRA module (trainable tokens alone).
DUMMY_TARGET_MODULES = "dummy-target-modules"


@dataclass
class LoftQConfig:
    """PEFT's `LoftQConfig`: quantization bits and alternating steps of the LoftQ initialisation.

    Args:
        loftq_bits: 4 (NF4, bitsandbytes' code book) or 8 (int8, row-wise absmax).
        loftq_iter: Alternating quantize / SVD steps (>= 1).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class EvaConfig:
    """PEFT's `EvaConfig`: how `lora_fx.initialize_eva` measures inputs and shares ranks.

    Args:
        rho: Each site may get up to `round(r * rho)` ranks (>= 1; 1: no redistribution).
        tau: A component has converged when its cosine similarity to the previous batch's is
            at least `tau` (in [0, 1]).
        use_label_mask: Leave out tokens whose `labels` equal `label_mask_value`.
        label_mask_value: The label of ignored tokens.
        whiten: Divide each component by the square root of its singular value.
        adjust_scaling_factors: Scale a site's alpha by `new_rank / r`, so its scale stays.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


@dataclass
class CordaConfig:
    """PEFT's `CordaConfig`: how `lora_fx.initialize_corda` builds A and B from input covariances.

    Args:
        cache_file: PEFT's SVD cache file (kept for PEFT's files; `initialize_corda` refuses it).
        covariance_file: PEFT's covariance file (kept for PEFT's files; refused likewise).
        corda_method: `"ipm"` (instruction-previewed: the adapter takes the r *largest*
            covariance-oriented singular directions) or `"kpm"` (knowledge-preserved: the r
            *smallest*; the largest stay in the base weight).
        verbose: PEFT's progress bar (unused).
        use_float16_for_covariance: Keep the inputs' own dtype for the covariance (PEFT's name:
            no float32 up-cast).
        prune_temporary_fields: PEFT's clean-up flag (unused: lora_fx keeps no fields).
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True


@dataclass
class LoraGAConfig:
    """PEFT's `LoraGAConfig`: how `lora_fx.initialize_lora_ga` builds A and B from gradients.

    Args:
        direction: Which of the gradient's top 2r singular directions go to A and B: `"ArB2r"`
            (A the first r, B the next r), `"A2rBr"` (the reverse), `"ArBr"` (alternating) or
            `"random"` (r of the 2r, drawn with `torch.randperm`).
        scale: `"stable"` (B times `out ** 0.25 / sqrt(stable_gamma)`), `"weight_svd"` (B
            scaled to the weight's top singular value), `"gd_scale"` (A and B divided by the
            branch's scale) or `"unit"`.
        stable_gamma: The gamma of `"stable"`.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16


@dataclass
class KasaConfig:
    """PEFT's `KasaConfig`: KaSA's regulariser weights (the variant itself needs no option).

    Args:
        beta: Weight of the L2 penalty `sum(lora_diag ** 2)` (KaSA paper Eq. 9-10), >= 0.
        gamma: Weight of the orthogonality penalty `||B^T B - I|| + ||A A^T - I||` (Eq. 11), >= 0.
    """

    beta: float = 1e-4
    gamma: float = 1e-3


@dataclass
class MontecloraConfig:
    """PEFT's `MontecloraConfig`: MonteCLoRA's Monte Carlo averaged A in training.

    Args:
        num_samples: Perturbed copies of A averaged per training forward, a positive int.
        use_entropy: Add the sample weights' squared sum to the variational loss.
        dirichlet_prior: Concentration of the Dirichlet prior on the sample weights, > 0.
        sample_scaler: Factor on the sampled perturbations.
        kl_loss_weight: Factor on the KL terms of the variational loss.
        buffer_size: Draws taken from the global RNG at once (PEFT's buffer), a positive int.
    """

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150


@dataclass
class VeloraConfig:
    """PEFT's `VeloraConfig`: VeLoRA's compressed input activations for A's gradient.

    Args:
        num_groups: Groups the input features are split into; each token keeps one number per
            group (more groups: a closer gradient, more memory), a positive int.
        scale: Factor on the rebuilt activations in the backward, > 0.
        init_type: How the projection is set: "batch_average" (every training forward),
            "batch_average_once" (the first) or "random" (once, at inject).
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"


@dataclass
class ArrowConfig:
    """PEFT's `ArrowConfig`: per-token routing among LoRA experts (Arrow), optionally GenKnowSub.

    Args:
        top_k: Experts mixed per token (at most the number of task experts).
        router_temperature: Softmax temperature of the routing coefficients, > 0.
        use_gks: GenKnowSub: subtract the mean of the general adapters' A and B from every
            task expert's A and B before routing.
        task_adapter_names: The experts; None: every adapter but the router and the general
            ones (PEFT sets them in `create_arrow_model`: `task_0`, `task_1`, ...).
        gks_adapter_names: The general adapters; None: those named `gks_<i>` (PEFT's names).
        rng_seed: Seed of the power iteration's start vector (None: the global generator).
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: list[str] | None = None
    gks_adapter_names: list[str] | None = None
    rng_seed: int | None = None


@dataclass
class BdLoraConfig:
    """PEFT's `BdLoraConfig`: which linear sites get a block-diagonal A or B (BD-LoRA).

    Args:
        target_modules_bd_a: Sites whose A is block-diagonal (row-sharded layers: out / down
            projections). PEFT's rule, kept: a pattern matches when it is a *substring* of the
            site name (`pattern in name`), not by the dotted-suffix rule of `target_modules`.
        target_modules_bd_b: Sites whose B is block-diagonal (column-sharded layers: q / k / v,
            up / gate projections); matched the same way.
        nblocks: Blocks per block-diagonal factor (the tensor-parallel degree when serving).
        match_strict: Every targeted site must match one of the two lists.
    """

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True


@dataclass
class LoraConfig:
    r"""LoRA hyper-parameters with PEFT's field names and defaults.

    Args:
        r: Rank of the update `B @ A`.
        lora_alpha: Scale numerator: a branch is scaled by `lora_alpha / r` (`/ sqrt(r)`: rsLoRA).
        target_modules: Sites to adapt. A list entry matches a site name exactly or as a dotted
            suffix;
            a str is a regex that must match the whole name; `"all-linear"` takes every linear site
            except a transformers model's output layer.
        exclude_modules: Same matching rules as `target_modules`; matched sites are skipped.
        lora_dropout: Dropout probability on the branch input (linear and conv sites).
        fan_in_fan_out: PEFT's flag for weights stored `[in, out]`; lora_fx reads it from the graph.
        bias: Which biases train: `"none"`, `"all"`, or `"lora_only"` (biases of adapted sites).
        use_rslora: Scale by `lora_alpha / sqrt(r)`.
        modules_to_save: Modules (matched by name suffix) that get a trainable, saved copy.
        init_lora_weights: `True` (kaiming-uniform A, zero B), `"gaussian"`, `False` (both random),
            or an initialisation from the base weight (linear sites only): `"pissa"`,
            `"pissa_niter_<K>"`, `"olora"` and `"loftq"` **change the base weight** so that
            base + adapter reproduces it; `"orthogonal"` leaves it as is (`B @ A = 0`), as does
            `"mica"` (B: the weight's r minor left singular vectors, frozen; A = 0).
        layers_to_transform: Layer indices to adapt (with a list `target_modules`).
        layers_pattern: Name(s) of the layer container used to find the layer index.
        rank_pattern: `{pattern: r}` overrides, matched as `(.*\\.)?pattern$`.
        alpha_pattern: `{pattern: alpha}` overrides, matched the same way.
        lora_bias: Give B a trainable bias (folded into the base bias on merge).
        use_dora: DoRA: rescale each output channel by a trained magnitude over the weight norm.
        target_parameters: Parameters (`module.param`, matched exactly or as a dotted suffix) that
            get LoRA wherever the graph reads them, e.g. MoE expert weights `[experts, in, out]`.
        loftq_config: `LoftQConfig` (or its dict) for `init_lora_weights="loftq"`.
        kasa_config: `KasaConfig` (or its dict): KaSA on linear sites. Injecting **truncates the
            base weight** to rank `min(in, out) - r` (its r smallest singular directions go)
            and the delta becomes `scale * B @ diag(lora_diag) @ A`.
        velora_config: `VeloraConfig` (or its dict): VeLoRA on linear sites. Outputs are plain
            LoRA's; in training A's gradient is rebuilt from a per-site projection buffer.
        arrow_config: `ArrowConfig` (or its dict): the config of an Arrow router adapter, which
            routes each token among the task experts (`lora_fx.create_arrow_model`).
        use_bdlora: `BdLoraConfig` (or its dict): BD-LoRA, a block-diagonal A or B per site.
        alora_invocation_tokens: aLoRA (PEFT's Activated LoRA): the token ids that invoke the
            adapter. A row is adapted only from the start of the last occurrence of these ids
            on (`lora_fx.set_alora_offsets`); earlier positions, and rows without them, compute
            exactly the base model, so the base model's KV cache for the prefix can be reused.
            Linear sites only; no merge.
        use_qalora: QALoRA on linear sites (dense or bitsandbytes; PEFT: GPTQ only): A reads the
            input averaged over groups of `qalora_group_size` features, times `in / group_size`.
        qalora_group_size: Input features per QALoRA group; must divide each site's in_features.
        monteclora_config: `MontecloraConfig` (or its dict): MonteCLoRA on linear sites. In
            training A is averaged over sampled perturbations; eval and merges are plain LoRA's.
        eva_config: `EvaConfig` (or its dict) for `init_lora_weights="eva"`
            (`lora_fx.initialize_eva`).
        corda_config: `CordaConfig` (or its dict) for `init_lora_weights="corda"`
            (`lora_fx.initialize_corda`, which **changes the base weight**).
        lora_ga_config: `LoraGAConfig` (or its dict) for `init_lora_weights="lora_ga"`
            (`lora_fx.initialize_lora_ga`, which **changes the base weight**).
        trainable_token_indices: Rows of an embedding that train in full (PEFT's trainable
            tokens): a list of token ids for the input embedding, or `{embedding name: ids}`.
            A tied output layer (`tie_word_embeddings`) reads the same new rows.
        ensure_weight_tying: PEFT's flag: tied layers given different token indices raise
            instead of being adapted apart; warns when the model has no tied weights.
        megatron_config: PEFT's Megatron `TransformerConfig` arguments; kept in files, unused
            (one process: tensor parallelism is left to torch's DTensor).
        megatron_core: PEFT's Megatron module name; kept in files, unused.
        runtime_config: PEFT's `LoraRuntimeConfig` (`ephemeral_gpu_offload`); kept in memory,
            never written to files (PEFT neither writes nor reads it there).
        extra: Every other `adapter_config.json` key, kept as read.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False
    layer_replication: list[list[int]] | None = None
    target_parameters: list[str] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    kasa_config: dict[str, float] | None = None
    use_bdlora: dict[str, Any] | None = None
    velora_config: dict[str, Any] | None = None
    arrow_config: dict[str, Any] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict[str, Any] | None = None
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    runtime_config: dict[str, Any] = field(
        default_factory=lambda: {"ephemeral_gpu_offload": False}, repr=False
    )
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Normalise containers and reject values PEFT would reject (and a few it lets through)."""
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self._check_types()
        self._check_peft_extras()
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        _check_rank("r", self.r)
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        _check_number("lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            _check_number(f"alpha_pattern[{key!r}]", alpha)
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not (
            isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0
        ):
            raise ConfigError(f"lora_dropout={dropout!r} is invalid; expected a float in [0, 1)")
        if self.bias not in _BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} is invalid; expected one of {list(_BIAS_MODES)}")
        self._check_variants()
        self._check_patterns()
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError(
                "layers_pattern is only used with layers_to_transform; set both or neither"
            )
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(
                "layers_to_transform needs target_modules as a list of names (as in PEFT), "
                f"got the regex {self.target_modules!r}"
            )

    def _check_types(self) -> None:
        """The JSON type of every field, so a file gets the checks a call gets."""
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is invalid; expected true or false (a bool)"
                )
        for name in _OPTIONAL_STRS:
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; expected a str")
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern)
        _check_names("modules_to_save", self.modules_to_save, regex=False)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, dict) or not all(isinstance(k, str) for k in value)
            ):
                raise ConfigError(
                    f"{name}={value!r} is invalid; expected a dict of {{pattern: value}}"
                )
        if not isinstance(self.loftq_config, (dict, LoftQConfig, type(None))):
            raise ConfigError(
                f"loftq_config={self.loftq_config!r} is invalid; expected a dict or LoftQConfig"
            )
        layers = self.layers_to_transform
        if not (
            layers is None
            or _is_int(layers)
            or (isinstance(layers, list) and all(_is_int(v) for v in layers))
        ):
            raise ConfigError(
                f"layers_to_transform={layers!r} is invalid; expected a layer index or a list "
                "of them"
            )
        ranges = self.layer_replication
        if ranges is not None and not (
            isinstance(ranges, (list, tuple))
            and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) for v in p)
                for p in ranges
            )
        ):
            raise ReplicationError(
                f"layer_replication={ranges!r} is invalid; expected a list of [start, end) pairs "
                "of layer indices, e.g. [[0, 4], [2, 5]]"
            )

    def _check_peft_extras(self) -> None:
        """trainable_token_indices, megatron_config and runtime_config: types and duplicates."""
        tokens = self.trainable_token_indices
        if tokens is not None:
            named = tokens if isinstance(tokens, dict) else {"": tokens}
            for name, ids in named.items():
                where = f"trainable_token_indices[{name!r}]" if name else "trainable_token_indices"
                if not isinstance(name, str) or not (
                    isinstance(ids, (list, tuple)) and all(_is_int(i) for i in ids)
                ):
                    raise ConfigError(
                        f"trainable_token_indices={tokens!r} is invalid; expected a list of token "
                        "ids or a dict {embedding name: [ids]}"
                    )
                if not ids:
                    raise ConfigError(f"{where}=[] selects no token; give at least one id")
                repeated = sorted({i for i in ids if list(ids).count(i) > 1})
                if repeated:
                    raise ConfigError(
                        f"{where} repeats token ids {repeated}; each id may appear once (PEFT "
                        "accepts repeats, and which value a repeated row takes is then undefined)"
                    )
                if min(ids) < 0:
                    raise ConfigError(
                        f"{where} has negative token ids {[i for i in ids if i < 0]}; ids count "
                        "from 0"
                    )
            if isinstance(tokens, dict):
                self.trainable_token_indices = {k: list(v) for k, v in tokens.items()}
            else:
                self.trainable_token_indices = list(tokens)
        if not isinstance(self.megatron_config, (dict, type(None))):
            raise ConfigError(
                f"megatron_config={self.megatron_config!r} is invalid; expected a dict or None"
            )
        if self.use_dora and self.megatron_config:
            raise ConfigError("use_dora=True is not supported with megatron_config (as in PEFT)")
        runtime = self.runtime_config
        if dataclasses.is_dataclass(runtime) and not isinstance(runtime, type):
            runtime = dataclasses.asdict(runtime)  # PEFT's LoraRuntimeConfig
        if not isinstance(runtime, dict):
            raise ConfigError(
                f"runtime_config={runtime!r} is invalid; expected a dict such as "
                "{'ephemeral_gpu_offload': False} or PEFT's LoraRuntimeConfig"
            )
        self.runtime_config = {"ephemeral_gpu_offload": False, **runtime}

    def _check_patterns(self) -> None:
        """Every regex compiles for `lora_fx.patterns` (no backreferences), named by field."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                patterns.check_pattern(value, field=name)
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                patterns.check_pattern(key, field=f"{name} key")
        layers = self.layers_pattern
        for pattern in [layers] if isinstance(layers, str) else layers or ():
            patterns.check_pattern(pattern, field="layers_pattern")
        for pattern in self.modules_to_save or ():
            patterns.check_pattern(pattern, field="modules_to_save")

    def _check_variants(self) -> None:
        """init_lora_weights, loftq_config, use_dora, lora_bias and target_parameters together."""
        init = self.init_lora_weights
        known = isinstance(init, (bool, str)) and init in _INITS
        if not known and not (isinstance(init, str) and _PISSA_NITER.fullmatch(init)):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; expected one of {list(_INITS)} "
                "or 'pissa_niter_<K>'"
            )
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        self.loftq_config = dict(self.loftq_config or {})
        if init == "loftq":
            if not self.loftq_config:
                raise ConfigError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4)"
                )
            bits = self.loftq_config.get("loftq_bits", 4)
            steps = self.loftq_config.get("loftq_iter", 1)
            if bits not in _LOFTQ_BITS:
                raise ConfigError(f"loftq_bits={bits!r} is not supported; expected one of [4, 8]")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"loftq_iter={steps!r} is invalid; expected an integer >= 1")
            self.loftq_config = {"loftq_bits": bits, "loftq_iter": steps}
        elif self.loftq_config:
            warnings.warn(
                "loftq_config is ignored unless init_lora_weights='loftq' (as in PEFT)",
                stacklevel=3,
            )
            self.loftq_config = {}
        self._check_kasa()
        self._check_bdlora()
        self._check_velora()
        self._check_arrow()
        self._check_alora()
        self._check_qalora()
        self._check_monteclora()
        self._check_eva()
        self._check_corda()
        self._check_lora_ga()
        if self.lora_bias and init not in (True, False):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights=True or False, got {init!r} (as in PEFT)"
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True is not supported with use_dora=True (as in PEFT)")
        if self.target_parameters is not None and (
            not isinstance(self.target_parameters, list)
            or not all(isinstance(t, str) for t in self.target_parameters)
        ):
            raise ConfigError(
                f"target_parameters={self.target_parameters!r} is invalid; "
                "expected a list of parameter names such as ['experts.gate_up_proj']"
            )

    def _check_eva(self) -> None:
        """eva_config: PEFT's defaults filled in, rho >= 1, tau in [0, 1]; used only with 'eva'."""
        eva = self.eva_config
        if self.init_lora_weights != "eva":
            if eva is not None:
                warnings.warn(
                    "eva_config is ignored unless init_lora_weights='eva' (as in PEFT)",
                    stacklevel=4,
                )
            return
        if eva is None:
            warnings.warn(
                "init_lora_weights='eva' without eva_config: using EvaConfig() (as PEFT)",
                stacklevel=4,
            )
        if isinstance(eva, EvaConfig):
            eva = dataclasses.asdict(eva)
        if not isinstance(eva, (dict, type(None))):
            raise ConfigError(
                f"eva_config={eva!r} is invalid; expected an EvaConfig, a dict or None"
            )
        # PEFT drops unknown keys of a sub-config read from a file
        eva = {k: (eva or {}).get(k, v) for k, v in dataclasses.asdict(EvaConfig()).items()}
        for name in ("rho", "tau"):
            if isinstance(eva[name], bool) or not isinstance(eva[name], (int, float)):
                raise ConfigError(f"eva_config {name}={eva[name]!r} is invalid; expected a number")
        if not eva["rho"] >= 1.0:
            raise ConfigError(f"eva_config rho={eva['rho']!r} is invalid; expected rho >= 1.0")
        if not 0.0 <= eva["tau"] <= 1.0:
            raise ConfigError(f"eva_config tau={eva['tau']!r} is invalid; expected 0 <= tau <= 1")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(eva[name], bool):
                raise ConfigError(f"eva_config {name}={eva[name]!r} is invalid; expected a bool")
        if not _is_int(eva["label_mask_value"]):
            raise ConfigError(
                f"eva_config label_mask_value={eva['label_mask_value']!r} is invalid; expected "
                "an int"
            )
        self.eva_config = eva

    def _check_corda(self) -> None:
        """corda_config: PEFT's defaults filled in, a known method; used only with 'corda'."""
        corda = self._init_sub_config("corda", "corda_config", CordaConfig)
        if corda is None:
            return
        if corda["corda_method"] not in ("ipm", "kpm"):
            raise ConfigError(
                f"corda_config corda_method={corda['corda_method']!r} is invalid; expected "
                "'ipm' or 'kpm'"
            )
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            if not isinstance(corda[name], bool):
                raise ConfigError(
                    f"corda_config {name}={corda[name]!r} is invalid; expected a bool"
                )
        for name in ("cache_file", "covariance_file"):
            if not isinstance(corda[name], (str, type(None))):
                raise ConfigError(
                    f"corda_config {name}={corda[name]!r} is invalid; expected a path or None"
                )
        self.corda_config = corda

    def _check_lora_ga(self) -> None:
        """lora_ga_config: PEFT's defaults filled in, known options; used only with 'lora_ga'."""
        ga = self._init_sub_config("lora_ga", "lora_ga_config", LoraGAConfig)
        if ga is None:
            return
        known = {"direction": LORA_GA_DIRECTIONS, "scale": LORA_GA_SCALES}
        for name, values in known.items():
            if ga[name] not in values:
                raise ConfigError(
                    f"lora_ga_config {name}={ga[name]!r} is invalid; expected one of {list(values)}"
                )
        if not _is_int(ga["stable_gamma"]) or ga["stable_gamma"] <= 0:
            raise ConfigError(
                f"lora_ga_config stable_gamma={ga['stable_gamma']!r} is invalid; expected a "
                "positive int"
            )
        self.lora_ga_config = ga

    def _init_sub_config(self, init: str, name: str, cls: type) -> dict[str, Any] | None:
        """The sub-config `name` of a data-driven init as a dict, or None without that init."""
        value = getattr(self, name)
        if self.init_lora_weights != init:
            if value is not None:
                warnings.warn(
                    f"{name} is ignored unless init_lora_weights={init!r} (as in PEFT)",
                    stacklevel=5,
                )
            return None
        if value is None:
            warnings.warn(
                f"init_lora_weights={init!r} without {name}: using {cls.__name__}() (as PEFT)",
                stacklevel=5,
            )
        return _sub_config(name, value or {}, cls)

    def _check_kasa(self) -> None:
        """kasa_config: a dict / KasaConfig of non-negative numbers; not with DoRA or base inits."""
        kasa = _sub_config("kasa_config", self.kasa_config, KasaConfig)
        if kasa is None:
            return
        for name, value in kasa.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(
                    f"kasa_config {name}={value!r} is invalid; expected a number >= 0"
                )
        self.kasa_config = kasa
        if self.use_dora:
            raise ConfigError("kasa_config is not supported with use_dora=True (one variant each)")
        init = self.init_lora_weights
        if isinstance(init, str) and init != "gaussian":
            raise ConfigError(
                f"kasa_config needs init_lora_weights=True, False or 'gaussian', got {init!r}: "
                "KaSA truncates the base weight itself"
            )

    def _check_velora(self) -> None:
        """velora_config: PEFT's VeloraConfig checks; not with another variant."""
        velora = _sub_config("velora_config", self.velora_config, VeloraConfig)
        if velora is None:
            return
        groups, scale, init_type = velora["num_groups"], velora["scale"], velora["init_type"]
        if not _is_int(groups) or groups <= 0:
            raise ConfigError(
                f"velora_config num_groups={groups!r} is invalid; expected a positive integer"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"velora_config scale={scale!r} is invalid; expected a number > 0")
        if init_type not in _VELORA_INITS:
            raise ConfigError(
                f"velora_config init_type={init_type!r} is invalid; expected one of "
                f"{list(_VELORA_INITS)}"
            )
        self.velora_config = velora
        self._one_variant("velora_config", ("use_dora", "kasa_config", "use_bdlora"))

    def _check_arrow(self) -> None:
        """arrow_config: PEFT's ArrowConfig checks, name lists; a plain-LoRA router."""
        arrow = _sub_config("arrow_config", self.arrow_config, ArrowConfig)
        if arrow is None:
            return
        top_k, temperature, seed = arrow["top_k"], arrow["router_temperature"], arrow["rng_seed"]
        if not _is_int(top_k) or top_k <= 0:
            raise ConfigError(f"arrow_config top_k={top_k!r} is invalid; expected an integer >= 1")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            temperature = None
        if temperature is None or not temperature > 0:
            raise ConfigError(
                f"arrow_config router_temperature={arrow['router_temperature']!r} is invalid; "
                "expected a number > 0"
            )
        if not isinstance(arrow["use_gks"], bool) or not (seed is None or _is_int(seed)):
            raise ConfigError(
                f"arrow_config use_gks={arrow['use_gks']!r}, rng_seed={seed!r}: expected a bool "
                "and an integer or None"
            )
        for name in ("task_adapter_names", "gks_adapter_names"):
            names = arrow[name]
            if names is not None and not (
                isinstance(names, list) and all(isinstance(n, str) for n in names)
            ):
                raise ConfigError(
                    f"arrow_config {name}={names!r} is invalid; expected a list of adapter names"
                )
        self.arrow_config = arrow
        others = ("use_dora", "kasa_config", "use_bdlora", "velora_config", "lora_bias")
        self._one_variant("arrow_config", others)

    def _one_variant(self, name: str, others: tuple[str, ...]) -> None:
        """Refuse `name` together with any of `others` set (one variant per adapter)."""
        for other in others:
            if getattr(self, other) not in (None, False):
                raise ConfigError(f"{name} is not supported with {other} (one variant each)")

    def _check_alora(self) -> None:
        """alora_invocation_tokens: a non-empty list of token ids; not with another variant."""
        tokens = self.alora_invocation_tokens
        if tokens is None:
            return
        if (
            not isinstance(tokens, (list, tuple))
            or not tokens
            or not all(_is_int(t) and t >= 0 for t in tokens)
        ):
            raise ConfigError(
                f"alora_invocation_tokens={tokens!r} is invalid; expected a non-empty list of "
                "token ids (ints >= 0), e.g. tokenizer.encode(invocation_string)"
            )
        self.alora_invocation_tokens = [int(t) for t in tokens]
        other = {"use_dora": self.use_dora, "kasa_config": self.kasa_config is not None}
        other["use_bdlora"] = self.use_bdlora is not None
        other["velora_config"] = self.velora_config is not None
        other["target_parameters"] = bool(self.target_parameters)  # PEFT: not on ParamWrapper
        for name, used in other.items():
            if used:
                raise ConfigError(
                    f"alora_invocation_tokens is not supported with {name} (one variant each)"
                )

    def _check_monteclora(self) -> None:
        """monteclora_config: PEFT's MontecloraConfig fields; not with another variant."""
        monte = _sub_config("monteclora_config", self.monteclora_config, MontecloraConfig)
        if monte is None:
            return
        for name in ("num_samples", "buffer_size"):
            if not _is_int(monte[name]) or monte[name] <= 0:
                raise ConfigError(
                    f"monteclora_config {name}={monte[name]!r} is invalid; expected a positive int"
                )
        for name in ("dirichlet_prior", "sample_scaler", "kl_loss_weight"):
            value = monte[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"monteclora_config {name}={value!r} is invalid; expected a number"
                )
        if not monte["dirichlet_prior"] > 0:
            raise ConfigError(
                f"monteclora_config dirichlet_prior={monte['dirichlet_prior']!r} is invalid; "
                "expected a number > 0"
            )
        if not isinstance(monte["use_entropy"], bool):
            raise ConfigError(
                f"monteclora_config use_entropy={monte['use_entropy']!r} is invalid; "
                "expected True or False"
            )
        self.monteclora_config = monte
        other = {"use_dora": self.use_dora, "kasa_config": self.kasa_config is not None}
        other["velora_config"] = self.velora_config is not None
        other["use_bdlora"] = self.use_bdlora is not None
        other["use_qalora"] = self.use_qalora
        for name, used in other.items():
            if used:
                raise ConfigError(
                    f"monteclora_config is not supported with {name} (one variant each)"
                )

    def _check_qalora(self) -> None:
        """use_qalora / qalora_group_size: a bool and a positive int; not with another variant."""
        if not isinstance(self.use_qalora, bool):
            raise ConfigError(f"use_qalora={self.use_qalora!r} is invalid; expected True or False")
        size = self.qalora_group_size
        if not _is_int(size) or size <= 0:
            raise ConfigError(f"qalora_group_size={size!r} is invalid; expected a positive integer")
        if not self.use_qalora:
            return
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"use_qalora=True needs init_lora_weights True, False or 'gaussian', got "
                f"{self.init_lora_weights!r}: QALoRA's A reads pooled inputs, not the base weight"
            )
        if self.lora_bias:
            raise ConfigError(
                "use_qalora=True is not supported with lora_bias=True (PEFT's QALoRA forward "
                "drops lora_B's bias)"
            )
        other = {"use_dora": self.use_dora, "kasa_config": self.kasa_config is not None}
        other["velora_config"] = self.velora_config is not None
        other["use_bdlora"] = self.use_bdlora is not None
        for name, used in other.items():
            if used:
                raise ConfigError(f"use_qalora is not supported with {name} (one variant each)")

    def _check_bdlora(self) -> None:
        """use_bdlora: PEFT's BdLoraConfig fields, lists that do not overlap; one variant."""
        bd = _sub_config("use_bdlora", self.use_bdlora, BdLoraConfig)
        if bd is None:
            return
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            names = bd[name]
            if names is not None and (
                not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            ):
                raise ConfigError(
                    f"use_bdlora {name}={names!r} is invalid; expected a list of names or None"
                )
        blocks = bd["nblocks"]
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ConfigError(f"use_bdlora nblocks={blocks!r} is invalid; expected an integer >= 1")
        if not isinstance(bd["match_strict"], bool):
            raise ConfigError(f"use_bdlora match_strict={bd['match_strict']!r} is not a bool")
        both = sorted(set(bd["target_modules_bd_a"] or ()) & set(bd["target_modules_bd_b"] or ()))
        if both:
            raise ConfigError(
                f"use_bdlora target_modules_bd_a and target_modules_bd_b overlap in {both}; "
                "a site has a block-diagonal A or B, not both"
            )
        self.use_bdlora = bd
        other = {"use_dora": self.use_dora, "kasa_config": self.kasa_config is not None}
        other["lora_bias"] = self.lora_bias  # PEFT's block-diagonal B has no bias
        for name, used in other.items():
            if used:
                raise ConfigError(f"use_bdlora is not supported with {name} (one variant each)")
        init = self.init_lora_weights
        if isinstance(init, str) and init != "gaussian":
            raise ConfigError(
                f"use_bdlora needs init_lora_weights=True, False or 'gaussian', got {init!r}"
            )

    def bdlora_side(self, site: str) -> str:
        """'a' / 'b': the factor `use_bdlora` makes block-diagonal on `site`; '' for neither.

        PEFT's rule: a pattern matches when it is a substring of the site name.
        """
        if self.use_bdlora is None:
            return ""
        a = any(p in site for p in self.use_bdlora["target_modules_bd_a"] or ())
        b = any(p in site for p in self.use_bdlora["target_modules_bd_b"] or ())
        return "ab" if a and b else "a" if a else "b" if b else ""

    @property
    def is_all_linear(self) -> bool:
        """Whether `target_modules` is the `"all-linear"` shorthand."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def rank_for(self, site: str) -> int:
        """The rank for a site, after `rank_pattern` (first matching key wins, as in PEFT)."""
        key = _pattern_key(self.rank_pattern, site, "rank_pattern")
        return self.rank_pattern.get(key, self.r)

    def alpha_for(self, site: str) -> float:
        """`lora_alpha` for a site, after `alpha_pattern`."""
        key = _pattern_key(self.alpha_pattern, site, "alpha_pattern")
        return self.alpha_pattern.get(key, self.lora_alpha)

    def scale_for(self, site: str) -> float:
        """The branch scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        r, alpha = self.rank_for(site), self.alpha_for(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` dict PEFT writes (unknown keys read earlier come back)."""
        data = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "runtime_config"):  # PEFT never writes runtime_config
                data[f.name] = getattr(self, f.name)
        data["peft_type"] = "LORA"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from a PEFT `adapter_config.json` dict; unknown keys go to `extra`.

        Raises:
            ConfigError: `data` is not a dict, not a LoRA config, or a field has a wrong value.
        """
        if not isinstance(data, dict):
            raise ConfigError(
                f"an adapter config is a JSON object of fields, got a {type(data).__name__}"
            )
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(
                f"adapter config has peft_type={peft_type!r}; lora_fx reads only 'LORA'"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LoraConfig:
        """Read an `adapter_config.json` file.

        Raises:
            ConfigError: The file is not JSON, or its config is invalid (the message names it).
        """
        return read_config_file(path)[0]


def read_config_file(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """The config of an `adapter_config.json` file and the dict it holds; errors name the file.

    Raises:
        ConfigError: The file is not JSON, not a JSON object, or a field is invalid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not a JSON file: {e}") from e
    try:
        return LoraConfig.from_dict(data), data
    except ConfigError as e:
        raise type(e)(f"{e} (in {str(path)!r})") from e


def _sub_config(name: str, value: Any, cls: type) -> dict[str, Any] | None:
    """A sub-config (dataclass `cls`, its dict, or None) as a dict of `cls`'s fields.

    PEFT drops unknown keys of a sub-config read from a file; missing ones take the defaults.
    """
    if value is None:
        return None
    if isinstance(value, cls):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} is invalid; expected a {cls.__name__}, a dict or None")
    return {k: value.get(k, v) for k, v in dataclasses.asdict(cls()).items()}


def _check_rank(name: str, value: Any) -> None:
    """Ranks are positive ints."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; expected a positive integer")


def _check_number(name: str, value: Any) -> None:
    """Alphas are finite real numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is invalid; expected a finite number")


def _check_names(name: str, value: Any, *, regex: bool = True) -> None:
    """Name lists are a list of str, or (where PEFT takes a regex) a str."""
    if value is None or (regex and isinstance(value, str)):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        expected = "a str (regex) or a list of names" if regex else "a list of names"
        raise ConfigError(f"{name}={value!r} is invalid; expected {expected}")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON's true is not a layer index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _pattern_key(keyed: dict[str, Any], site: str, field: str) -> str:
    r"""PEFT's `get_pattern_key`: the first key matching `(.*\\.)?key$`, else the site itself."""
    for key in keyed:
        if patterns.suffix_match(key, site, field=f"{field} key"):
            return key
    return site
