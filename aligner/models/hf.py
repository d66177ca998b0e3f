"""Hugging Face checkpoints in and out, at any TP / PP / EP layout.

Import (:func:`load_hf_weights`, :func:`from_pretrained`): each rank opens the
safetensors files (single file or sharded with ``model.safetensors.index.json``) with
``safe_open`` and reads only the slices its parameters hold — its pipeline stage's layers,
its tensor-parallel rows / columns — so no rank ever materialises the whole model.

Name and layout mapping: the family's adapter (:mod:`aligner.models.architectures`) gives
every megatron-core parameter a rule (replicated, split over TP by rows or columns,
vocabulary rows, megatron-core's fused QKV and gated-MLP layouts); this module applies it
both ways. For the Llama layout:

- ``q_proj`` / ``k_proj`` / ``v_proj`` -> ``linear_qkv``: per query group, that group's
  query heads, then its key head, then its value head (megatron-core's GQA layout); a TP
  rank holds whole groups. Qwen2 biases the same way.
- ``gate_proj`` / ``up_proj`` -> ``linear_fc1``: a TP rank holds [its gate rows; its up rows].
- ``o_proj`` / ``down_proj`` -> ``linear_proj`` / ``linear_fc2``, split along the input.
- ``embed_tokens`` / ``lm_head`` -> vocabulary rows padded to ``padded_vocab_size`` (zeros),
  split over TP. Norms are replicated (``input_layernorm`` is ``linear_qkv.layer_norm_weight``
  under the TE spec, ``post_attention_layernorm`` likewise ``linear_fc1.layer_norm_weight``).
- ``score.weight`` (``*ForSequenceClassification``) -> the reward / value head.
- mixture of experts: the adapter maps expert ``e`` of a layer (its index over all the
  layer's experts); megatron-core's ``mlp.experts.local_experts.<i>`` on expert-parallel
  rank r is expert ``r * E/ep + i``, split over the expert-TP group like a dense MLP.

Export (:func:`export_hf`): tensors are gathered over the TP group (an expert's over the
expert-TP group, then over the expert-parallel group); the first TP and DP
rank of each pipeline stage writes that stage's shard
(``model-0000k-of-0000P.safetensors``), rank 0 writes the index, ``config.json`` (causal LM
or sequence classification with ``num_labels`` = head outputs) and the tokenizer files.
The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.models.architectures.base import GLU, QKV, Replicated, ScoreHead, Split, VocabRows
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_model, unwrap_model
from aligner.models.lora import adapters_merged
from aligner.parallel import get_device


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match the model."""


# ------------------------------------------------------------------------------ reading
class HFReader:
    """Lazy access to the tensors of an HF safetensors checkpoint folder.

    Every file is opened once up front (a missing or unreadable shard fails here, naming
    the file). Reads go through ``safe_open`` slices, so only the requested rows / columns
    are copied out of the memory-mapped file; :meth:`release` drops the open files (and
    with them the mapped pages a read touched), which the loader does after each tensor.
    """

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                unsafe = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
                hint = f" (found {unsafe}: pickle files are not read; convert them to safetensors)" if unsafe else ""
                raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}")
            files, weight_map = found, None
        self._handles = {}
        self.where: Dict[str, str] = {}
        for name in files:
            for key in self._open(name).keys():
                self.where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise CheckpointError(f"{self.path / name}: tensor {key!r} listed in the index is not in the file")
        self.release()

    def _open(self, name: str):
        from safetensors import safe_open

        handle = self._handles.get(name)
        if handle is None:
            fpath = self.path / name
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: shard listed in the index is missing")
            try:
                handle = safe_open(str(fpath), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{fpath}: cannot read safetensors file ({exc})") from None
            self._handles[name] = handle
        return handle

    def release(self) -> None:
        """Close the open files (unmapping them)."""
        self._handles.clear()

    def has(self, key: str) -> bool:
        return key in self.where

    def _slice(self, key: str):
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found in the checkpoint")
        return self._open(self.where[key]).get_slice(key)

    def shape(self, key: str) -> List[int]:
        return list(self._slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(key)[start:stop]

    def cols(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(key)[:, start:stop]

    def full(self, key: str) -> torch.Tensor:
        return self._slice(key)[:]


def _expect(reader: HFReader, key: str, shape: List[int]) -> None:
    have = reader.shape(key)
    if have != list(shape):
        raise CheckpointError(
            f"{reader.path / reader.where[key]}: tensor {key!r} has shape {have}, the config needs {list(shape)}"
        )


def _tp():
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _layer_index(module) -> int:
    return module.layer_number - 1  # megatron-core numbers layers from 1, globally


# The Transformer Engine spec fuses the layer's norms into the next linear layer.
_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


# megatron-core's routed experts: ``mlp.experts.local_experts.<i>.`` inside a layer, where
# ``i`` counts this expert-parallel rank's experts from 0; the family's rules count experts
# over the whole layer.
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


def _local_expert(name: str) -> Optional[int]:
    """The local expert index of a megatron parameter ``name`` (a full name), None for a
    parameter that is not a routed expert's."""
    parts = name.split(".", 3)
    if len(parts) < 4 or parts[:2] != ["decoder", "layers"]:
        return None
    match = _LOCAL_EXPERT.match(parts[3])
    return int(match.group(1)) if match else None


def _ep():
    """(expert-parallel size, rank)."""
    return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()


def _expert_tp():
    """(expert tensor-parallel size, rank): megatron-core splits each expert's MLP over its
    own expert-TP group (the TP group unless ``expert_tensor_parallel_size`` says otherwise)."""
    return ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()


def _rule(cfg: ModelConfig, name: str, layer: int, head: Optional[str], ep_rank: Optional[int] = None):
    """The weight rule (:mod:`aligner.models.architectures.base`) of megatron parameter
    ``name`` (a full name; ``layer`` its global layer index, -1 outside the layers). A routed
    expert's local index is mapped to its index in the layer: expert-parallel rank ``ep_rank``
    (this rank's by default) holds experts ``ep_rank * E/ep`` to ``(ep_rank + 1) * E/ep - 1``."""
    adapter = cfg.architecture
    if layer < 0:
        rules = adapter.global_weights(cfg, head)
    else:
        local = _local_expert(name)
        name = name.split(".", 3)[3]  # decoder.layers.<i>.<name inside the layer>
        name = _TE_NORM_NAMES.get(name, name)
        if local is not None:
            ep, rank = _ep()
            first = (rank if ep_rank is None else ep_rank) * (cfg.num_experts // ep)
            name = _LOCAL_EXPERT.sub(f"mlp.experts.local_experts.{first + local}.", name, count=1)
        rules = adapter.layer_weights(cfg, layer)
    if name not in rules:
        raise CheckpointError(f"no HF counterpart known for parameter {name!r} of a {cfg.arch} model")
    return rules[name]


def _local_tensor(reader: HFReader, cfg: ModelConfig, rule,
                  tp_layout: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """This rank's shard of a megatron parameter, read by its rule from the checkpoint
    (``tp_layout``: the (size, rank) it is split over, the TP group's by default)."""
    tp, rank = tp_layout or _tp()
    for key, shape in rule.hf_shapes().items():
        _expect(reader, key, list(shape))
    if isinstance(rule, Replicated):
        return reader.full(rule.name)
    if isinstance(rule, ScoreHead):
        if not reader.has(rule.name):
            raise CheckpointError(f"{reader.path}: no {rule.name!r}: not a sequence-classification checkpoint")
        return reader.full(rule.name)
    if isinstance(rule, Split):
        per = rule.shape[rule.dim] // tp
        read = reader.rows if rule.dim == 0 else reader.cols
        return read(rule.name, rank * per, (rank + 1) * per)
    if isinstance(rule, VocabRows):
        vocab, h = rule.shape
        per = cfg.padded_vocab_size() // tp
        start = rank * per
        out = torch.zeros(per, h)
        real = max(0, min(start + per, vocab) - start)
        if real:
            out[:real] = reader.rows(rule.name, start, start + real).float()
        return out
    if isinstance(rule, QKV):
        d, r, tail = rule.head_dim, rule.heads // rule.groups, rule.tail
        per = rule.groups // tp
        g0 = rank * per
        if rule.fused:  # [q; k; v] rows of one tensor
            q_key = k_key = v_key = rule.fused
            k_at, v_at = rule.heads * d, (rule.heads + rule.groups) * d
        else:
            q_key, k_key, v_key, k_at, v_at = rule.q, rule.k, rule.v, 0, 0
        q = reader.rows(q_key, g0 * r * d, (g0 + per) * r * d).reshape(per, r * d, *tail)
        k = reader.rows(k_key, k_at + g0 * d, k_at + (g0 + per) * d).reshape(per, d, *tail)
        v = reader.rows(v_key, v_at + g0 * d, v_at + (g0 + per) * d).reshape(per, d, *tail)
        return torch.cat((q, k, v), dim=1).reshape(per * (r + 2) * d, *tail)
    if isinstance(rule, GLU):
        per = rule.ffn // tp
        if rule.fused:  # [gate; up] rows of one tensor
            gate_key, up_key, up_at = rule.fused, rule.fused, rule.ffn
        else:
            gate_key, up_key, up_at = rule.gate, rule.up, 0
        return torch.cat((reader.rows(gate_key, rank * per, (rank + 1) * per),
                          reader.rows(up_key, up_at + rank * per, up_at + (rank + 1) * per)), 0)
    raise CheckpointError(f"unknown weight rule {rule!r}")


def _param_sources(model):
    """(megatron parameter name, parameter, global layer index or -1); LoRA adapters left out."""
    model = unwrap_model(model)
    layer_of = {}
    if getattr(model, "decoder", None) is not None:
        for i, layer in enumerate(model.decoder.layers):
            layer_of[f"decoder.layers.{i}."] = _layer_index(layer)
    for name, param in model.named_parameters():
        if getattr(param, "lora", False):  # adapters have their own export (aligner.models.lora)
            continue
        layer = -1
        for prefix, idx in layer_of.items():
            if name.startswith(prefix):
                layer = idx
                break
        yield name, param, layer


def hf_tensor_names(cfg: ModelConfig, head: Optional[str] = None) -> List[str]:
    """Names of the HF tensors of the whole model ``cfg`` describes (causal LM, or with a
    head the sequence-classification model)."""
    names = list(cfg.architecture.hf_shapes(cfg, head))
    return names + (["score.weight"] if head else [])


def _check_no_unused_tensors(reader: "HFReader", cfg: ModelConfig, head: Optional[str]) -> None:
    """Every checkpoint tensor has a place in the model: a bias, an extra layer or another
    architecture's tensor is an error, never silently dropped."""
    known = set(hf_tensor_names(cfg, head))
    # also fine: the other kind of output (an LM checkpoint under a head, a head under an
    # LM), a tied model's copy of the embedding, rotary buffers of older checkpoints
    known |= {"lm_head.weight", "score.weight"}
    unused = sorted(k for k in reader.where if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(
            f"{reader.path / reader.where[unused[0]]}: tensor {unused[0]!r}{more} has no place in a"
            f" {cfg.arch} model with {cfg.num_layers} layers as config.json describes it"
        )


def load_hf_weights(models, path, cfg: ModelConfig, head: Optional[str] = None, strict_head: bool = False) -> None:
    """Copy an HF checkpoint's weights into this rank's model chunks.

    A reward / value model loads from a sequence-classification checkpoint (head
    included) or from a causal LM (backbone only; the head keeps its initialisation,
    unless ``strict_head``). A causal LM ignores a ``score.weight``.
    """
    reader = HFReader(path)
    _check_no_unused_tensors(reader, cfg, head)
    models = models if isinstance(models, (list, tuple)) else [models]
    with torch.no_grad():
        for model in models:
            for name, param, layer in _param_sources(model):
                if name == "head.weight" and not reader.has("score.weight") and not strict_head:
                    continue
                tp_layout = _expert_tp() if _local_expert(name) is not None else None
                value = _local_tensor(reader, cfg, _rule(cfg, name, layer, head), tp_layout)
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{reader.path}: parameter {name!r} (layer {layer}) needs shape {tuple(param.shape)},"
                        f" the checkpoint gives {tuple(value.shape)}"
                    )
                param.copy_(value.to(param.dtype))
                del value
                reader.release()


def head_outputs(path) -> int:
    """Number of outputs of the score head of the HF folder ``path``: the rows of its
    ``score.weight`` (transformers leaves ``num_labels`` out of config.json, id2label carries
    it), else the size of config.json's ``id2label``, else 1."""
    reader = HFReader(path)
    if reader.has("score.weight"):
        return reader.shape("score.weight")[0]
    hf_config = json.loads((Path(path) / "config.json").read_text())
    return len(hf_config.get("id2label") or {}) or 1


def read_export_metadata(path) -> dict:
    """What an HF folder records about how its model was trained (:data:`METADATA_FILE`,
    written by :func:`export_hf`): e.g. ``template``, ``attribute_weights``; plus ``labels``,
    the score head's output names from config.json's ``id2label`` when they are not
    transformers' placeholders ``LABEL_i``. Empty for a folder with neither."""
    path = Path(path)
    meta = {}
    side = path / METADATA_FILE
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{side}: not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{side}: expected a JSON object")
    config = path / "config.json"
    if "labels" not in meta and config.is_file():
        id2label = json.loads(config.read_text()).get("id2label") or {}
        try:
            labels = [id2label[k] for k in sorted(id2label, key=int)]
        except (ValueError, TypeError):
            raise CheckpointError(f"{config}: id2label keys must be integers, got {sorted(id2label)}") from None
        if labels and labels != [f"LABEL_{i}" for i in range(len(labels))]:
            meta["labels"] = labels
    return meta


def from_pretrained(path, head: Optional[str] = None, num_outputs: Optional[int] = None,
                    params_dtype: torch.dtype = torch.float32, **build_kwargs):
    """(model chunks, ModelConfig) for the current parallel layout with weights from ``path``."""
    cfg = ModelConfig.from_hf(path)
    if head is not None and num_outputs is None:
        num_outputs = head_outputs(path)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if not vpp else list(range(vpp))
    models = [
        build_model(cfg, head=head, num_outputs=num_outputs or 1, params_dtype=params_dtype, vp_stage=s, **build_kwargs)
        .to(get_device())
        for s in stages
    ]
    load_hf_weights(models, path, cfg, head=head)
    return models, cfg


# ------------------------------------------------------------------------------ export
def _gather_parts(t: torch.Tensor, expert: bool = False) -> List[torch.Tensor]:
    """Every TP rank's shard of ``t``, in rank order (over the expert-TP group for a
    routed expert's parameter)."""
    tp, _ = _expert_tp() if expert else _tp()
    if tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(tp)]
    group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _hf_tensors(rule, t: torch.Tensor, expert: bool = False):
    """(HF name, full tensor) pairs of one megatron parameter's shard ``t`` (collective
    over TP, or expert TP, for split rules)."""
    def gather(x, dim):
        return torch.cat(_gather_parts(x, expert), dim)

    if isinstance(rule, (Replicated, ScoreHead)):
        yield rule.name, t
    elif isinstance(rule, Split):
        yield rule.name, gather(t, rule.dim)
    elif isinstance(rule, VocabRows):
        yield rule.name, gather(t, 0)[: rule.shape[0]]
    elif isinstance(rule, QKV):
        d, r, tail = rule.head_dim, rule.heads // rule.groups, rule.tail
        grouped = gather(t, 0).reshape(rule.groups, (r + 2) * d, *tail)
        q = grouped[:, : r * d].reshape(-1, *tail)
        k = grouped[:, r * d: (r + 1) * d].reshape(-1, *tail)
        v = grouped[:, (r + 1) * d:].reshape(-1, *tail)
        if rule.fused:
            yield rule.fused, torch.cat((q, k, v), 0)
        else:
            yield from ((rule.q, q), (rule.k, k), (rule.v, v))
    elif isinstance(rule, GLU):
        parts = _gather_parts(t, expert)  # each TP rank holds [its gate rows; its up rows]
        gate = torch.cat([x[: x.shape[0] // 2] for x in parts], 0)
        up = torch.cat([x[x.shape[0] // 2:] for x in parts], 0)
        if rule.fused:
            yield rule.fused, torch.cat((gate, up), 0)
        else:
            yield from ((rule.gate, gate), (rule.up, up))
    else:
        raise CheckpointError(f"unknown weight rule {rule!r}")


def _iter_hf_tensors(model, cfg: ModelConfig):
    """(HF name, full tensor) for this pipeline stage's part of ``model``, one parameter at
    a time (collective over TP: every TP rank iterates in the same order). A tied output
    layer writes nothing (HF ties ``lm_head`` to the embedding)."""
    head = unwrap_model(model).head_type
    ep, _ = _ep()
    for name, param, layer in _param_sources(model):
        t = param.detach().float().cpu() if param.device.type != "cpu" else param.detach().float()
        if name == "output_layer.weight" and cfg.tie_word_embeddings:
            continue
        if _local_expert(name) is None:
            yield from _hf_tensors(_rule(cfg, name, layer, head), t)
            continue
        # a routed expert: every expert-parallel rank holds the same local index of its
        # own experts; gathered over the EP group, each becomes its expert's HF tensors
        parts = [t]
        if ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
        for ep_rank, part in enumerate(parts):
            yield from _hf_tensors(_rule(cfg, name, layer, head, ep_rank), part, expert=True)


def _iter_all_hf_tensors(models, cfg: ModelConfig):
    for m in models:
        yield from _iter_hf_tensors(m, cfg)


def process_umask() -> int:
    """The process's file-mode creation mask (read from /proc where it can be, since
    ``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Dict[str, torch.Tensor], path) -> None:
    """``safetensors.torch.save_file`` with the mode a plain ``open`` would give the file.
    safetensors writes a private temporary file (mode 0600) and renames it, so without this
    an export on a shared filesystem is unreadable to anyone else whatever the umask."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~process_umask())

METADATA_FILE = "aligner_config.json"
"""Beside config.json: how the model was trained (see :func:`export_hf`'s ``metadata``)."""

# Files of a model folder that are weights or model config, never copied as "tokenizer files".
_NOT_TOKENIZER = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", METADATA_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def _tokenizer_files(tokenizer_dir) -> List[Path]:
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: tokenizer folder not found")
    files = [f for f in sorted(d.iterdir())
             if f.is_file() and f.name not in _NOT_TOKENIZER and not f.name.endswith(_WEIGHT_SUFFIXES)]
    if not any(f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt") for f in files):
        raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)")
    return files


def export_hf(models, cfg: ModelConfig, out_dir, tokenizer_dir=None, head: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 4 * 2**30,
              metadata: Optional[dict] = None) -> Path:
    """Write an HF folder loadable by ``transformers`` (collective: every rank calls it).

    ``head``: None exports what the model is (causal LM, or a score head as
    ``*ForSequenceClassification``); given, it must match the model. A head model needs
    ``cfg.pad_token_id``: HF reads the score at the last token that is not the pad id,
    which is the last real token of a right-padded row as long as the pad id does not
    also end the real text (pad = eos with an eos-terminated sequence would move HF one
    token back). ``tokenizer_dir``: its files (everything but weights and config.json)
    are copied. ``dtype``: of the written tensors; None keeps the model's parameter dtype.
    Parameters are gathered over TP one at a time; each pipeline stage's first TP / DP
    rank writes that stage's tensors in files of at most ``max_shard_bytes`` (one file:
    ``model.safetensors``; more: ``model-0000k-of-0000n.safetensors`` and the index), so no
    rank holds more than one file's worth, and the folder must be on a filesystem every
    stage sees. ``metadata``: how the model was trained, written (JSON) to
    :data:`METADATA_FILE` and read back by :func:`read_export_metadata`: the training loop
    records ``template`` (the data template, resolved) and for reward models ``labels`` (the
    head's output names, which also become config.json's ``id2label``) and
    ``attribute_weights`` (name -> weight of the scalar reward ``r = w · ŷ``).
    """
    models = models if isinstance(models, (list, tuple)) else [models]
    model_head = unwrap_model(models[0]).head_type
    if dtype is None:
        dtype = unwrap_model(models[0]).config.params_dtype
    if head is None:
        head = model_head
    elif head != model_head:
        raise ValueError(f"export_hf: head={head!r}, but the model has head {model_head!r}")
    if head is not None and cfg.pad_token_id is None:
        raise ValueError("export_hf: a reward / value model needs model.pad_token_id (HF's"
                         " sequence classification finds the last token through it)")
    labels = (metadata or {}).get("labels")
    if labels is not None and (head is None or len(labels) != unwrap_model(models[-1]).num_outputs):
        raise ValueError(f"export_hf: metadata labels {list(labels)} do not name the outputs of the model's head"
                         f" ({'none' if head is None else unwrap_model(models[-1]).num_outputs})")
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    # Stream: gather one parameter at a time; the stage's writer packs the tensors into
    # files of at most max_shard_bytes, so no rank holds more than one file's worth.
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    written: List[Tuple[str, List[str], int]] = []  # (file name, tensor names, bytes)
    buffer: Dict[str, torch.Tensor] = {}
    num_labels = 1

    def flush():
        if buffer:
            part = f"stage{pp_rank:05d}-part{len(written):05d}.safetensors"
            save_safetensors(buffer, tmp / part)
            written.append((part, sorted(buffer), sum(t.nbytes for t in buffer.values())))
            buffer.clear()

    with adapters_merged(models):  # a LoRA model exports merged (docs/lora.md)
        for name, tensor in _iter_all_hf_tensors(models, cfg):
            if name == "score.weight":
                num_labels = int(tensor.shape[0])
            if not writer:
                continue
            tensor = tensor.to(dtype).contiguous()
            if buffer and sum(t.nbytes for t in buffer.values()) + tensor.nbytes > max_shard_bytes:
                flush()
            buffer[name] = tensor
    flush()
    # rank 0 names the files in stage order and writes the index
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, (pp_rank, written))
    else:
        gathered = [(pp_rank, written)]
    head_labels = [num_labels]
    if dist.is_initialized() and pp > 1:
        dist.broadcast_object_list(head_labels, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    if rank == 0:
        parts = [f for _, files in sorted(gathered, key=lambda x: x[0]) for f in files]
        total = len(parts)
        if total == 1:
            os.replace(tmp / parts[0][0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (part, names, _) in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                os.replace(tmp / part, tmp / final)
                weight_map.update({k: final for k in names})
            size = sum(nbytes for _, _, nbytes in parts)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        hf_cfg = cfg.to_hf_dict(head=head, num_labels=head_labels[0])
        hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        labels = (metadata or {}).get("labels")
        if head is not None and labels:
            hf_cfg["id2label"] = {str(i): name for i, name in enumerate(labels)}
            hf_cfg["label2id"] = {name: i for i, name in enumerate(labels)}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        if metadata:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)  # content only: the new file's mode follows the umask
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
