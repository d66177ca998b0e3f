"""``aligner env``: the software and hardware stack, for bug reports (``--json`` for machines)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import List, Optional


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return "not installed" if isinstance(exc, ImportError) else f"error: {type(exc).__name__}: {exc}"
    return str(getattr(mod, "__version__", "installed"))


def collect() -> dict:
    import torch

    info = {
        "aligner": _version("aligner"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda or "none (CPU build)",
        "megatron_core": _version("megatron.core"),
        "transformer_engine": _version("transformer_engine"),
        "apex": _version("apex"),
        "hydra_core": _version("hydra"),
        "omegaconf": _version("omegaconf"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "sentencepiece": _version("sentencepiece"),
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl_available": torch.distributed.is_nccl_available(),
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() and torch.cuda.is_available() else None,
        "gloo_available": torch.distributed.is_gloo_available(),
    }
    try:
        import aligner._C  # noqa: F401

        info["packing_extension"] = "built (aligner._C)"
    except ImportError:
        info["packing_extension"] = "not built (pure-Python packer in use)"
    return info


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
