"""LoRA adapters on megatron-core's parallel linear layers (docs/lora.md).

LoRA (Hu et al. 2021, arXiv:2106.09685) adds a trainable low-rank path to a frozen linear
layer ``W [out, in]``::

    y = x · Wᵀ + scaling · (dropout(x) · Aᵀ) · Bᵀ,   A [r, in], B [out, r]
    scaling = alpha / r   (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: alpha / sqrt(r))

with PEFT's initialisation: A kaiming-uniform (a = sqrt(5)), B zeros, so a fresh adapter
leaves the model unchanged. One adapter per HF module, as PEFT has them: the fused
``linear_qkv`` carries three (``q_proj``, ``k_proj``, ``v_proj``), a gated ``linear_fc1`` two
(``gate_proj``, ``up_proj``); their names are the family's HF names (the weight rules of
:mod:`aligner.models.architectures`), so the adapters export to and import from PEFT.

Sharding with TP (p ranks; b batch, s sequence, h hidden, r rank):

- column-parallel layer (``qkv``, ``fc1``): A [r, in] replicated, B split along its output
  rows exactly as the layer's weight is (for ``linear_qkv`` the rows of this rank's query
  groups, for ``linear_fc1`` this rank's gate and up rows). The low-rank activation
  x · Aᵀ [s, b, r] enters megatron-core's ``copy_to_tensor_model_parallel_region`` (identity
  forward, all-reduce of its gradient), so every rank's A gets the full gradient.
- row-parallel layer (``proj``, ``fc2``): A split along its input columns (the layer's input
  is split), B [out, r] replicated. The partial products x_i · A_iᵀ [s, b, r] are summed over
  TP (``reduce_from_tensor_model_parallel_region``), an all-reduce of r values per token
  where the layer's own output reduction is h.

Under PP each stage holds its own layers' adapters; under DP the adapters are ordinary
parameters of megatron-core's DDP. The adapter runs as a forward hook on the layer, so
the base parameters keep their names (HF import / export, checkpoints); the adapters of a
layer sit beside it in a :class:`LoraLinear` named ``lora_<target>`` (e.g.
``self_attention.lora_qkv``). :func:`apply_lora` adds them and freezes everything else
(a score head excepted: the head of a reward or value model is new and is trained);
:func:`adapters_disabled` gives the base model on the same weights (the reference);
:func:`adapters_merged` folds them into the base weights for a merged HF export.

Adapters go on plain ``ColumnParallelLinear`` / ``RowParallelLinear`` layers; a layer that
fuses a norm into the projection (Transformer Engine's spec, the post-norm families) and
sequence parallelism are refused, naming what was asked.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from aligner.models.architectures.base import GLU, QKV, Split

# target name -> (the layer's attribute path inside a TransformerLayer)
TARGETS: Dict[str, Tuple[str, str]] = {
    "qkv": ("self_attention", "linear_qkv"),
    "proj": ("self_attention", "linear_proj"),
    "fc1": ("mlp", "linear_fc1"),
    "fc2": ("mlp", "linear_fc2"),
}


@dataclass
class LoraSettings:
    """rank r, alpha, dropout on the adapter's input, rsLoRA scaling, targets (names of
    :data:`TARGETS`), seed of the A initialisation (a function of the seed and the HF
    module name only, so every layout starts from the same adapters)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: Tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def peft_init_a(rank: int, in_features: int, hf_module: str, seed: int) -> torch.Tensor:
    """PEFT's A initialisation: ``kaiming_uniform_(A, a=sqrt(5))`` on [r, in], drawn from a
    generator seeded by (seed, HF module name)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hf_module.encode()))
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


class LoraPart(torch.nn.Module):
    """The adapter of one HF module: this rank's ``lora_A`` and ``lora_B``.

    ``split``: ``"out"`` (B's rows ``rows`` of [out, r] held, A replicated) or ``"in"``
    (A's columns ``cols`` of [r, in] held, B replicated)."""

    def __init__(self, hf_module: str, in_features: int, out_features: int, settings: LoraSettings,
                 split: str, start: int, stop: int, dtype, device):
        super().__init__()
        self.hf_module, self.in_features, self.out_features, self.split = hf_module, in_features, out_features, split
        a = peft_init_a(settings.rank, in_features, hf_module, settings.seed)
        b = torch.zeros(out_features, settings.rank)
        if split == "out":
            b = b[start:stop]
        else:
            a = a[:, start:stop]
        self.lora_A = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = torch.nn.Parameter(b.to(device=device, dtype=dtype).contiguous())
        sharded, dim = (self.lora_B, 0) if split == "out" else (self.lora_A, 1)
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, dim, 1)
        replicated = self.lora_A if split == "out" else self.lora_B
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(replicated)
        for p in (self.lora_A, self.lora_B):
            p.lora = True  # HF import / export skip these (aligner.models.hf)


class LoraLinear(torch.nn.Module):
    """The adapters of one parallel linear layer, applied by a forward hook on it.

    Column-parallel: x [s, b, in] -> delta [s, b, out/p] in the layer's local row order;
    row-parallel: x [s, b, in/p] -> delta [s, b, out]. ``enabled`` False: no delta."""

    def __init__(self, layer: torch.nn.Module, rule, settings: LoraSettings, target: str):
        super().__init__()
        if type(layer) not in (ColumnParallelLinear, RowParallelLinear):
            raise ValueError(f"lora.targets: {target!r} is a {type(layer).__name__}; adapters go on megatron-core's"
                             " ColumnParallelLinear / RowParallelLinear (model.layer_spec = fused or local, a"
                             " pre-norm family)")
        if layer.config.sequence_parallel:
            raise ValueError("lora: parallel.sequence_parallel is not supported with adapters")
        self.column = isinstance(layer, ColumnParallelLinear)
        self.settings = settings
        self.scaling = settings.scaling
        self.dropout = settings.dropout
        self.enabled = True
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.tp, self.tp_rank = tp, rank
        weight = layer.weight
        dtype, device = weight.dtype, weight.device
        self.layout = type(rule).__name__
        self.parts = torch.nn.ModuleDict()
        self.groups = 1
        for key, hf_name, rows, cols in _hf_modules(rule):
            if self.column:
                per = rows // tp
                part = LoraPart(hf_name, cols, rows, settings, "out", rank * per, (rank + 1) * per, dtype, device)
            else:
                per = cols // tp
                part = LoraPart(hf_name, cols, rows, settings, "in", rank * per, (rank + 1) * per, dtype, device)
            self.parts[key] = part
        if isinstance(rule, QKV):
            self.groups = rule.groups // tp
        self._layer = [layer]  # in a list: not a submodule (its parameters are the base's)
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.enabled:
            return output
        out, bias = output
        return out + self.delta(args[0]).to(out.dtype), bias

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapter's input (training only), with the mask of the whole input
        width drawn from the default generator, which every TP rank seeds alike: a
        column-parallel layer's input is replicated and every rank draws the same mask; a
        row-parallel layer's input [s, b, in/p] is this rank's columns and takes its columns
        of that mask. So the masks are those of TP = 1 (docs/lora.md, "Dropout")."""
        if not self.training or self.dropout == 0:
            return x
        split = not self.column and self.tp > 1
        width = x.shape[-1] * self.tp if split else x.shape[-1]
        keep = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.dropout)
        if split:
            keep = keep[..., self.tp_rank * x.shape[-1]:(self.tp_rank + 1) * x.shape[-1]]
        return x * keep / (1.0 - self.dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropped(x)
        if not self.column:
            part = self.parts["w"]
            low = tensor_parallel.reduce_from_tensor_model_parallel_region(x @ part.lora_A.t())
            return (low @ part.lora_B.t()) * self.scaling
        outs = {}
        for key, part in self.parts.items():
            low = tensor_parallel.copy_to_tensor_model_parallel_region(x @ part.lora_A.t())
            outs[key] = (low @ part.lora_B.t()) * self.scaling
        return self._arrange(outs)

    def _arrange(self, outs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Column-parallel parts' outputs [..., out_k/p] -> [..., out/p] in the layer's row order."""
        lead = next(iter(outs.values())).shape[:-1]
        if self.layout == "QKV":  # per query group: [its queries; its key; its value] rows
            grouped = [outs[k].reshape(*lead, self.groups, -1) for k in ("q", "k", "v")]
            return torch.cat(grouped, dim=-1).reshape(*lead, -1)
        if self.layout == "GLU":  # [this rank's gate rows; its up rows]
            return torch.cat((outs["gate"], outs["up"]), dim=-1)
        return outs["w"]

    def weight_delta(self) -> torch.Tensor:
        """``scaling · B · A`` in the layer's local weight layout: [out/p, in] (column) or
        [out, in/p] (row); added to the weight it gives the merged layer."""
        if not self.column:
            part = self.parts["w"]
            return (part.lora_B @ part.lora_A) * self.scaling
        return self._arrange({k: ((p.lora_B @ p.lora_A) * self.scaling).t() for k, p in self.parts.items()}).t()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Adapters as megatron-core sharded tensors: the split factor along its TP axis."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axis = {f"parts.{k}.{'lora_B' if self.column else 'lora_A'}": 0 if self.column else 1 for k in self.parts}
        return make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)


def _hf_modules(rule) -> List[Tuple[str, str, int, int]]:
    """(key, HF module name, out features, in features) of the adapters a layer's weight
    rule asks for (module names without ``.weight``)."""
    def name(weight_name: str) -> str:
        return weight_name[: -len(".weight")]

    if isinstance(rule, QKV):
        if rule.fused:
            raise ValueError(f"lora: fused q/k/v ({rule.fused}) is not supported yet; target proj, fc1, fc2")
        h, d = rule.tail[0], rule.head_dim
        return [("q", name(rule.q), rule.heads * d, h), ("k", name(rule.k), rule.groups * d, h),
                ("v", name(rule.v), rule.groups * d, h)]
    if isinstance(rule, GLU):
        if rule.fused:
            raise ValueError(f"lora: fused gate/up ({rule.fused}) is not supported yet; target qkv, proj, fc2")
        return [("gate", name(rule.gate), rule.ffn, rule.hidden), ("up", name(rule.up), rule.ffn, rule.hidden)]
    if isinstance(rule, Split):
        return [("w", name(rule.name), rule.shape[0], rule.shape[1])]
    raise ValueError(f"lora: no adapter layout for weight rule {rule!r}")


def apply_lora(models: Sequence[torch.nn.Module], cfg, settings: LoraSettings) -> None:
    """Add adapters to the targets of every layer of ``models`` (this rank's chunks of a
    model of architecture ``cfg``) and freeze every other parameter but a score head."""
    for t in settings.targets:
        if t not in TARGETS:
            raise ValueError(f"lora.targets: unknown target {t!r}; expected some of {tuple(TARGETS)}")
    for model in models:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.decoder.layers:
            rules = cfg.architecture.layer_weights(cfg, layer.layer_number - 1)  # megatron counts from 1
            for target in settings.targets:
                parent_name, linear_name = TARGETS[target]
                parent = getattr(layer, parent_name)
                rule = rules[f"{parent_name}.{linear_name}.weight"]
                parent.add_module(f"lora_{target}", LoraLinear(getattr(parent, linear_name), rule, settings, target))
        if getattr(model, "head", None) is not None:
            model.head.weight.requires_grad_(True)


def share_base(models: Sequence[torch.nn.Module], base_models: Sequence[torch.nn.Module]) -> List[torch.nn.Parameter]:
    """Make ``models`` (this rank's chunks of a model of the same architecture, e.g. a value
    model) use the frozen base parameters of ``base_models`` (a model with adapters): every
    parameter of ``models`` but a score head is replaced by the one of the same name and
    shape in ``base_models``, so both run on one copy of the weights (the memory of
    ``models``' own base is released). Call it before :func:`apply_lora` on ``models``.
    Returns the shared parameters."""
    shared = []
    for model, base in zip(models, base_models):
        frozen = {n: p for n, p in base.named_parameters() if not p.requires_grad and not getattr(p, "lora", False)}
        for name, param in list(model.named_parameters()):
            if name.startswith("head."):
                continue
            source = frozen.get(name)
            if source is None or source.shape != param.shape or source.dtype != param.dtype:
                raise ValueError(f"lora: the base has no frozen parameter {name} of shape {tuple(param.shape)} to"
                                 " share (a second adapter set needs the policy's architecture)")
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._parameters[attr] = source
            shared.append(source)
    return shared


def lora_layers(models) -> Iterator[LoraLinear]:
    models = models if isinstance(models, (list, tuple)) else [models]
    for model in models:
        for m in model.modules():
            if isinstance(m, LoraLinear):
                yield m


def has_adapters(models) -> bool:
    return next(lora_layers(models), None) is not None


@contextlib.contextmanager
def adapters_disabled(models):
    """The base model on the same weights for the duration of the block (the reference
    policy of DPO / PPO / GRPO / SteerLM 2.0); the adapters come back on exit."""
    layers = list(lora_layers(models))
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


@contextlib.contextmanager
def adapters_merged(models):
    """The adapters folded into the base weights (``W + scaling · B · A``) and disabled for
    the duration of the block (a merged HF export); the base weights come back exactly on
    exit (kept aside meanwhile: one copy of the adapted layers' weights)."""
    layers = list(lora_layers(models))
    kept = []
    try:
        with torch.no_grad():
            for m in layers:
                weight = m._layer[0].weight
                kept.append((m, weight.detach().clone(), m.enabled))
                weight.add_(m.weight_delta().to(weight.dtype))
                m.enabled = False
        yield
    finally:
        with torch.no_grad():
            for m, weight, enabled in kept:
                m._layer[0].weight.copy_(weight)
                m.enabled = enabled


__all__ = ["LoraLinear", "LoraPart", "LoraSettings", "TARGETS", "adapters_disabled", "adapters_merged", "apply_lora",
           "has_adapters", "lora_layers", "peft_init_a", "share_base"]
