"""Layer specs: which implementation of a transformer layer's parts the model is built from.

Three specs build the same Llama-family layer (pre-norm attention and SwiGLU MLP, RMSNorm,
rotary embeddings); they differ in kernels only, so their outputs agree to rounding and
their checkpoints are interchangeable (see docs/configuration.md, ``model.layer_spec``):

- ``te``: megatron-core's Transformer Engine spec (fused norm + linear, TE attention, FP8
  capable). The production GPU path; needs ``transformer_engine`` and CUDA.
- ``fused``: megatron-core's own parallel linears, MLP and ``SelfAttention`` with torch's
  fused kernels where TE would put its own: attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (:class:`SDPAttention`: flash /
  memory-efficient kernels on a GPU, the fused flash kernel on a CPU) and norms through
  ``torch.nn.RMSNorm`` (:class:`SequenceParallelNorm`, i.e. ``F.rms_norm``), which also
  serve sequence parallelism; outside inference the rotary embedding is applied from
  cos / sin tables computed once per forward (:class:`RopeTablesSelfAttention`, the same
  arithmetic as megatron-core's per-layer rotation). Needs torch >= 2.5 (``rms_norm`` and
  grouped-query SDPA).
- ``local``: megatron-core's plain local spec (attention as explicit ``baddbmm`` + masked
  softmax + ``bmm``; no sequence parallelism), its attention extended by
  :class:`LocalAttention` with what megatron-core lacks (sliding windows combined with
  padding and packing masks, logit soft-capping). The reference the fused spec is tested
  against.

``auto`` (the default) picks ``te`` when it can run, else ``fused``, else ``local``
(:func:`resolve_layer_spec`). Context parallelism needs TE's attention (``te`` only).

The architecture families (:mod:`aligner.models.architectures`) describe what their layer
adds to the Llama layer as a :class:`LayerDesign`; :func:`build_layer_spec` builds it from
megatron-core's pieces where it has them (per-head q/k norms: ``qk_layernorm``; windows:
``window_size`` / ``window_attn_skip_freq``; ``1 + w`` norms: ``layernorm_zero_centered_gamma``;
partial rotary, activations) and from this module's where it does not, in both the fused
and the local spec: :class:`OnePlusNorm` (Gemma's RMSNorm, Nemotron's LayerNorm1p),
:class:`ProjectionRMSNorm` (OLMo 2's q/k norm over all heads), :class:`PostNormRowParallelLinear`
(norms after attention / MLP), :class:`LocalRopeSelfAttention` (Gemma 3's second rope),
windows joined to the layer's mask and attention-logit soft-capping (:class:`LocalAttention`,
:class:`SDPAttention`), :func:`gelu_tanh`, :func:`squared_relu`.

Notation: b batch, s (sq / sk) query / key sequence, np / ng attention heads / query groups
on this TP rank, d head size, h hidden size.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from aligner.models.kernels import LAYER_SPECS
from aligner.parallel import LayoutError

_DESCRIPTIONS = {
    "te": "Transformer Engine (megatron-core TE spec)",
    "fused": "megatron-core modules + torch scaled_dot_product_attention and rms_norm",
    "local": "megatron-core local spec (unfused attention)",
}


# ------------------------------------------------------------------ availability
def te_available() -> Tuple[bool, str]:
    """(True, "") when the TE spec can run here, else (False, why not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # a broken install counts as absent
        return False, f"transformer_engine not importable ({type(exc).__name__})"
    return True, ""


def fused_available() -> Tuple[bool, str]:
    """(True, "") when this torch has the kernels the fused spec is built on."""
    if not hasattr(F, "rms_norm"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.rms_norm (torch >= 2.4)"
    try:  # grouped-query attention without copying keys and values (torch >= 2.5)
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
    except TypeError:
        return False, f"torch {torch.__version__} scaled_dot_product_attention has no enable_gqa (torch >= 2.5)"
    return True, ""


def resolve_layer_spec(requested: str = "auto") -> str:
    """``model.layer_spec`` -> the spec that will be built: ``te``, ``fused`` or ``local``.

    ``auto``: te if it can run, else fused, else local. An explicit choice that cannot run
    here raises ``ValueError`` naming the key and the reason.
    """
    if requested not in LAYER_SPECS:
        raise ValueError(f"model.layer_spec = {requested!r}; expected one of {LAYER_SPECS}")
    te_ok, te_why = te_available()
    fused_ok, fused_why = fused_available()
    if requested == "auto":
        return "te" if te_ok else ("fused" if fused_ok else "local")
    if requested == "te" and not te_ok:
        raise ValueError(f"model.layer_spec = te needs Transformer Engine on a GPU: {te_why}")
    if requested == "fused" and not fused_ok:
        raise ValueError(f"model.layer_spec = fused: {fused_why}")
    return requested


def describe_layer_spec(requested: str = "auto") -> str:
    """One line for reports: the spec in use, what it is and why it was chosen."""
    try:
        name = resolve_layer_spec(requested)
    except ValueError as exc:
        return f"error: {exc}"
    line = f"{name}: {_DESCRIPTIONS[name]}"
    if requested == "auto" and name != "te":
        line += f" (auto; TE spec unavailable: {te_available()[1]})"
    elif requested != "auto":
        line += " (model.layer_spec)"
    return line


def check_parallel_support(spec: str, *, sequence_parallel: bool = False, context_parallel: int = 1) -> None:
    """Raise :class:`aligner.parallel.LayoutError` with a one-line reason when ``spec``
    cannot run this layout."""
    if context_parallel > 1 and spec != "te":
        raise LayoutError(
            f"parallel.cp = {context_parallel} needs Transformer Engine's context-parallel attention;"
            f" the {spec!r} layer spec has none (use parallel.cp = 1 or a TE install on GPUs)"
        )
    if sequence_parallel and spec == "local":
        raise LayoutError(
            "parallel.sequence_parallel = true is not supported by the 'local' layer spec (torch norms"
            " without sequence-parallel gradients); use model.layer_spec = fused or auto"
        )


_ANNOUNCED = set()


def announce_layer_spec(spec: str, requested: str = "auto") -> None:
    """Say once per process (on global rank 0) which spec the model is built with."""
    if spec in _ANNOUNCED:
        return
    _ANNOUNCED.add(spec)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"aligner: layer spec {describe_layer_spec(requested)}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ fused modules
class SequenceParallelNorm:
    """``torch.nn.RMSNorm`` (``LayerNorm`` for ``normalization="LayerNorm"``) built from a
    megatron-core ``TransformerConfig`` like megatron-core's ``WrappedTorchNorm``, with
    sequence parallelism supported instead of refused.

    Forward: ``x`` [s/p, b, h] (sequence-parallel) or [s, b, h] -> same shape; RMSNorm is
    ``x / sqrt(mean(x^2) + eps) * weight`` (statistics in fp32 for bf16 inputs, inside
    ``F.rms_norm``). Under sequence parallelism each TP rank normalises its own s/p tokens,
    so its weight gradient is a partial sum over tokens: the weight is tagged
    ``sequence_parallel`` and megatron-core's ``finalize_model_grads`` all-reduces it over
    the TP group, as it does for its own sequence-parallel norms. The weight is created in
    ``config.params_dtype`` (bf16 models get bf16 norms, as TE and HF have them). With
    ``layernorm_zero_centered_gamma`` it is an :class:`OnePlusNorm` (the scale is 1 + w).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.memory_efficient_layer_norm:
            raise ValueError("the fused layer spec's norm has no memory-efficient variant")
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"the fused layer spec supports RMSNorm and LayerNorm, not {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            norm = OnePlusNorm(hidden_size, eps, rms=config.normalization == "RMSNorm", dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, bias=True, dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class OnePlusNorm(torch.nn.Module):
    """A norm whose scale is ``1 + w`` (megatron-core's ``layernorm_zero_centered_gamma``):
    Gemma's RMSNorm ``x / sqrt(mean(x^2) + eps) · (1 + w)``, computed in fp32 and cast back
    as transformers does, and Nemotron's LayerNorm1p ``layer_norm(x; 1 + w, b)``. The
    weight is stored as w (HF's tensor; zeros are the identity scale). x [..., h] -> same.
    """

    def __init__(self, hidden_size: int, eps: float, rms: bool, dtype=torch.float32):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.bias = None if rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, self.weight.shape, self.weight + 1.0, self.bias, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over a whole query or key projection, every head together (OLMo 2's
    ``q_norm`` / ``k_norm``), on the heads this TP rank holds: x [sq, b, n/p, d] -> same,
    ``x / sqrt(mean(x^2) + eps) · w`` with the mean over all n·d features of every rank (the
    partial sums all-reduced over TP, forward and backward) and w [n/p · d] this rank's
    slice of HF's [n · d] (split over TP like the heads; checkpointed as split).

    Built as a ``q_layernorm`` / ``k_layernorm`` submodule with ``params={"which": "q"}`` or
    ``"k"`` (megatron-core's own qk norms normalise each head on its own).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, which: str = "q"):
        super().__init__()
        heads = config.num_attention_heads if which == "q" else config.num_query_groups
        self.tp_size = config.tensor_model_parallel_size
        self.width = heads * config.kv_channels
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.width // self.tp_size, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float().flatten(-2)  # [sq, b, n/p · d]
        sum_sq = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            # every rank's output depends on every rank's sum: all-reduce both ways
            sum_sq = tensor_parallel.copy_to_tensor_model_parallel_region(
                tensor_parallel.reduce_from_tensor_model_parallel_region(sum_sq))
        y = flat * torch.rsqrt(sum_sq / self.width + self.eps)
        return (self.weight * y).to(x.dtype).view_as(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   {"weight": 0}, sharded_offsets)


class PostNormRowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` with a norm on its output: the norm a family
    puts after attention or the MLP, before the residual add (Gemma's
    ``post_attention_layernorm`` / ``post_feedforward_layernorm``, OLMo 2's post norms).
    x [s, b, in/p] -> (norm(x · Wᵀ) [s, b, h], None); the norm's weight is replicated
    (tagged for sequence parallelism like the layer's other norms). Built with
    ``params={"post_norm": <norm class>}``; the layers of these families have no biases.
    """

    def __init__(self, input_size, output_size, *, config, post_norm, **kwargs):
        from megatron.core.transformer.spec_utils import build_module

        if kwargs.get("bias"):
            raise ValueError("a post-normed projection takes no bias")
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_norm = build_module(post_norm, config=config, hidden_size=output_size,
                                      eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, _ = super().forward(x, *args, **kwargs)
        return self.post_norm(out), None


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_pytorch_tanh``, Gemma's GeGLU)."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2`` (transformers' ``relu2``, Nemotron); megatron-core's own is compiled."""
    return torch.square(F.relu(x))


# ------------------------------------------------------------------ attention
def layer_window(config, layer_number: int) -> Optional[int]:
    """How many keys a query of layer ``layer_number`` (1-based) sees under sliding-window
    attention, itself included (HF's ``sliding_window``), or None for full attention.
    Windows are megatron-core's ``window_size = (window - 1, 0)``, on the layers
    ``window_attn_skip_freq`` selects (None: all)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        left, right = config.window_size
        if right != 0 or left < 0:
            raise ValueError(f"window_size {config.window_size}: only causal windows (w - 1, 0) are supported")
        return left + 1
    return None


def window_blocked(sq: int, sk: int, window: int, device) -> torch.Tensor:
    """Causal sliding-window mask [sq, sk], True = blocked: query i sits at key position
    ``i + sk - sq`` (queries after a KV cache are the last ones) and sees the ``window`` keys
    ending there, as HF's ``kv_idx > q_idx - sliding_window`` on cache positions."""
    q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    k_pos = torch.arange(sk, device=device)[None, :]
    return (k_pos > q_pos) | (k_pos <= q_pos - window)


def soft_cap(scores: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Gemma 2's logit soft-capping ``cap * tanh(scores / cap)`` (identity for None)."""
    return scores if not cap else torch.tanh(scores / cap) * cap


class _WindowedSoftmax(torch.nn.Module):
    """megatron-core's ``FusedScaleMaskSoftmax`` (scores [b, np, sq, sk] -> probabilities)
    with the attention-logit soft-cap applied to the scaled scores first and the sliding
    window added to whatever mask the layer gets (megatron-core's own window replaces the
    mask instead, which would drop padding and packing masks)."""

    def __init__(self, softmax, window: Optional[int], softcap: Optional[float]):
        super().__init__()
        softmax.window_size = None  # the window is part of the mask given to it
        self.softmax, self.window, self.softcap = softmax, window, softcap

    def forward(self, scores, mask, softmax_offset=None):
        if self.softcap:
            scores = soft_cap(scores.float(), self.softcap)
        if self.window is not None:
            blocked = window_blocked(scores.shape[2], scores.shape[3], self.window, scores.device)
            mask = blocked[None, None] if mask is None else (mask | blocked)
        return self.softmax(scores, mask, softmax_offset)


class LocalAttention(DotProductAttention):
    """megatron-core's unfused ``DotProductAttention`` (the local spec's) plus what it
    lacks: a sliding window combined with the layer's mask (:func:`layer_window`) and
    attention-logit soft-capping (``softcap``, Gemma 2). Same shapes and checkpoint keys::

        query [sq, b, np, hn], key / value [sk, b, ng, hn]  ->  context [sq, b, np·hn]
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softcap: Optional[float] = None,
                 **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        self.window = layer_window(config, self.layer_number)
        self.softcap = softcap
        self.scale_mask_softmax = _WindowedSoftmax(self.scale_mask_softmax, self.window, softcap)


def rotary_for_layer(rotary_pos_emb, config, layer_number: int):
    """The rotary frequencies of one layer. A model with a local rope (Gemma 3) passes
    [s, b, 2, d]: the global rope's, then the local one's, which the sliding-window layers
    take; any other model passes [s, b, 1, d], used as it is."""
    if rotary_pos_emb is None or isinstance(rotary_pos_emb, tuple) or rotary_pos_emb.shape[2] == 1:
        return rotary_pos_emb
    local = layer_window(config, layer_number) is not None
    return rotary_pos_emb[:, :, 1:2] if local else rotary_pos_emb[:, :, 0:1]


class LocalRopeSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` for a model with two ropes (Gemma 3): a
    sliding-window layer rotates queries and keys with the local rope, the others with the
    global one (:func:`rotary_for_layer`). Everything else is megatron-core's."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        rotary_pos_emb = rotary_for_layer(rotary_pos_emb, self.config, self.layer_number)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


_ROPE_TABLES: list = [None, None]  # (the last rotary frequencies seen, their cos / signed-sin tables)


def rope_tables(freqs: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of megatron-core's rotary frequencies ``freqs`` [s, b or 1, 1, r]
    in ``dtype``: ``cos(freqs)`` and ``[-sin1, sin2]`` (the halves of ``sin(freqs)``), the
    tables of :func:`rotate`. A model's forward passes one frequency tensor to every layer:
    the tables of the last one are kept and served again while the same tensor comes."""
    cached, tables = _ROPE_TABLES
    if cached is freqs and tables[0].dtype == dtype:
        return tables
    half = freqs.shape[-1] // 2
    sin = torch.sin(freqs)
    tables = (torch.cos(freqs).to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype))
    _ROPE_TABLES[:] = [freqs, tables]
    return tables


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding of ``x`` [..., d] on its first r = ``cos.shape[-1]``
    dimensions (the rest pass: partial rotary): megatron-core's ``x * cos +
    rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, written as ``x * cos +
    roll(x, r/2) * [-sin1, sin2]`` (the same products and sum, three kernels)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(r // 2, dims=-1), sin_signed)
    rot = x[..., :r]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(r // 2, dims=-1), sin_signed), x[..., r:]), dim=-1)


class RopeTablesSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` (the fused spec's) with the rotary embedding of a
    forward outside an inference context applied from tables computed once per model
    forward (:func:`rope_tables`, :func:`rotate`) instead of megatron-core's per-layer
    ``cos`` / ``sin`` and half rotation for queries and keys; the same arithmetic. Inference
    (a KV cache: megatron-core stores keys before rotation), packed THD sequences, context
    parallelism, interleaved or YaRN-scaled rotary embedding and layers without rope keep
    megatron-core's path."""

    _rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _own_rope(self, freqs, kwargs) -> bool:
        c = self.config
        return (torch.is_tensor(freqs) and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None and kwargs.get("packed_seq_params") is None
                and c.context_parallel_size == 1 and not c.rotary_interleaved and not c.apply_rope_fusion
                and not getattr(c, "multi_latent_attention", False) and not getattr(c, "flash_decode", False)
                and not hasattr(c, "yarn_rotary_scaling_factor")  # YaRN's mscale
                and not (c.no_rope_freq and c.no_rope_freq[self.layer_number - 1]))

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        freqs = kwargs.get("rotary_pos_emb")
        if args or not self._own_rope(freqs, kwargs):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        self._rope = rope_tables(freqs, hidden_states.dtype)
        try:
            return super().forward(hidden_states, attention_mask, **dict(kwargs, rotary_pos_emb=None))
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope is None:
            return out
        query, key = out[0], out[1]  # [s, b, np or ng, d]
        return (rotate(query, *self._rope), rotate(key, *self._rope)) + tuple(out[2:])


_FLASH_DTYPES = (torch.float16, torch.bfloat16)

# window (None or keys) -> (weak reference to the last attention_mask seen, its _version,
# inference mode, sq, sk, its derived masks)
_SDPA_MASKS: dict = {}


def sdpa_masks(attention_mask: torch.Tensor, sq: int, sk: int, window: Optional[int]):
    """SDPA's boolean mask (True = attend) [b or 1, 1, sq, sk] from megatron-core's
    ``attention_mask`` (True = blocked) joined with a sliding window's blocked keys
    (:func:`window_blocked`), and the query rows that see no key ([b or 1, 1, sq, 1], True;
    None where the mask is on the CPU and every row sees a key).

    A row with no visible key gets megatron-core's masked-softmax result: equal weight on
    every key (and no gradient into its query or the keys). SDPA gives that for an
    all-visible row whose query is zero (the caller zeroes those rows of q). On a GPU the
    rows are always returned (zeroing a copy of q needs no host sync); on a CPU, where the
    check costs nothing, only when some row is hidden.

    Every layer of a forward gets the same mask tensor: the result for it is computed by
    the first layer and served to the others (one entry per window, since windowed and
    full layers alternate in some families). The entry holds the mask only weakly and is
    dropped when the mask is freed, so a tensor id cannot be reused while its entry lives;
    a write into the mask in place changes its ``_version`` and the entry is recomputed, as
    it is when inference mode or the shapes differ. A mask made in inference mode (the
    rollout's) has no version counter and is derived in every layer, as before."""
    kept = not attention_mask.is_inference()  # an inference tensor has no version counter
    inference = torch.is_inference_mode_enabled()
    entry = _SDPA_MASKS.get(window) if kept else None
    if (entry is not None and entry[0]() is attention_mask and entry[1] == attention_mask._version
            and entry[2:5] == (inference, sq, sk)):
        return entry[5]
    if window is not None:
        blocked = attention_mask | window_blocked(sq, sk, window, attention_mask.device)[None, None]
    else:
        blocked = attention_mask
    allowed = ~blocked
    hidden = ~allowed.any(dim=-1, keepdim=True)  # [b, 1, sq, 1]
    derived = (allowed | hidden, hidden)
    if attention_mask.device.type == "cpu" and not bool(hidden.any()):
        derived = (allowed, None)  # allowed | hidden is allowed itself
    if not kept:
        return derived
    _SDPA_MASKS[window] = (weakref.ref(attention_mask, functools.partial(_forget_sdpa_masks, window)),
                           attention_mask._version, inference, sq, sk, derived)
    return derived


def _forget_sdpa_masks(window, ref) -> None:
    entry = _SDPA_MASKS.get(window)
    if entry is not None and entry[0] is ref:
        del _SDPA_MASKS[window]


class SDPAttention(DotProductAttention):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    A megatron-core ``DotProductAttention`` (same constructor, scale, head bookkeeping and
    checkpoint keys) whose forward calls torch's fused kernel instead of materialising the
    [b·np, sq, sk] score matrix::

        query [sq, b, np, hn], key / value [sk, b, ng, hn]  ->  context [sq, b, np·hn]

    Masks follow megatron-core's convention (boolean, True = blocked), with the local
    spec's semantics:

    - ``attention_mask`` [b or 1, 1, sq, sk] given: it decides alone (causal, padding and
      packed block-diagonal masks all arrive this way). A query row that may see no key at
      all (a left-pad row) attends with equal weight to every key, as megatron-core's
      masked softmax gives it (never NaN).
    - no mask, causal layer, sq > 1: causal attention (``is_causal``, the flash path); with
      sq < sk (queries after a KV cache) the causal mask is aligned to the last key.
    - no mask otherwise (a decode step): every key is visible.
    - a sliding window (:func:`layer_window`) blocks, in addition, the keys before it
      (:func:`window_blocked`).

    The kernel's mask and the rows that see no key are derived from a given mask once per
    model forward and window, not in every layer (:func:`sdpa_masks`).

    Grouped-query attention is SDPA's ``enable_gqa`` (no copies of keys and values) where
    the kernel that runs supports it: on a CPU, and on a GPU for the flash kernel (causal
    without a mask, bf16 / fp16); elsewhere keys and values are repeated per query head, so
    CUDA's memory-efficient kernel serves masks and fp32 instead of the unfused fallback.
    Softmax runs in fp32 inside the kernel for bf16 inputs. Attention-logit soft-capping
    (``softcap``, Gemma 2) has no fused kernel: those layers compute the scores explicitly
    (:meth:`_capped`). Not supported (refused at construction): context parallelism,
    softmax offsets; packed THD sequences are refused in forward (pack with a
    block-diagonal mask instead).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, softcap: Optional[float] = None):
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention (model.layer_spec = te)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"the fused layer spec has no {config.softmax_type!r} softmax")
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # megatron-core divides the scale by the layer number under query-key layer
        # scaling and multiplies it back inside its softmax: SDPA takes the product.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)
        self.grouped = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        self.window = layer_window(config, self.layer_number)
        self.softcap = softcap

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed THD sequences need Transformer Engine's attention; with the fused spec pack"
                " with a block-diagonal attention_mask (aligner.models.packed_attention_mask)"
            )
        if attention_bias is not None:
            raise NotImplementedError("the fused layer spec takes no attention bias")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        # [s, b, n, hn] -> [b, n, s, hn]: views, the kernels take strided inputs
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is not None:
            mask, hidden = sdpa_masks(attention_mask, sq, sk, self.window)
            if hidden is not None:
                q = q.masked_fill(hidden, 0.0)
        elif self.window is not None:
            mask = ~window_blocked(sq, sk, self.window, q.device)[None, None]  # every query sees itself
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        native_gqa = self.grouped and not self.softcap and (
            q.device.type == "cpu" or (mask is None and q.dtype in _FLASH_DTYPES))
        if self.grouped and not native_gqa:
            # CUDA's memory-efficient and cuDNN kernels (masks, fp32) take equal head
            # counts; with enable_gqa they would fall back to the unfused math kernel
            r = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p and not self.config.sequence_parallel \
                else contextlib.nullcontext():
            if self.softcap:
                context = self._capped(q, k, v, mask, is_causal, dropout_p)
            else:
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.sdpa_scale,
                    enable_gqa=native_gqa,
                )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _capped(self, q, k, v, allowed, is_causal, dropout_p):
        """Soft-capped attention written out (q [b, np, sq, hn], k / v [b, np, sk, hn],
        ``allowed`` as SDPA takes it): ``softmax(mask(cap·tanh(q·kᵀ·scale / cap))) · v``,
        softmax in fp32."""
        scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)).float() * self.sdpa_scale, self.softcap)
        if is_causal:
            allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p).to(v.dtype)
        return torch.matmul(probs, v)


# ------------------------------------------------------------------ specs
@dataclass(frozen=True)
class LayerDesign:
    """What a family's decoder layer adds to the Llama layer, for the spec builders (the
    family's adapter says; the norms' kind is the ``TransformerConfig``'s ``normalization``
    and ``layernorm_zero_centered_gamma``, windows its ``window_size``).

    qk_norm: ``""`` none, ``"head"`` each head's query and key (Qwen3, Gemma 3:
    megatron-core's ``qk_layernorm``), ``"projection"`` the whole query / key projection
    (OLMo 2: :class:`ProjectionRMSNorm`).
    norms: ``"pre"`` before attention and MLP (Llama), ``"sandwich"`` before and after each
    (Gemma 2 / 3), ``"post"`` after each only (OLMo 2); "after" is
    :class:`PostNormRowParallelLinear`.
    softcap: attention-logit soft-capping (Gemma 2), None for none.
    local_rope: the sliding-window layers rotate with a second rope (Gemma 3:
    :class:`LocalRopeSelfAttention`).
    num_experts: the MLP is megatron-core's mixture-of-experts layer (``MoELayer``: router,
    token dispatcher, one local MLP per expert) with this many experts; None: a dense MLP.
    """

    qk_norm: str = ""
    norms: str = "pre"
    softcap: Optional[float] = None
    local_rope: bool = False
    num_experts: Optional[int] = None

    def __post_init__(self):
        if self.qk_norm not in ("", "head", "projection") or self.norms not in ("pre", "sandwich", "post"):
            raise ValueError(f"unknown layer design {self}")


LLAMA_LAYER = LayerDesign()


def build_layer_spec(spec: str, design: LayerDesign = LLAMA_LAYER, *, normalization: str = "RMSNorm",
                     zero_centered_gamma: bool = False):
    """(layer ``ModuleSpec``, final-norm class) of a resolved spec for ``design``.

    ``te``: megatron-core's Transformer Engine spec, for the designs it builds (per-head qk
    norms at most; anything more is refused here and ``auto`` does not pick ``te`` for
    it: :func:`te_builds`). ``fused`` / ``local``: megatron-core's local layer with the
    core attention, norms and projections the design needs (same parameter names in both).
    """
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec == "te":
        if not te_builds(design):
            raise ValueError(f"model.layer_spec = te: Transformer Engine's layer spec does not build {design};"
                             " use fused or local")
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=design.num_experts,
                                                          qk_layernorm=design.qk_norm == "head"), TENorm
    if spec not in ("fused", "local"):
        raise ValueError(f"unknown layer spec {spec!r}; expected one of {LAYER_SPECS[1:]}")
    layer = get_gpt_layer_local_spec(num_experts=design.num_experts, qk_layernorm=design.qk_norm == "head",
                                     normalization=normalization)
    core = SDPAttention if spec == "fused" else LocalAttention
    if design.softcap:
        core = functools.partial(core, softcap=design.softcap)  # SelfAttention calls it as a class
    # megatron-core's local norm (torch's) has no 1 + w scale and refuses sequence parallelism
    norm = SequenceParallelNorm if spec == "fused" or zero_centered_gamma else layer.submodules.input_layernorm
    attention = layer.submodules.self_attention
    mlp = layer.submodules.mlp
    attn_parts = dict(core_attention=core)
    if design.qk_norm == "head":
        attn_parts.update(q_layernorm=norm, k_layernorm=norm)
    elif design.qk_norm == "projection":
        attn_parts.update(q_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"which": "q"}),
                          k_layernorm=ModuleSpec(module=ProjectionRMSNorm, params={"which": "k"}))
    mlp_parts = {}
    if design.norms in ("sandwich", "post"):
        attn_parts["linear_proj"] = ModuleSpec(module=PostNormRowParallelLinear, params={"post_norm": norm})
        mlp_parts["linear_fc2"] = ModuleSpec(module=PostNormRowParallelLinear, params={"post_norm": norm})
    attention = dataclasses.replace(
        attention, module=LocalRopeSelfAttention if design.local_rope else
        RopeTablesSelfAttention if spec == "fused" else attention.module,
        submodules=dataclasses.replace(attention.submodules, **attn_parts))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, **mlp_parts))
    pre_norm = IdentityOp if design.norms == "post" else norm
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=pre_norm, self_attention=attention, pre_mlp_layernorm=pre_norm, mlp=mlp))
    return layer, norm


def te_builds(design: LayerDesign) -> bool:
    """Whether megatron-core's Transformer Engine spec builds a layer of ``design``."""
    return design.norms == "pre" and design.qk_norm in ("", "head") and not design.softcap and not design.local_rope
