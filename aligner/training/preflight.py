"""What a run checks before any process group or model exists (docs/configuration.md):
files and folders named by the config, every data row, the layer spec against the layout,
the layout against the world size and the architecture, the run folder. Each check raises
a :class:`~aligner.config.ConfigError` naming the key, so a mistake is reported in seconds.
:meth:`aligner.algorithms.base.Trainer.preflight` runs them in order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from aligner.config import ConfigError
from aligner.data.loading import check_dataset, dataset_paths
from aligner.parallel.state import LayoutError, ParallelConfig, read_dist_env, validate_layout

HF_FOLDER_HINT = "init.hf names a Hugging Face model folder (config.json + *.safetensors)"


def check_layer_spec(cfg) -> None:
    """The layer spec this install builds can run the layout (context / sequence
    parallelism need kernels some specs lack)."""
    # the layer specs import megatron-core: loaded when a run is checked, not with the config
    from aligner.models.layer_spec import check_parallel_support, resolve_layer_spec

    p = cfg.parallel
    try:
        spec = resolve_layer_spec(str(OmegaConf.select(cfg, "model.layer_spec") or "auto"))
        check_parallel_support(spec, sequence_parallel=bool(p.sequence_parallel and p.tp > 1),
                               context_parallel=int(p.cp))
    except (LayoutError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_init(cfg) -> None:
    """``init.hf``, when set, is an HF model folder."""
    if cfg.init.hf is None:
        return
    hf = Path(cfg.init.hf)
    if not hf.is_dir():
        raise ConfigError(f"init.hf = {cfg.init.hf!r}: no such folder", hint=HF_FOLDER_HINT)
    if not (hf / "config.json").is_file():
        raise ConfigError(f"init.hf = {cfg.init.hf!r}: no config.json in that folder", hint=HF_FOLDER_HINT)


def check_data_files(cfg) -> None:
    """Every data file or prepared folder the run names exists (a blend names several)."""
    for key in ("train", "validation"):
        for path in dataset_paths(cfg.data[key]) if cfg.data[key] is not None else ():
            if not Path(path).exists():
                raise ConfigError(f"data.{key} = {path!r}: no such file or folder")


def check_monitor(cfg) -> None:
    """The monitor's prompt file exists (when it is on); its reward sources are checked by
    :func:`aligner.evaluation.config.check_monitor_sources`."""
    m = cfg.monitor
    if not m.enabled:
        return
    if not Path(m.prompts).is_file():
        raise ConfigError(f"monitor.prompts = {m.prompts!r}: no such file")


def check_rows(sources: Sequence[Optional[str]], kind: str, fmt: str, skip_invalid: bool) -> None:
    """Read every row of the data files once (no tokenizer; a prepared folder: its files and
    sources): a malformed row is reported with its file and line."""
    for source in sources:
        if source is not None:
            check_dataset(source, kind, fmt, skip_invalid)


def check_tokenizer(cfg) -> None:
    d = cfg.data
    if d.tokenizer is None and cfg.init.hf is None:
        raise ConfigError("data.tokenizer is not set and there is no init.hf to take the tokenizer from",
                          hint="set data.tokenizer to an HF tokenizer folder or a SentencePiece .model file")
    if d.tokenizer is not None and not Path(d.tokenizer).exists():
        raise ConfigError(f"data.tokenizer = {d.tokenizer!r}: no such file or folder")


def check_out_dir(cfg) -> None:
    """``trainer.out_dir`` can be written: the folder, or the nearest folder above it that
    exists (nothing is created here)."""
    out = Path(cfg.trainer.out_dir).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"trainer.out_dir = {cfg.trainer.out_dir!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"trainer.out_dir = {cfg.trainer.out_dir!r}: {existing} cannot be written")


def check_devices(cfg) -> None:
    import torch  # only to ask for GPUs

    if cfg.optim.distributed and not torch.cuda.is_available():
        raise ConfigError("optim.distributed = true needs GPUs: megatron-core's distributed optimizer has no"
                          " CPU path", hint="set optim.distributed=false")


def check_model(cfg, model_cfg) -> None:
    """The data fit the architecture's positions, and the layout fits the world size and
    the architecture (heads, query groups, layers, vocabulary)."""
    if cfg.data.max_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.max_length = {cfg.data.max_length} exceeds the model's max_position_embeddings"
                          f" = {model_cfg.max_position_embeddings}")
    p = cfg.parallel
    try:
        world = read_dist_env().world_size
        validate_layout(
            ParallelConfig(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, backend=str(p.backend)),
            world, num_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
            num_query_groups=model_cfg.num_query_groups, vocab_size=model_cfg.vocab_size,
            num_experts=model_cfg.num_experts, sequence_parallel=bool(p.sequence_parallel),
        )
    except LayoutError as exc:
        raise ConfigError(str(exc) if "world size" in str(exc) else f"{exc} (world size {world})") from None
    except ValueError as exc:  # launcher variables that are not a job
        raise ConfigError(str(exc)) from None


def data_parallel_size(cfg) -> int:
    """The data-parallel size of the job: the world size over ``tp x pp x cp`` (the layout is
    checked by :func:`check_model`)."""
    p = cfg.parallel
    return max(1, read_dist_env().world_size // (p.tp * p.pp * p.cp))
