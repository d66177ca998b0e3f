"""Structured configuration shared by every trainer: the schemas and the single source of defaults.

Each dataclass is the schema of one config section: ``model``, ``init``, ``data``,
``parallel``, ``optim``, ``trainer``; the algorithms add theirs (``rm``, ``dpo``, ... in
:mod:`aligner.algorithms.trainers`), and each algorithm's whole schema is registered in
Hydra's ConfigStore as ``<algorithm>_schema``, the first entry of that algorithm's
top-level configs in ``conf/``. The defaults written here are therefore the defaults
everywhere; the YAML files hold only what a preset or recipe changes.

Every choice is an :class:`enum.Enum` whose member names are the accepted values, so
OmegaConf itself rejects anything else while the config is composed, naming the key, the
value and the accepted ones. :func:`validate_config` adds the checks a type cannot express
(ranges, combinations) and, for a run, that no required value (``???``) is left unset.
The same dataclasses configure a trainer from a research script without Hydra.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aligner.runtime import UserError


class ConfigError(UserError):
    """A configuration key is unknown, mistyped, unset or out of range; the message names it."""


class Choice(str, Enum):
    """A config choice: member names are the accepted values (``str(x)`` is the value)."""

    def __str__(self) -> str:
        return self.value


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


class Arch(Choice):
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"


class LayerSpec(Choice):
    auto = "auto"
    te = "te"
    fused = "fused"
    local = "local"


@dataclass
class ModelSection:
    """``model``: the architecture, the fields of :class:`aligner.models.ModelConfig` with its
    defaults (a preset from ``conf/model/`` sets them; with ``init.hf`` the HF config.json
    does), plus ``layer_spec``: which kernels build the layers (``auto``: Transformer Engine
    if importable, else fused, else local; not part of the architecture). ModelConfig checks
    the combination before any process group starts; ``eos_token_id`` (an id or a list of
    ids) is untyped here and checked there.
    """

    arch: Arch = Arch.llama
    vocab_size: int = 1024
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_layers: int = 4
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: Optional[bool] = None
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    layer_spec: LayerSpec = LayerSpec.auto


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
    overlong: ``truncate_left`` (drop prompt tokens from the left) or ``drop``.
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

    global_batch_size counts samples (pairs for preference data) per optimizer step over
    all data-parallel ranks; micro_batch_size per forward pass; their ratio / DP size is
    the gradient-accumulation count. max_steps < 0 with max_epochs set means epochs decide.
    val_interval / save_interval: every N steps (0: only at the end). keep_last: complete
    checkpoints kept (>= 1). out_dir: the run folder (``config.yaml``, ``checkpoints/``,
    ``metrics.jsonl``, ``hf/``); resume: continue the run found there (its config must
    match, see docs/configuration.md), false: start afresh in it.
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
    out_dir: str = "runs/${algorithm}"
    export_hf: bool = True
    progress: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None


class RewardKind(Choice):
    """Where a reward comes from (aligner.rewards): an HF reward-model folder, the embedded
    world's ground-truth scorer, or a ``package.module:function``."""

    model = "model"
    world = "world"
    function = "function"


class EnsembleMode(Choice):
    """How several proxy reward models combine (docs/monitor.md)."""

    mean = "mean"
    min = "min"
    mean_minus_var = "mean_minus_var"


@dataclass
class RewardSpec:
    """One reward source (aligner.rewards.build_reward): ``kind`` ``model`` (``path``: an HF
    reward-model folder), ``world`` or ``function`` (``function``: ``package.module:function``).
    attribute_weights (one per output) or reward_attribute make the scalar; for a model
    without either, the weights its training recorded."""

    kind: RewardKind = RewardKind.world
    path: Optional[str] = None
    function: Optional[str] = None
    attribute_weights: Optional[List[float]] = None
    reward_attribute: Optional[str] = None


@dataclass
class MonitorSection:
    """``monitor``: gold-vs-proxy over-optimisation monitor (docs/monitor.md).

    Every ``interval`` steps (and before the first and after the last) the live policy
    samples ``samples_per_prompt`` responses (temperature 1, fixed seeds from ``seed``) for
    the first ``num_prompts`` prompts of ``prompts``; logged: the proxy reward (``proxy``:
    reward sources; empty = the algorithm's own training reward), the gold reward
    (``gold``), the sampled KL of the policy to the initial model and d = sqrt(KL), the
    response length and the proxy-length correlation. Several proxies combine by
    ``ensemble`` (``mean``, ``min``, ``mean_minus_var`` with ``ensemble_lambda``).
    ``warn_drop``: warn once gold is this far below its best while the proxy still rises;
    ``keep_best_gold``: the policy with the best gold in ``<out_dir>/best_gold/``;
    ``early_stop``: stop training when the warning fires.
    """

    enabled: bool = False
    interval: int = 10
    prompts: Optional[str] = None
    num_prompts: int = 64
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    seed: int = 0
    proxy: List[RewardSpec] = field(default_factory=list)
    ensemble: EnsembleMode = EnsembleMode.mean
    ensemble_lambda: float = 1.0
    gold: RewardSpec = field(default_factory=lambda: RewardSpec(kind=RewardKind.world,
                                                                reward_attribute="helpfulness"))
    warn_drop: float = 0.1
    keep_best_gold: bool = True
    early_stop: bool = False
    micro_batch_size: int = 8


@dataclass
class RunConfig:
    """The sections every trainer shares; algorithms add their own (``rm``, ``dpo``, ...).

    algorithm: which trainer a top-level config runs (a key of
    ``aligner.algorithms.trainers.TRAINERS``).
    """

    algorithm: str = MISSING
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


def _register_run_dirs() -> None:
    """``aligner_run_dirs`` in Hydra's ConfigStore (package ``hydra``, listed in every top-level
    config): the run folder is ``trainer.out_dir``; a ``-m`` sweep puts job N in
    ``<trainer.out_dir>/N``. ``hydra.run.dir`` / ``hydra.sweep.dir`` override them as usual."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(
        name="aligner_run_dirs",
        package="hydra",
        node={"run": {"dir": "${trainer.out_dir}"},
              "sweep": {"dir": "${trainer.out_dir}", "subdir": "${hydra.job.num}"},
              "job": {"chdir": False}},
    )


_register_run_dirs()


# ------------------------------------------------------------------------------ checks
def describe_omegaconf_error(exc: BaseException) -> str:
    """One line from an OmegaConf error: ``key: what is wrong`` (the key with its full path)."""
    key = getattr(exc, "full_key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    if msg.startswith("Invalid value ") and ", expected one of " in msg:
        value, accepted = msg[len("Invalid value "):].split(", expected one of ", 1)
        msg = f"{value} is not accepted; expected one of {accepted.strip('[]')}"
    elif msg.startswith("Key '") and "' not in '" in msg:
        msg = "no such key" + (f" (the keys of this section: {_section_keys(exc)})" if _section_keys(exc) else "")
    return f"{key}: {msg}" if key else msg


def _section_keys(exc) -> str:
    obj = getattr(exc, "object_type", None)
    if obj is not None and dataclasses.is_dataclass(obj):
        return ", ".join(f.name for f in dataclasses.fields(obj))
    return ""


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key} = {value!r}: {expected}")


def missing_keys(cfg: DictConfig) -> List[str]:
    """The keys still ``???`` (required values nobody set), dotted, in config order."""
    out: List[str] = []

    def walk(node, prefix):
        for key in node:
            if prefix == "" and key == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                out.append(prefix + str(key))
            else:
                child = node._get_node(key)
                if isinstance(child, DictConfig):
                    walk(child, f"{prefix}{key}.")

    walk(cfg, "")
    return out


def check_required(cfg: DictConfig, command: str = "aligner train CONFIG") -> None:
    """Raise ConfigError listing every unset required value (``???``) with how to set them."""
    unset = missing_keys(cfg)
    if unset:
        raise ConfigError(
            f"required value{'s' if len(unset) > 1 else ''} not set: {', '.join(unset)}",
            hint="set on the command line, e.g. " + command + " " + " ".join(f"{k}=..." for k in unset),
        )


def validate_config(cfg: Any, schema: type, *, require_all: bool = False) -> DictConfig:
    """Merge ``cfg`` (dict / DictConfig / dataclass) onto ``schema`` and check it.

    Raises :class:`ConfigError` naming the key for an unknown key, a wrong type or choice,
    a value out of range or a combination that cannot work; with ``require_all``, also for
    unset required values. Imports no model code (the architecture's own consistency is
    :class:`aligner.models.ModelConfig`'s check, made by the trainers before they start). Returns the typed config (choices are :class:`Choice` members,
    which compare equal to their string values).
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(describe_omegaconf_error(exc)) from None
    _check_no_unknown_keys(merged)
    if require_all:
        check_required(merged)
    try:
        _check_values(merged)
    except OmegaConfBaseException as exc:  # a value the checks need is itself unset (???)
        raise ConfigError(describe_omegaconf_error(exc)) from None
    return merged


def _check_no_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Keys a schema does not have (Hydra's ``+key=value`` can add them to a structured config)."""
    kind = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(kind):
        names = [f.name for f in dataclasses.fields(kind)]
        for key in node:
            if key not in names:
                raise ConfigError(f"{prefix}{key}: no such key (the keys of this section: {', '.join(names)})")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key) and child._is_none() is False:
            _check_no_unknown_keys(child, f"{prefix}{key}.")


def _check_values(merged: DictConfig) -> None:
    t = merged.trainer
    for key in ("global_batch_size", "micro_batch_size", "log_interval", "keep_last"):
        if t[key] < 1:
            _fail(f"trainer.{key}", t[key], "expected >= 1")
    for key in ("val_interval", "save_interval"):
        if t[key] < 0:
            _fail(f"trainer.{key}", t[key], "expected >= 0 (0: only at the end)")
    for key in ("val_batches", "max_epochs"):
        if t[key] is not None and t[key] < 1:
            _fail(f"trainer.{key}", t[key], "expected >= 1 or null")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"trainer.global_batch_size = {t.global_batch_size} is not a multiple of"
                          f" trainer.micro_batch_size = {t.micro_batch_size}")
    if t.max_steps == 0 or (t.max_steps < 0 and t.max_epochs is None):
        _fail("trainer.max_steps", t.max_steps, "expected >= 1, or < 0 with trainer.max_epochs set")
    o = merged.optim
    if not o.lr > 0:
        _fail("optim.lr", o.lr, "expected > 0")
    if not 0 <= o.min_lr <= o.lr:
        _fail("optim.min_lr", o.min_lr, f"expected 0 <= optim.min_lr <= optim.lr = {o.lr}")
    for key, lo, hi in (("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0)):
        if not lo <= o[key] < hi:
            _fail(f"optim.{key}", o[key], f"expected in [{lo}, {hi})")
    for key in ("weight_decay", "clip_grad", "warmup_steps"):
        if o[key] < 0:
            _fail(f"optim.{key}", o[key], "expected >= 0")
    if not o.eps > 0:
        _fail("optim.eps", o.eps, "expected > 0")
    d = merged.data
    if not OmegaConf.is_missing(d, "train") and not isinstance(d.train, str):
        if not isinstance(d.train, ListConfig):
            _fail("data.train", d.train, "expected a path, or a blend [{path: ..., weight: ...}, ...]")
        from aligner.data.loading import blend_entries  # the data layer loads torch: only blends pay for it here

        try:
            blend_entries(d.train)
        except ValueError as exc:
            raise ConfigError(f"data.train: {exc}") from None
    if d.max_length < 1:
        _fail("data.max_length", d.max_length, "expected >= 1")
    p = merged.parallel
    for key in ("tp", "pp", "cp", "ep", "timeout_minutes"):
        if p[key] < 1:
            _fail(f"parallel.{key}", p[key], "expected >= 1")
    if p.vpp is not None and p.vpp < 1:
        _fail("parallel.vpp", p.vpp, "expected >= 1 or null")
    m = merged.monitor
    for key in ("interval", "num_prompts", "samples_per_prompt", "max_new_tokens", "micro_batch_size"):
        if m[key] < 1:
            _fail(f"monitor.{key}", m[key], "expected >= 1")
    if m.warn_drop < 0:
        _fail("monitor.warn_drop", m.warn_drop, "expected >= 0")
    if m.enabled and not m.prompts:
        raise ConfigError("monitor.enabled = true needs monitor.prompts (a held-out prompt file)",
                          hint="set monitor.prompts=FILE, e.g. the world's prompts_heldout.jsonl")
    for name, spec in [(f"monitor.proxy[{i}]", p) for i, p in enumerate(m.proxy)] + [("monitor.gold", m.gold)]:
        if spec.kind == RewardKind.model and not spec.path:
            raise ConfigError(f"{name}.path is not set: kind = model needs an HF reward-model folder")
        if spec.kind == RewardKind.function and not spec.function:
            raise ConfigError(f"{name}.function is not set: kind = function needs package.module:function")
    from_model_group = not OmegaConf.is_missing(merged.init, "hf") and merged.init.hf is None
    if from_model_group and d.max_length > merged.model.max_position_embeddings:
        raise ConfigError(f"data.max_length = {d.max_length} exceeds model.max_position_embeddings ="
                          f" {merged.model.max_position_embeddings}")


def check_attribute_weights(prefix: str, attributes: List[str], attribute_weights: Optional[List[float]],
                            reward_attribute: Optional[str], *, need_reward_attribute: bool = True,
                            distinct: bool = False) -> None:
    """The checks of a section that makes a scalar reward from named attribute outputs
    (``rm``, ``ppo.reward``, ``pg.reward``): ``attributes`` distinct and non-empty (when
    ``distinct``), ``reward_attribute`` one of them (when it is what picks the reward),
    one weight per attribute. ConfigError naming ``<prefix>.<key>``."""
    if distinct and (not attributes or len(set(attributes)) != len(attributes)):
        raise ConfigError(f"{prefix}.attributes = {attributes}: expected one or more distinct names")
    if need_reward_attribute and reward_attribute not in attributes:
        raise ConfigError(f"{prefix}.reward_attribute = {reward_attribute!r} is not one of {prefix}.attributes"
                          f" {attributes}")
    if attribute_weights is not None and len(attribute_weights) != len(attributes):
        raise ConfigError(f"{prefix}.attribute_weights has {len(attribute_weights)} entries; {prefix}.attributes has"
                          f" {len(attributes)} ({', '.join(attributes)})")


def model_fields(model: Any) -> dict:
    """The ``model`` section as keyword arguments for :class:`aligner.models.ModelConfig`
    (choices as strings; keys ModelConfig does not have, such as ``layer_spec`` where it
    is not a ModelConfig field, left out)."""
    from aligner.models.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    data = plain(model) if isinstance(model, DictConfig) else dict(model)
    return {k: v for k, v in data.items() if k in names}


def plain(cfg: Any) -> Any:
    """A resolved plain container of ``cfg`` (choices as their string values)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def to_container(cfg: Any) -> dict:
    """``cfg`` as a plain dict (kept for callers of earlier versions: same as :func:`plain`)."""
    return plain(cfg) if OmegaConf.is_config(cfg) else dict(cfg)


__all__ = [
    "Arch",
    "Backend",
    "Choice",
    "ConfigError",
    "DataSection",
    "EnsembleMode",
    "MonitorSection",
    "RewardKind",
    "RewardSpec",
    "DType",
    "InitSection",
    "LayerSpec",
    "ModelSection",
    "OptimSection",
    "OptimizerName",
    "Overlong",
    "ParallelSection",
    "RunConfig",
    "Schedule",
    "Template",
    "TrainerSection",
    "check_attribute_weights",
    "check_required",
    "describe_omegaconf_error",
    "missing_keys",
    "model_fields",
    "plain",
    "to_container",
    "validate_config",
]
