"""Structured configuration shared by every trainer (the Hydra config groups).

Each dataclass is the schema of one config group in ``conf/``: ``init``, ``data``,
``parallel``, ``optim``, ``trainer``; the ``model`` group holds the architecture fields of
:class:`aligner.models.ModelConfig` (a preset from ``conf/model/``), checked by it. The CLI merges the composed YAML onto these schemas
(:func:`validate_config`), so an unknown key or a value of the wrong type is an error that
names the key before any process group starts. The same dataclasses configure a trainer
from a research script without Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class InitSection:
    """``init``: initial weights and precision.

    hf: an HF folder (safetensors + config.json) whose weights initialise the model; its
    ``config.json`` then defines the architecture and the ``model`` group is not used.
    None: random initialisation of the ``model`` architecture from ``trainer.seed``.
    dtype: ``fp32`` or ``bf16`` parameters and compute.
    """

    hf: Optional[str] = None
    dtype: str = "fp32"


@dataclass
class DataSection:
    """``data``: files, tokenizer, template and length policy.

    format: ``auto`` or a data-layer format name; template: ``auto`` (extra_id for reward
    rows, the tokenizer's chat template if it has one, else extra_id), ``extra_id``,
    ``chat`` or ``raw`` (prompt tokens + response tokens + EOS, no wrapping).
    overlong: ``truncate_left`` (drop prompt tokens from the left) or ``drop``.
    packing: pack samples into ``max_length`` bins (block-diagonal attention); a pair
    (chosen + rejected) shares one bin, so the overlong policy applies to the pair.
    """

    train: Optional[str] = None
    validation: Optional[str] = None
    tokenizer: Optional[str] = None
    format: str = "auto"
    template: str = "auto"
    max_length: int = 512
    overlong: str = "truncate_left"
    skip_invalid: bool = False
    packing: bool = False


@dataclass
class ParallelSection:
    """``parallel``: the megatron-core layout (see aligner.parallel.ParallelConfig)."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    backend: Optional[str] = None
    timeout_minutes: int = 30


@dataclass
class OptimSection:
    """``optim``: megatron-core optimizer and LR schedule.

    name: ``adam`` (AdamW: decoupled weight decay) or ``sgd``. schedule: ``constant``
    (after warmup), ``cosine`` or ``linear`` decay to ``min_lr`` at ``trainer.max_steps``.
    distributed: megatron-core's distributed optimizer (sharded states; GPU only).
    """

    name: str = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    distributed: bool = False


@dataclass
class TrainerSection:
    """``trainer``: the loop.

    global_batch_size counts samples (pairs for preference data) per optimizer step over
    all data-parallel ranks; micro_batch_size per forward pass; their ratio / DP size is
    the gradient-accumulation count. max_steps < 0 with max_epochs set means epochs decide.
    val_interval / save_interval: every N steps (0: only at the end).
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
    seed: int = 1234
    resume: bool = True
    out_dir: str = "runs/default"
    export_hf: bool = True
    progress: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None


@dataclass
class RunConfig:
    """The sections every trainer shares; algorithms add their own group (``sft``, ``rm``, ``dpo``).

    algorithm: which trainer a top-level config runs (``sft``, ``rm``, ``dpo``).
    """

    algorithm: str = ""
    model: Dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (conf/model/<preset>.yaml)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range."""


_CHOICES = {
    "init.dtype": ("fp32", "bf16"),
    "data.overlong": ("truncate_left", "drop"),
    "data.template": ("auto", "extra_id", "chat", "raw"),
    "optim.name": ("adam", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear"),
}


def validate_config(cfg: Any, schema: type) -> DictConfig:
    """Merge ``cfg`` (dict / DictConfig) onto the dataclass ``schema``; raise ConfigError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = (exc.msg if hasattr(exc, "msg") else str(exc)).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}") from None
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value is not None and value not in choices:
            raise ConfigError(f"config key {key!r} = {value!r}; expected one of {choices}")
    from aligner.models.config import ModelConfig

    try:
        ModelConfig.from_dict(OmegaConf.to_container(merged.model, resolve=True), source="config group 'model'")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    trainer = merged.trainer
    for key in ("global_batch_size", "micro_batch_size", "log_interval"):
        if trainer[key] < 1:
            raise ConfigError(f"config key 'trainer.{key}' = {trainer[key]}; expected >= 1")
    if trainer.global_batch_size % trainer.micro_batch_size:
        raise ConfigError(
            f"trainer.global_batch_size = {trainer.global_batch_size} is not a multiple of"
            f" trainer.micro_batch_size = {trainer.micro_batch_size}"
        )
    if trainer.max_steps < 0 and trainer.max_epochs is None:
        raise ConfigError("trainer.max_steps < 0 needs trainer.max_epochs")
    return merged


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


__all__ = [
    "ConfigError",
    "DataSection",
    "InitSection",
    "OptimSection",
    "ParallelSection",
    "RunConfig",
    "TrainerSection",
    "validate_config",
    "to_container",
]

