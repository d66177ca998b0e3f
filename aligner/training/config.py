"""The config sections the training layer owns: ``model``, ``init``, ``data``, ``parallel``,
``optim``, ``trainer``, ``lora`` (docs/configuration.md, docs/lora.md), with their checks.

The defaults written here are the defaults everywhere: each algorithm's schema
(:class:`aligner.algorithms.base.RunConfig` plus its own section) is registered in Hydra's
ConfigStore as ``<algorithm>_schema``, the first entry of its top-level configs in
``conf/``, whose YAML files hold only what a preset or recipe changes. The ``model``
section is derived from :class:`aligner.models.config.ModelConfig` (its fields and
defaults), ``model.arch`` checked against the supported families. The machinery (choices,
checks, validation) is :mod:`aligner.config`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from aligner.config import Choice, ConfigError, fail, plain, registered, section_check
from aligner.models.config import LAYER_SPECS, ModelConfig, supported_archs


class DType(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class Template(Choice):
    auto = "auto"
    extra_id = "extra_id"
    chat = "chat"
    raw = "raw"


class Overlong(Choice):
    truncate_left = "truncate_left"
    drop = "drop"
    error = "error"


class OptimizerName(Choice):
    adam = "adam"
    sgd = "sgd"


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


LayerSpec = Choice("LayerSpec", [(name, name) for name in LAYER_SPECS], module=__name__)


def _model_section() -> type:
    """``model``: :class:`ModelConfig`'s fields with its defaults (its docstring describes
    them; a preset from ``conf/model/`` sets them, and with ``init.hf`` the HF config.json
    does), ``arch`` one of the supported families and ``layer_spec`` a choice of kernels
    (not architecture). ModelConfig checks the combination before any process group."""
    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        if f.name == "hf_config":  # what an HF config.json held: not a setting
            continue
        if f.name == "arch":
            fields.append((f.name, str, registered(supported_archs, f.default)))
        elif f.name == "layer_spec":
            fields.append((f.name, LayerSpec, dataclasses.field(default=LayerSpec(f.default))))
        else:
            fields.append((f.name, _structured_type(hints[f.name]), dataclasses.field(default=f.default)))
    section = dataclasses.make_dataclass("ModelSection", fields)
    section.__module__, section.__doc__ = __name__, _model_section.__doc__
    return section


def _structured_type(hint) -> Any:
    """``hint`` as OmegaConf types it: a plain dict is ``Dict[str, Any]``, a union ``Any``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    inner = args[0] if optional and len(args) == 1 else hint
    if inner is dict:
        inner = Dict[str, Any]
    elif typing.get_origin(inner) is typing.Union:
        return Any
    return Optional[inner] if optional else inner


ModelSection = _model_section()


@dataclass
class InitSection:
    """``init``: initial weights and precision.

    hf: an HF folder (safetensors + config.json) whose weights initialise the model; its
    ``config.json`` then defines the architecture and the ``model`` group's architecture
    fields are not used. None: random initialisation of the ``model`` architecture from
    ``trainer.seed``. dtype: ``fp32`` or ``bf16`` parameters and compute.
    """

    hf: Optional[str] = None
    dtype: DType = DType.fp32


@dataclass
class DataSection:
    """``data``: files, tokenizer, template and length policy.

    train (required): a data file (.jsonl, .jsonl.gz, .parquet, an Arrow folder: prepared on
    first use), a prepared folder (``aligner data prepare``), or a blend, a list of
    ``{path, weight}`` entries drawn in those proportions (docs/data_formats.md).
    validation: optional, a file or prepared folder. tokenizer: a HF
    tokenizer folder or a SentencePiece ``.model`` (None: the tokenizer of ``init.hf``).
    format: ``auto`` (detected from the first row) or a data-layer format name.
    template: ``auto`` (extra_id for reward rows, the tokenizer's chat template if it has
    one, else extra_id), ``extra_id``, ``chat`` or ``raw``. max_length: tokens per sample.
    overlong: what a sample (a prompt, for a prompt file) longer than max_length gets:
    ``truncate_left`` (drop prompt tokens from the left), ``drop`` (skipped, counted) or
    ``error`` (refused, naming file:line and the lengths).
    skip_invalid: skip malformed rows (counted and reported) instead of failing.
    packing: pack samples into ``max_length`` bins (block-diagonal attention); a pair
    (chosen + rejected) shares one bin, so the over-length policy applies to the pair.
    """

    train: Any = MISSING  # a path, or a blend: [{path: str, weight: float}, ...]
    validation: Optional[str] = None
    tokenizer: Optional[str] = None
    format: str = "auto"
    template: Template = Template.auto
    max_length: int = 2048
    overlong: Overlong = Overlong.truncate_left
    skip_invalid: bool = False
    packing: bool = False


@dataclass
class ParallelSection:
    """``parallel``: the megatron-core layout (see aligner.parallel.ParallelConfig).

    Data parallelism takes what the world size leaves: ``world / (tp * pp * cp)``.
    backend: ``auto`` (NCCL with GPUs, gloo without), ``nccl`` or ``gloo``.
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    backend: Backend = Backend.auto
    timeout_minutes: int = 30


@dataclass
class OptimSection:
    """``optim``: megatron-core optimizer and LR schedule.

    name: ``adam`` (AdamW: decoupled weight decay) or ``sgd``. schedule: ``constant``
    (after warmup), ``cosine`` or ``linear`` decay to ``min_lr`` at the last step.
    distributed: megatron-core's distributed optimizer (sharded states; GPU only).
    """

    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant
    distributed: bool = False


@dataclass
class TrainerSection:
    """``trainer``: the loop and the run folder.

    global_batch_size counts samples (pairs for preference data; prompts for online
    algorithms) per step over all data-parallel ranks; micro_batch_size per forward pass
    (rows for online algorithms); each trainer checks how they fit the layout
    (``Trainer.check_batch``, docs/configuration.md). max_steps < 0 with max_epochs set means epochs decide.
    val_interval / save_interval: every N steps (0: only at the end). keep_last: complete
    checkpoints kept (>= 1). out_dir: the run folder (``config.yaml``, ``checkpoints/``,
    ``metrics.jsonl``, ``hf/``); resume: continue the run found there (its config must
    match, see docs/configuration.md), false: start afresh in it. save_on_signal: on
    SIGTERM (what Slurm sends before a time limit) finish the current step and save a
    checkpoint before stopping.
    """

    max_steps: int = 100
    max_epochs: Optional[int] = None
    global_batch_size: int = 8
    micro_batch_size: int = 2
    val_interval: int = 0
    val_batches: Optional[int] = None
    save_interval: int = 0
    keep_last: int = 2
    log_interval: int = 1
    log_rollouts: int = 0  # online runs: every N steps, rows to <out_dir>/rollouts/ (0: off)
    log_rollouts_rows: int = 8  # at most this many rows a logged step
    seed: int = 1234
    resume: bool = True
    out_dir: str = "runs/${algorithm}"
    export_hf: bool = True
    progress: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None
    save_on_signal: bool = True


class LoadBalancing(Choice):
    aux_loss = "aux_loss"
    seq_aux_loss = "seq_aux_loss"
    global_aux_loss = "global_aux_loss"


@dataclass
class MoESection:
    """``moe``: the router of a mixture-of-experts policy (docs/moe.md); a dense model
    takes none of it.

    aux_loss_coeff: weight of megatron-core's load-balancing loss ``load_balancing``
    (``aux_loss``: per micro-batch, E · Σ_i f_i · P_i with f_i the share of the routed
    tokens expert i received and P_i its mean router probability; ``seq_aux_loss``: per
    sequence; ``global_aux_loss``: with the token counts of the whole step); 0: none.
    z_loss_coeff: weight of the router z-loss, the mean of logsumexp(router logits)^2
    (ST-MoE); 0: none. routing_replay: online algorithms route the training passes'
    tokens to the experts the rollout chose for them (megatron-core's router replay).
    """

    aux_loss_coeff: float = 0.0
    load_balancing: LoadBalancing = LoadBalancing.aux_loss
    z_loss_coeff: float = 0.0
    routing_replay: bool = False


@section_check(MoESection)
def _check_moe(m, key: str, cfg) -> None:
    for name in ("aux_loss_coeff", "z_loss_coeff"):
        if not m[name] >= 0:
            fail(f"{key}.{name}", m[name], "expected >= 0 (0: none)")


def check_moe_model(section, key: str, model_cfg) -> None:
    """A set ``moe`` option on a model without experts is an error naming it."""
    if model_cfg.num_experts:
        return
    for name, unset in (("aux_loss_coeff", 0.0), ("z_loss_coeff", 0.0), ("routing_replay", False)):
        if section[name] != unset:
            raise ConfigError(f"{key}.{name} = {section[name]!r}: model.arch = {model_cfg.arch} has no experts"
                              " (model.num_experts is not set)")


@dataclass
class LoraSection:
    """``lora``: low-rank adapters on the policy (docs/lora.md; off by default).

    enabled: train adapters on a frozen base; the reference of DPO / PPO / GRPO / SteerLM
    2.0 is then the base itself (adapters disabled), not a second copy. rank r, alpha:
    the adapter's scaling is alpha / r (rslora: alpha / sqrt(r)). dropout: on the
    adapter's input. targets: among ``qkv``, ``proj``, ``fc1``, ``fc2`` (megatron-core's
    linear layers; HF ``q/k/v_proj``, ``o_proj``, ``gate/up_proj``, ``down_proj``).
    init_peft: a PEFT adapter folder to continue training from (its rank and targets must be
    these).
    """

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: List[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    init_peft: Optional[str] = None


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@section_check(LoraSection)
def _check_lora(lo, key: str, cfg) -> None:
    if lo.rank < 1:
        fail(f"{key}.rank", lo.rank, "expected >= 1")
    if not lo.alpha > 0:
        fail(f"{key}.alpha", lo.alpha, "expected > 0")
    if not 0.0 <= lo.dropout < 1.0:
        fail(f"{key}.dropout", lo.dropout, "expected in [0.0, 1.0)")
    if not lo.targets:
        fail(f"{key}.targets", list(lo.targets), f"expected some of {list(LORA_TARGETS)}")
    for t in lo.targets:
        if t not in LORA_TARGETS:
            fail(f"{key}.targets", list(lo.targets), f"expected some of {list(LORA_TARGETS)}, got {t!r}")


@section_check(TrainerSection)
def _check_trainer(t, key: str, cfg) -> None:
    for name in ("global_batch_size", "micro_batch_size", "log_interval", "keep_last", "log_rollouts_rows"):
        if t[name] < 1:
            fail(f"{key}.{name}", t[name], "expected >= 1")
    if t.log_rollouts < 0:
        fail(f"{key}.log_rollouts", t.log_rollouts, "expected >= 0 (0: off)")
    for name in ("val_interval", "save_interval"):
        if t[name] < 0:
            fail(f"{key}.{name}", t[name], "expected >= 0 (0: only at the end)")
    for name in ("val_batches", "max_epochs"):
        if t[name] is not None and t[name] < 1:
            fail(f"{key}.{name}", t[name], "expected >= 1 or null")
    if not 0 <= t.seed < 2 ** 32:  # numpy's and torch's seeds
        fail(f"{key}.seed", t.seed, "expected an integer in [0, 2**32 - 1]")
    if t.max_steps == 0 or (t.max_steps < 0 and t.max_epochs is None):
        fail(f"{key}.max_steps", t.max_steps, f"expected >= 1, or < 0 with {key}.max_epochs set")


@section_check(OptimSection)
def _check_optim(o, key: str, cfg) -> None:
    if not o.lr >= 0:  # 0 is a legitimate setting: a parity check, an evaluation-only pass
        fail(f"{key}.lr", o.lr, "expected >= 0")
    if not 0 <= o.min_lr <= o.lr:
        fail(f"{key}.min_lr", o.min_lr, f"expected 0 <= {key}.min_lr <= {key}.lr = {o.lr}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= o[name] < 1.0:
            fail(f"{key}.{name}", o[name], "expected in [0.0, 1.0)")
    for name in ("weight_decay", "clip_grad", "warmup_steps"):
        if o[name] < 0:
            fail(f"{key}.{name}", o[name], "expected >= 0")
    if not o.eps > 0:
        fail(f"{key}.eps", o.eps, "expected > 0")


@section_check(DataSection)
def _check_data(d, key: str, cfg) -> None:
    if not OmegaConf.is_missing(d, "train") and not isinstance(d.train, str):
        if not isinstance(d.train, ListConfig):
            fail(f"{key}.train", d.train, "expected a path, or a blend [{path: ..., weight: ...}, ...]")
        from aligner.data.loading import blend_entries  # the data layer loads torch: only blends pay for it here

        try:
            blend_entries(d.train)
        except ValueError as exc:
            raise ConfigError(f"{key}.train: {exc}") from None
    if d.max_length < 1:
        fail(f"{key}.max_length", d.max_length, "expected >= 1")
    # a model built from the model group (no init.hf) has its positions in the config
    from_model_group = "init" in cfg and not OmegaConf.is_missing(cfg.init, "hf") and cfg.init.hf is None
    if from_model_group and d.max_length > cfg.model.max_position_embeddings:
        raise ConfigError(f"{key}.max_length = {d.max_length} exceeds model.max_position_embeddings ="
                          f" {cfg.model.max_position_embeddings}")


@section_check(ParallelSection)
def _check_parallel(p, key: str, cfg) -> None:
    for name in ("tp", "pp", "cp", "ep", "timeout_minutes"):
        if p[name] < 1:
            fail(f"{key}.{name}", p[name], "expected >= 1")
    if p.vpp is not None and p.vpp < 1:
        fail(f"{key}.vpp", p.vpp, "expected >= 1 or null")


def model_fields(model: Any) -> dict:
    """The ``model`` section as keyword arguments for :class:`ModelConfig` (choices as strings)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    data = plain(model) if isinstance(model, DictConfig) else dict(model)
    return {k: v for k, v in data.items() if k in names}


__all__ = [
    "Backend",
    "ConfigError",
    "DType",
    "DataSection",
    "InitSection",
    "LayerSpec",
    "LoadBalancing",
    "LoraSection",
    "ModelSection",
    "MoESection",
    "OptimSection",
    "OptimizerName",
    "Overlong",
    "ParallelSection",
    "Schedule",
    "Template",
    "TrainerSection",
    "check_moe_model",
    "model_fields",
]
