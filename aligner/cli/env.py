"""``aligner env``: the software and hardware stack, for bug reports (``--json`` for machines).

It includes the layer spec a model is built with here (``model.layer_spec = auto``: TE,
fused or local, and why) and the table of architecture families (HF ``model_type``, its
causal-LM class, the layer specs that build it and what it adds to the Llama layout;
docs/models.md).

Every entry is collected on its own: a package that is missing reads "not installed", one
that fails to import reads "error: <type>: <message>", and the report is still printed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any, Callable, List, Optional

NOT_INSTALLED = "not installed"

# report key -> (import name, distribution names to read the version from, first found)
PACKAGES = {
    "aligner": ("aligner", ("aligner",)),
    "torch": ("torch", ("torch",)),
    "megatron_core": ("megatron.core", ("megatron-core", "megatron_core")),
    "transformer_engine": ("transformer_engine", ("transformer-engine", "transformer_engine")),
    "apex": ("apex", ("apex",)),
    "hydra_core": ("hydra", ("hydra-core",)),
    "omegaconf": ("omegaconf", ("omegaconf",)),
    "transformers": ("transformers", ("transformers",)),
    "safetensors": ("safetensors", ("safetensors",)),
    "tokenizers": ("tokenizers", ("tokenizers",)),
    "sentencepiece": ("sentencepiece", ("sentencepiece",)),
    "numpy": ("numpy", ("numpy",)),
    "pybind11": ("pybind11", ("pybind11",)),
}


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0]


def package_version(import_name: str, distributions=()) -> str:
    """The version of an importable package; "not installed" or "error: ..." otherwise."""
    try:
        module = importlib.import_module(import_name)
    except ModuleNotFoundError as exc:
        if exc.name and import_name.startswith(exc.name):
            return NOT_INSTALLED
        return _error(exc)
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return _error(exc)
    version = getattr(module, "__version__", None)
    for dist in distributions:
        if version:
            break
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return str(version or "installed (version unknown)")


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return _error(exc)


def _torch_info() -> dict:
    try:
        import torch
    except Exception:
        return {"torch_cuda_build": NOT_INSTALLED}
    cuda = torch.cuda.is_available()
    dist = torch.distributed.is_available()
    info = {
        "torch_cuda_build": torch.version.cuda or "none (CPU build)",
        "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": [
            f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
            for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
        ] if cuda else [],
        "cudnn": _safe(lambda: torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        "nccl_available": dist and torch.distributed.is_nccl_available(),
        "nccl_version": None,
        "gloo_available": dist and torch.distributed.is_gloo_available(),
        "torch_threads": torch.get_num_threads(),
    }
    if info["nccl_available"]:
        info["nccl_version"] = _safe(lambda: ".".join(map(str, torch.cuda.nccl.version())))
    return info


def _packing_extension() -> str:
    try:
        from aligner import _C
    except ImportError as exc:
        return f"not built ({exc}); the pure-Python packer is used"
    return f"built ({os.path.basename(_C.__file__)})"


def _layer_spec() -> str:
    """The layer spec ``model.layer_spec = auto`` builds here, and why (aligner.models.layer_spec)."""
    try:
        from aligner.models.layer_spec import describe_layer_spec
    except Exception as exc:  # megatron-core missing or broken: the report still prints
        return _error(exc)
    return describe_layer_spec("auto")


def architectures() -> dict:
    """HF ``model_type`` -> {class, layer_specs, features} of every registered family."""
    from aligner.models import architectures as registry
    from aligner.models.config import ModelConfig

    table = {}
    for name in registry.model_types():
        adapter = registry.get(name)
        te = _safe(lambda: adapter.te_spec_builds(ModelConfig(arch=name)))
        specs = {True: "te, fused, local", False: "fused, local"}.get(te, te)  # else: the probe's error
        table[name] = {"class": adapter.causal_lm, "layer_specs": specs, "features": list(adapter.features)}
    return table


def collect() -> dict:
    """The report as a flat dict (JSON-serialisable)."""
    info: dict = {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for key, (import_name, dists) in PACKAGES.items():
        info[key] = package_version(import_name, dists)
        if key == "torch":
            info.update(_torch_info())
    info["packing_extension"] = _packing_extension()
    info["layer_spec"] = _layer_spec()
    info["architectures"] = _safe(architectures)
    launch = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                                         "CUDA_VISIBLE_DEVICES") if k in os.environ}
    info["launch_env"] = launch or None
    return info


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aligner env", description="Print the software and hardware stack (paste it into bug reports)."
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        rows = dict(info)
        table = rows.pop("architectures")
        if isinstance(table, dict):  # one row per family: class, layer specs, what it adds
            cls = max(len(v["class"]) for v in table.values())
            for name, v in table.items():
                rows[f"arch.{name}"] = f"{v['class']:<{cls}}  [{v['layer_specs']}]  {'; '.join(v['features']) or '-'}"
        else:
            rows["architectures"] = table
        width = max(map(len, rows))
        for key, value in rows.items():
            print(f"{key:<{width}}  {_text(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
