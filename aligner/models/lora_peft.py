"""LoRA adapters in PEFT's format, out and in (docs/lora.md).

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``use_rslora``, ``target_modules`` by HF module name) and
``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` [r, in]
and ``...lora_B.weight`` [out, r] (the layout ``peft.PeftModel.from_pretrained`` reads;
see huggingface.co/docs/peft, "LoRA"). :func:`export_peft` gathers the adapters over TP
(B's rows or A's columns) and PP (adapters are small: every stage's go to rank 0);
:func:`load_peft` gives each rank its shard, to continue training from a PEFT adapter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.models.hf import CheckpointError, save_safetensors
from aligner.models.lora import lora_layers

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _key(hf_module: str, which: str) -> str:
    return f"base_model.model.{hf_module}.lora_{which}.weight"


def _shard_dim(part, which: str):
    """The TP axis of ``part``'s A or B, or None when it is replicated."""
    if part.split == "out":
        return 0 if which == "B" else None
    return 1 if which == "A" else None


def export_peft(models, out_dir) -> Path:
    """Write ``models``' adapters as a PEFT folder (collective: every rank calls it)."""
    layers = list(lora_layers(models))
    if not layers:
        raise ValueError("export_peft: the model has no LoRA adapters")
    tp_group = ps.get_tensor_model_parallel_group()
    tensors: Dict[str, torch.Tensor] = {}
    for layer in layers:
        for part in layer.parts.values():
            for which in ("A", "B"):
                t = getattr(part, f"lora_{which}").detach().float().cpu().contiguous()
                dim = _shard_dim(part, which)
                if dim is not None and ps.get_tensor_model_parallel_world_size() > 1:
                    shards = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
                    dist.all_gather(shards, t, group=tp_group)
                    t = torch.cat(shards, dim)
                tensors[_key(part.hf_module, which)] = t
    settings = layers[0].settings
    if dist.is_initialized():
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, tensors)
        for s in stages:
            tensors.update(s)
    out_dir = Path(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
                  "lora_dropout": settings.dropout, "use_rslora": settings.rslora, "target_modules": modules,
                  "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(dict(sorted(tensors.items())), tmp / WEIGHTS_FILE)
        if out_dir.exists():
            for f in out_dir.iterdir():
                f.unlink()
            out_dir.rmdir()
        os.replace(tmp, out_dir)  # complete or absent
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def read_peft_config(path) -> dict:
    """``adapter_config.json`` of a PEFT folder, checked for what aligner computes."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a PEFT adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type = {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise CheckpointError(f"{file}: bias / fan_in_fan_out adapters are not supported (expected bias 'none')")
    return config


def load_peft(models, path) -> None:
    """Copy a PEFT folder's adapters into ``models``' (built with the same rank and targets):
    every adapter of the model must be in the file and every tensor of the file used."""
    from safetensors import safe_open

    read_peft_config(path)
    file = Path(path) / WEIGHTS_FILE
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with safe_open(str(file), framework="pt") as f:
        unused = set(f.keys())
        for layer in lora_layers(models):
            for part in layer.parts.values():
                for which in ("A", "B"):
                    key = _key(part.hf_module, which)
                    if key not in unused and key not in f.keys():
                        raise CheckpointError(f"{file}: no {key!r}")
                    unused.discard(key)
                    full = f.get_tensor(key)
                    param = getattr(part, f"lora_{which}")
                    dim = _shard_dim(part, which)
                    local = full if dim is None else full.chunk(tp, dim)[rank]
                    if tuple(local.shape) != tuple(param.shape):
                        raise CheckpointError(f"{file}: {key} has shape {tuple(full.shape)}; this model's adapter"
                                         f" needs {tuple(param.shape)} per TP rank (lora.rank, the architecture)")
                    with torch.no_grad():
                        param.copy_(local.to(param.dtype))
    if unused and ps.get_pipeline_model_parallel_world_size() == 1:
        raise CheckpointError(f"{file}: {len(unused)} tensors match no adapter of the model (first: {sorted(unused)[0]})")


__all__ = ["export_peft", "load_peft", "read_peft_config"]
