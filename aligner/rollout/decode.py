"""Fused decode steps over the parameters of megatron-core's local-spec GPT layers.

Notation: b rows, h hidden, ng / np query groups / heads on this TP rank, r = np / ng,
d head size, S context length, p TP size.

A decode step feeds one token per row. Through megatron-core's module stack that step
costs far more in Python dispatch than in arithmetic on a CPU (and megatron-core's static
cache stores keys without rotary embedding, so every step re-rotates every cached key).
:class:`FusedDecoder` runs the same arithmetic directly on the layers' own parameters:

    h <- h + W_proj · attn(rope(q), cache(rope(k)), cache(v))     (row-parallel: all-reduce)
    h <- h + W_fc2 · act(W_fc1 · norm(h))                          (row-parallel: all-reduce)

using the layers' own norm modules, megatron-core's fused QKV layout (per query group: r
query heads, then one key head, then one value head), its rotary frequencies
(``model.rotary_pos_emb``), softmax scale, activation and vocab-parallel embedding /
output layer. Its KV cache holds rotated keys, ``[b, ng, S, d]`` per layer, views of one
``[2 * layers, b, ng, S, d]`` buffer per head shape (:meth:`FusedDecoder.start`; finished
rows leave it in one gather per buffer, :meth:`FusedDecoder.keep_rows`), filled by the decoder's own prefill of the prompts
(:meth:`FusedDecoder.prefill`: the same layer arithmetic over the prompt tokens of right
padded rows, causal and windowed attention within each prompt, the logits of each row's
last prompt token), for the first batch and for rows that take a freed slot.

Positions: a step feeds every row at one position ``t`` (an int: all rows in step), or each
row at its own position (a tensor ``[b]``: prompts of different lengths, and continuous
batching, where a row that joined later is at an earlier position). Per row the rope
tables are indexed at the row's position, its key and value are written into its own
cache column, and the attention sees only the row's own extent: keys ``0..pos``
(``pos - window + 1..pos`` on a sliding-window layer), the rest of the slot (columns of
padding, of a previous occupant, or never written) masked to ``-inf`` after any
soft-capping, so it gets probability 0. When every row is at the same position the
uniform path runs (no mask), the arithmetic of a batch without refills.

It supports exactly the layer structures it reproduces (checked by :func:`unsupported_reason`):
megatron-core ``TransformerLayer`` with ``SelfAttention`` + ``DotProductAttention`` (or the
layer-spec module's subclasses, whose ``window`` and ``softcap`` it reads) and
``ColumnParallelLinear`` / ``RowParallelLinear`` projections (the local and fused specs),
non-interleaved rotary embedding, dense MLP; with what the architecture families add
(:mod:`aligner.models.layer_spec`): per-head or whole-projection q/k norms (applied before
the rotation, as in the layer), post norms on the projections' outputs, a sliding window
(a layer attends to its last ``window`` cached keys), attention-logit soft-capping,
partial rotary embedding (the first dimensions only), the sliding-window layers' local
rope, the embedding multiplier and final-logit soft-capping of the model. Anything else
(Transformer Engine spec, ...) decodes through megatron-core's own forward instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from aligner.models.layer_spec import PostNormRowParallelLinear, soft_cap


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding, megatron-core's ``x * cos + rotate_half(x) * sin``
    with ``rotate_half(x) = [-x2, x1]`` written as ``roll(x, r/2) * [-sin1, sin2]`` (the same
    products and sum) on the first r = ``cos.shape[-1]`` dimensions; the rest pass
    (partial rotary embedding)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(r // 2, dims=-1), sin_signed)
    rot = x[..., :r]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(r // 2, dims=-1), sin_signed), x[..., r:]), dim=-1)


def _cos_sin(inv_freq: torch.Tensor, length: int, dtype):
    """(cos, signed sin) [length, r] of positions 0..length-1, as megatron-core's rotary
    embedding computes them (fp32 outer product, then cast)."""
    freqs = torch.outer(torch.arange(length, device=inv_freq.device, dtype=inv_freq.dtype), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    sin = freqs.sin().to(dtype)
    half = sin.shape[-1] // 2
    return freqs.cos().to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _unpack(x: torch.Tensor, index: Optional[torch.Tensor], size: int) -> torch.Tensor:
    """The rows ``x`` [n, ...] placed at ``index`` [n] of ``size`` zero rows (a prefill's
    real tokens into its padded grid); ``x`` itself when ``index`` is None."""
    if index is None:
        return x
    return x.new_zeros((size,) + tuple(x.shape[1:])).index_copy_(0, index, x)


def unsupported_reason(models) -> Optional[str]:
    """Why :class:`FusedDecoder` cannot run these model chunks, or None when it can."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for model in models:
        config = model.config
        if model.position_embedding_type != "rope" or getattr(config, "multi_latent_attention", False):
            return "position embedding is not rotary (rope)"
        if config.rotary_interleaved:
            return "interleaved rotary embedding"
        if model.pre_process and model.embedding.add_position_embedding:
            return "learned position embeddings"
        if config.fp32_residual_connection or config.apply_query_key_layer_scaling:
            return "fp32 residual connection / query-key layer scaling"
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            return "non-standard softmax attention"
        if getattr(config, "attention_output_gate", False):
            return "gated attention output"
        if config.num_query_groups is not None and config.num_query_groups < config.tensor_model_parallel_size:
            return "fewer key/value heads than TP ranks"
        if getattr(model, "rotary_pos_emb", None) is None:
            return "no rotary embedding"
        for layer in model.decoder.layers:
            attn = getattr(layer, "self_attention", None)
            mlp = getattr(layer, "mlp", None)
            if type(layer) is not TransformerLayer or not isinstance(attn, SelfAttention) \
                    or not isinstance(mlp, (MLP, MoELayer)):
                return f"layer type {type(layer).__name__} is not the local TransformerLayer"
            if not isinstance(attn.core_attention, DotProductAttention):
                return f"attention {type(attn.core_attention).__name__} is not DotProductAttention"
            if config.window_size is not None and not hasattr(attn.core_attention, "window"):
                return f"attention {type(attn.core_attention).__name__} does not say its sliding window"
            row = (RowParallelLinear, PostNormRowParallelLinear)
            linears = [("linear_qkv", attn.linear_qkv, (ColumnParallelLinear,)), ("linear_proj", attn.linear_proj, row)]
            if isinstance(mlp, MLP):
                linears += [("linear_fc1", mlp.linear_fc1, (ColumnParallelLinear,)),
                            ("linear_fc2", mlp.linear_fc2, row)]
            for name, module, cls in linears:
                if type(module) not in cls:
                    return f"{name} is {type(module).__name__}, not {cls[0].__name__}"
            if not isinstance(layer.pre_cross_attn_layernorm, IdentityOp) or \
                    not isinstance(layer.cross_attention, IdentityOp):
                return "cross attention"
    return None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for ``x`` [b, in], computed as ``(weight @ x^T)^T``: the same
    products, but for a handful of rows the CPU BLAS (MKL sgemm) runs this orientation
    15-20% faster than ``F.linear`` on one thread and spreads it better over two (measured
    on this project's 2-core CPU machine); on a GPU either orientation is one cuBLAS call.
    Returns a transposed view [b, out]."""
    out = torch.mm(weight, x.t()).t()
    return out if bias is None else out + bias


def _norm_fn(norm):
    """A norm module as a function. ``torch.nn.RMSNorm`` (what the local spec builds) is
    written out, ``x * rsqrt(mean(x^2) + eps) * weight`` with statistics in fp32: torch's
    own kernel for it is a composite of about a dozen dispatched ops on a CPU, costlier than
    the projections it sits between. Any other norm module is called as it is."""
    if type(norm) is not torch.nn.RMSNorm or norm.weight is None:
        return norm
    weight = norm.weight
    eps = torch.finfo(torch.float32).eps if norm.eps is None else norm.eps

    def rms_norm(x):
        if x.dtype == torch.float32:  # no conversions to dispatch
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        return y.to(x.dtype) * weight

    return rms_norm


def _optional(module):
    """A layer's optional module (a norm) as a function, or None where the spec put none."""
    from megatron.core.transformer.identity_op import IdentityOp

    return None if module is None or isinstance(module, IdentityOp) else _norm_fn(module)


class _Layer:
    """The parameters and modules of one layer that a decode step needs."""

    def __init__(self, layer, local_rope: bool):
        attn, mlp = layer.self_attention, layer.mlp
        self.number = attn.layer_number
        self.input_norm = _optional(layer.input_layernorm)
        self.mlp_norm = _optional(layer.pre_mlp_layernorm)
        self.q_norm, self.k_norm = _optional(attn.q_layernorm), _optional(attn.k_layernorm)
        self.w_qkv, self.b_qkv = attn.linear_qkv.weight, attn.linear_qkv.bias
        self.w_proj, self.b_proj = attn.linear_proj.weight, attn.linear_proj.bias
        self.proj_norm = _optional(getattr(attn.linear_proj, "post_norm", None))
        # a mixture-of-experts MLP runs as megatron-core's module itself (its router, token
        # dispatcher and experts), so decoding routes each token as the training pass does
        self.moe = mlp if hasattr(mlp, "router") else None
        if self.moe is None:
            self.w_fc1, self.b_fc1 = mlp.linear_fc1.weight, mlp.linear_fc1.bias
            self.w_fc2, self.b_fc2 = mlp.linear_fc2.weight, mlp.linear_fc2.bias
        self.fc2_norm = None if self.moe is not None else _optional(getattr(mlp.linear_fc2, "post_norm", None))
        # LoRA adapters (aligner.models.lora.LoraLinear, a forward hook on the layer in megatron-core's
        # forward): their low-rank path is added here to the same projections' outputs
        self.lora = {name: getattr(parent, f"lora_{name}", None)
                     for name, parent in (("qkv", attn), ("proj", attn), ("fc1", mlp), ("fc2", mlp))}
        self.groups = attn.num_query_groups_per_partition
        self.heads = attn.num_attention_heads_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        self.window = getattr(attn.core_attention, "window", None)  # keys seen, None: all
        self.softcap = getattr(attn.core_attention, "softcap", None)
        self.local_rope = local_rope and self.window is not None  # Gemma 3's sliding layers


class FusedDecoder:
    """Decode steps for this rank's model chunks (see the module docstring).

    ``start`` makes a fresh cache, ``prefill`` fills slots with prompts (or stages prompts
    for slots freed later, ``take``), ``step`` runs one token per row through every
    chunk on this rank (with pipeline send/recv between stages), at one position or at each
    row's own, ``keep_rows`` drops finished rows from the cache.
    """

    def __init__(self, models, vocab_size: int, device, prev_rank=None, next_rank=None):
        self.models = models
        self.vocab_size = vocab_size
        self.device = device
        self.prev_rank, self.next_rank = prev_rank, next_rank
        config = models[0].config
        self.config = config
        self.hidden_size = config.hidden_size
        self.dtype = config.params_dtype
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        self.activation = config.activation_func
        self.gated = config.gated_linear_unit
        self.local_inv_freq = getattr(models[0], "local_inv_freq", None)
        self.layers = [[_Layer(layer, self.local_inv_freq is not None) for layer in m.decoder.layers]
                       for m in models]
        self.final_norms = {id(m): _norm_fn(m.decoder.final_layernorm) for m in models if m.post_process}
        self.cache = {}  # layer number -> (keys [b, ng, S, d] rotated, values [b, ng, S, d])
        # the cache's storage: per (ng, d), one [2 * layers, b, ng, S, d] buffer (cache holds
        # views of it), and each layer's place in it
        self._buffers = {}
        self._places = {}  # layer number -> (buffer key, index of its keys)
        self.rope = {}  # local rope? -> (cos, signed sin) [S, r]
        self._masks = {}  # one step's per-row attention biases and cache indices
        self._span = (0, 0)  # that step's lowest and highest row position
        self._bases = {}  # (b, ng, S) -> each row's first cache row in the flat view
        self._columns = torch.arange(0, device=device)  # 0..S-1, key column numbers

    # ------------------------------------------------------------------ cache
    def start(self, batch: int, total_len: int) -> None:
        """A fresh cache of ``batch`` slots of ``total_len`` columns each (zero, so the masked
        columns of a row's slot never hold a non-finite value) and the rope tables of
        positions ``0..total_len-1``; :meth:`prefill` fills the slots."""
        self.rope = {False: _cos_sin(self.models[0].rotary_pos_emb.inv_freq, total_len, self.dtype)}
        if self.local_inv_freq is not None:
            self.rope[True] = _cos_sin(self.local_inv_freq, total_len, self.dtype)
        shapes: dict = {}
        self._places = {}
        for layers in self.layers:
            for layer in layers:
                numbers = shapes.setdefault((layer.groups, layer.head_dim), [])
                self._places[layer.number] = ((layer.groups, layer.head_dim), 2 * len(numbers))
                numbers.append(layer.number)
        self._buffers = {
            (g, d): torch.zeros((2 * len(numbers), batch, g, total_len, d), dtype=self.dtype, device=self.device)
            for (g, d), numbers in shapes.items()
        }
        self._views()

    def _views(self) -> None:
        """``cache`` as views of the buffers (each layer's keys and values contiguous)."""
        self.cache = {}
        for number, (key, i) in self._places.items():
            buffer = self._buffers[key]
            self.cache[number] = (buffer[i], buffer[i + 1])

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Only the slots ``keep`` [b'] (ascending) remain, in that order: one gather per
        buffer for every layer at once (a copy of the kept slots, as fast as the per-layer
        copies it replaces and a fraction of their kernels; moving the kept slots down in
        place, or over the written columns only, measured slower: a gather and a copy)."""
        self._buffers = {key: buffer.index_select(1, keep) for key, buffer in self._buffers.items()}
        self._views()

    # ------------------------------------------------------------------ step
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the row-parallel partial outputs over the TP group."""
        if self.tp_group is not None:
            x = x.contiguous()
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, model, token_ids: torch.Tensor) -> torch.Tensor:
        emb = model.embedding.word_embeddings
        if self.tp_size == 1:
            out = F.embedding(token_ids, emb.weight)
        else:
            outside = (token_ids < emb.vocab_start_index) | (token_ids >= emb.vocab_end_index)
            local = (token_ids - emb.vocab_start_index).masked_fill(outside, 0)
            out = self._all_reduce(F.embedding(local, emb.weight).masked_fill(outside.unsqueeze(-1), 0.0))
        multiplier = getattr(model, "embedding_multiplier", None)
        return out if multiplier is None else out * torch.tensor(multiplier, dtype=out.dtype, device=out.device)

    def _logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norms[id(model)](hidden)
        if model.share_embeddings_and_output_weights:
            weight = model.shared_embedding_or_output_weight()
        else:
            weight = model.output_layer.weight
        logits = _linear(hidden, weight)  # [b, v/p]
        if self.tp_group is not None:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        logits = logits[:, :self.vocab_size].float()
        cap = model.model_cfg.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    @staticmethod
    def _adapted(layer: _Layer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus the low-rank path of the layer's adapter ``name`` on input ``x``
        (column-parallel: this rank's rows; row-parallel: the full output, reduced over TP
        inside), as the adapter's hook adds it in megatron-core's forward; ``out`` unchanged
        without an enabled adapter."""
        lora = layer.lora[name]
        if lora is None or not lora.enabled:
            return out
        return out + lora.delta(x).to(out.dtype)

    def _layer(self, layer: _Layer, h: torch.Tensor, t: int) -> torch.Tensor:
        b = h.shape[0]
        g, r, d = layer.groups, layer.heads // layer.groups, layer.head_dim
        x = h if layer.input_norm is None else layer.input_norm(h)
        qkv = self._adapted(layer, "qkv", x, _linear(x, layer.w_qkv, layer.b_qkv)).reshape(b, g, r + 2, d)
        per_row = isinstance(t, torch.Tensor)
        if per_row:  # [b, 1, 1, r] and [b, 1, r]: broadcast over [b, g, r+1, d] / [b, heads, d] / [b, g, d]
            cos4, sin4, cos3, sin3 = self._row_rope(t, layer.local_rope)
        else:
            cos4, sin4 = (table[t] for table in self.rope[layer.local_rope])  # [r]
            cos3, sin3 = cos4, sin4
        if layer.q_norm is None:
            qk = _rotate(qkv[:, :, :r + 1], cos4, sin4)  # queries and key
            q, key = qk[:, :, :r], qk[:, :, r]
        else:  # q/k norms come before the rotation; [b, heads, d] in the layer's head order
            q = _rotate(layer.q_norm(qkv[:, :, :r].reshape(b, g * r, d)), cos3, sin3).view(b, g, r, d)
            key = _rotate(layer.k_norm(qkv[:, :, r]), cos3, sin3)
        keys, values = self.cache[layer.number]
        seq = keys.shape[2]
        if per_row:  # row j's key and value into column t[j] of its slot: one index_copy each
            index = self._cache_index(t, g, seq)
            keys.view(b * g * seq, d).index_copy_(0, index, key.reshape(b * g, d))
            values.view(b * g * seq, d).index_copy_(0, index, qkv[:, :, r + 1].reshape(b * g, d))
            first, last, bias = self._row_bias(t, layer.window, g, layer.softcap is not None, keys.dtype)
        else:
            keys[:, :, t] = key
            values[:, :, t] = qkv[:, :, r + 1]
            first = 0 if layer.window is None else max(0, t + 1 - layer.window)  # a sliding window's first key
            last, bias = t + 1, None
        q = q.reshape(b * g, r, d)
        k = keys.view(b * g, seq, d)[:, first:last]
        if bias is not None and not layer.softcap:  # scale * q k^T + bias in one call
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=layer.scale)  # [b*g, r, last-first]
        else:
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(layer.scale)
            if layer.softcap:
                scores = soft_cap(scores.float(), layer.softcap)
            if bias is not None:  # after the soft cap: a capped -inf would be finite
                scores.add_(bias)
        if scores.dtype != torch.float32:
            probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
            if values.dtype != torch.float32:
                probs = probs.to(values.dtype)
        context = torch.bmm(probs, values.view(b * g, seq, d)[:, first:last]).view(b, layer.heads * d)
        return self._finish(layer, h, context)

    def _finish(self, layer: _Layer, h: torch.Tensor, context: torch.Tensor, grid=None) -> torch.Tensor:
        """The layer after its attention: output projection (and post norm) added to ``h``,
        then the MLP (or megatron-core's MoE module) block; ``h``, ``context`` [n, ...] for n
        tokens -> [n, h]. ``grid`` (a prefill, :meth:`prefill`): the n tokens are the real
        tokens of m right-padded rows of c columns, which the MoE module gets in
        megatron-core's [s = c, b = m, h] order (the order a routing capture reads; padding
        as zeros)."""
        out = self._adapted(layer, "proj", context, self._all_reduce(_linear(context, layer.w_proj)))
        if layer.b_proj is not None:
            out = out + layer.b_proj
        if layer.proj_norm is not None:
            out = layer.proj_norm(out)
        h = h + out
        x = h if layer.mlp_norm is None else layer.mlp_norm(h)
        if layer.moe is not None:
            if grid is None:
                return h + layer.moe(x.unsqueeze(0))[0].squeeze(0)  # [n, h] as [s = 1, b = n, h]
            m, c, index = grid
            x = _unpack(x, index, m * c).view(m, c, -1).transpose(0, 1).contiguous()
            out = layer.moe(x)[0].transpose(0, 1).reshape(m * c, -1)
            return h + (out if index is None else out.index_select(0, index))
        x = self._adapted(layer, "fc1", x, _linear(x, layer.w_fc1, layer.b_fc1))
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            x = self.activation(gate) * up
        else:
            x = self.activation(x)
        out = self._adapted(layer, "fc2", x, self._all_reduce(_linear(x, layer.w_fc2)))
        if layer.b_fc2 is not None:
            out = out + layer.b_fc2
        if layer.fc2_norm is not None:
            out = layer.fc2_norm(out)
        return h + out

    def _prefill_layer(self, layer: _Layer, h: torch.Tensor, slots: Optional[torch.Tensor], grid,
                       staged: dict) -> torch.Tensor:
        """One layer over the n real tokens ``h`` [n, h] -> [n, h] of m right-padded rows of c
        columns (positions 0..c-1; ``grid`` = (m, c, index of the real tokens in the m * c
        grid, None when there is no padding)). The projections and the MLP run on the real
        tokens only; the attention on the grid (padding as zeros), where a row's padding
        comes after its tokens, so the causal mask alone keeps it out of their attention.
        Writes the keys and values into cache rows ``slots``, or (``slots`` None) into
        ``staged[layer number]`` ([m, ng, c, d] each)."""
        m, c, index = grid
        g, r, d = layer.groups, layer.heads // layer.groups, layer.head_dim
        x = h if layer.input_norm is None else layer.input_norm(h)
        qkv = self._adapted(layer, "qkv", x, _linear(x, layer.w_qkv, layer.b_qkv))
        qkv = _unpack(qkv, index, m * c).view(m, c, g, r + 2, d)
        cos, sin = (table[:c] for table in self.rope[layer.local_rope])  # [c, r]
        if layer.q_norm is None:
            qk = _rotate(qkv[:, :, :, :r + 1], cos[:, None, None], sin[:, None, None])
            q, key = qk[:, :, :, :r], qk[:, :, :, r]  # [m, c, g, r, d], [m, c, g, d]
        else:
            q = _rotate(layer.q_norm(qkv[:, :, :, :r].reshape(m, c, g * r, d)), cos[:, None],
                        sin[:, None]).view(m, c, g, r, d)
            key = _rotate(layer.k_norm(qkv[:, :, :, r]), cos[:, None], sin[:, None])
        value = qkv[:, :, :, r + 1]
        if slots is None:
            staged[layer.number] = (key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3))
        else:
            keys, values = self.cache[layer.number]
            keys[slots, :, :c] = key.permute(0, 2, 1, 3)
            values[slots, :, :c] = value.permute(0, 2, 1, 3)
        cols = torch.arange(c, device=h.device)
        blocked = cols[None] > cols[:, None]  # [query, key]: causal ...
        if layer.window is not None:  # ... within the window
            blocked |= cols[None] <= cols[:, None] - layer.window
        if not layer.softcap:
            # torch's fused attention (flash / memory-efficient kernels): no [c, c] score
            # matrix per head for long prompts; query head g*r + i reads key/value group g
            context = F.scaled_dot_product_attention(
                q.permute(0, 2, 3, 1, 4).reshape(m, g * r, c, d), key.permute(0, 2, 1, 3),
                value.permute(0, 2, 1, 3), attn_mask=~blocked, scale=layer.scale, enable_gqa=True,
            )  # [m, heads, c, d]
            context = context.permute(0, 2, 1, 3).reshape(m * c, layer.heads * d)
            return self._finish(layer, h, context if index is None else context.index_select(0, index), grid)
        # soft-capped attention logits: the scores written out, capped, then masked
        q = q.permute(0, 2, 1, 3, 4).reshape(m * g, c * r, d)
        k = key.permute(0, 2, 1, 3).reshape(m * g, c, d)
        v = value.permute(0, 2, 1, 3).reshape(m * g, c, d)
        scores = soft_cap(torch.bmm(q, k.transpose(1, 2)).mul_(layer.scale).float(), layer.softcap)  # [m*g, c*r, c]
        scores = scores.view(m * g, c, r, c).masked_fill(blocked[:, None], float("-inf")).view(m * g, c * r, c)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        context = torch.bmm(probs, v).view(m, g, c, r, d).permute(0, 2, 1, 3, 4).reshape(m * c, layer.heads * d)
        return self._finish(layer, h, context if index is None else context.index_select(0, index), grid)

    def prefill(self, token_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                slots: Optional[torch.Tensor] = None, logits: bool = False):
        """Feed m right-padded prompts ``token_ids`` [m, c] (row i's tokens in columns
        0..lengths[i]-1 at their own positions, padding after them; no ``lengths``: c each)
        through every chunk on this rank: the projections and MLPs on the real tokens only
        (n of them; pipeline send/recv of [n, h] between stages), the attention per row.
        Their keys and values fill columns 0..c-1 of the cache rows ``slots`` [m] (a row's
        columns from its length on hold zeros, which its later steps overwrite and its mask
        hides until then), or, without ``slots``, are returned (layer number ->
        [m, ng, c, d] each: prompts prefilled ahead of the slots they will take,
        :meth:`take`).

        Returns (those keys and values or None, and with ``logits`` where the output layer
        lives the logits [m, v] fp32 of each row's last token ``lengths[i] - 1``, else
        None)."""
        m, c = token_ids.shape
        if lengths is None:
            lengths = torch.full((m,), c, dtype=torch.int64, device=self.device)
        lengths = lengths.to(self.device)
        index = None  # the real tokens' places in the m * c grid (None: no padding)
        if int(lengths.min()) < c:
            index = (torch.arange(c, device=self.device)[None] < lengths[:, None]).view(-1).nonzero().squeeze(-1)
        grid = (m, c, index)
        n = m * c if index is None else index.shape[0]
        staged = {}
        out = None
        for model, layers in zip(self.models, self.layers):
            if model.pre_process:
                ids = token_ids.reshape(-1)
                h = self._embed(model, ids if index is None else ids.index_select(0, index))
            else:
                h = torch.empty((n, self.hidden_size), dtype=self.dtype, device=self.device)
                torch.distributed.recv(h, src=self.prev_rank)
            for layer in layers:
                h = self._prefill_layer(layer, h, slots, grid, staged)
            if not model.post_process:
                torch.distributed.send(h.contiguous(), dst=self.next_rank)
            elif logits:
                out = self._logits(model, h.index_select(0, torch.cumsum(lengths, 0) - 1))
        return (staged if slots is None else None), out

    def take(self, staged: dict, row: int, slot: int, c: int) -> None:
        """Columns 0..c-1 of cache row ``slot`` from row ``row`` of a :meth:`prefill`'s
        returned keys and values."""
        for number, (keys, values) in self.cache.items():
            k, v = staged[number]
            keys[slot, :, :c] = k[row, :, :c]
            values[slot, :, :c] = v[row, :, :c]

    def _row_rope(self, positions: torch.Tensor, local: bool):
        """The rope tables at each row's position, shaped to broadcast over the fused
        [b, g, r+1, d] queries-and-key and over [b, heads, d] / [b, g, d]. Once per step."""
        key = ("rope", local)
        if key not in self._masks:
            cos, sin = (table[positions] for table in self.rope[local])  # [b, r]
            self._masks[key] = (cos[:, None, None], sin[:, None, None], cos[:, None], sin[:, None])
        return self._masks[key]

    def _cache_index(self, positions: torch.Tensor, groups: int, seq: int) -> torch.Tensor:
        """Rows of a cache ``[b, ng, S, d]`` viewed as ``[b * ng * S, d]`` that hold each row's
        column ``positions[j]`` -> [b * ng]. Once per step and shape."""
        key = ("index", groups, seq)
        if key not in self._masks:
            b = positions.shape[0]
            base = self._bases.get((b, groups, seq))
            if base is None:  # the first column of every row's group: kept while b stays
                base = (torch.arange(b * groups, device=positions.device) * seq).view(b, groups)
                self._bases = {(b, groups, seq): base}
            self._masks[key] = (base + positions[:, None]).view(-1)
        return self._masks[key]

    def _row_bias(self, positions: torch.Tensor, window: Optional[int], groups: int, fp32: bool, dtype):
        """For rows at their own ``positions`` [b]: the key columns ``first..last-1`` a step
        reads and an additive bias [b * groups, 1, last-first] (row-major: row j's groups
        together, as the attention's [b * ng, r, keys] scores), -inf where the row must not
        see the key (beyond its position, or before its sliding window), else 0; in fp32
        for soft-capped scores, else in the cache's ``dtype``. Once per step and window."""
        key = (window, groups, torch.float32 if fp32 else dtype)
        if key not in self._masks:
            lo, hi = self._span
            first = 0 if window is None else max(0, lo + 1 - window)
            if self._columns.shape[0] <= hi:
                self._columns = torch.arange(self.rope[False][0].shape[0], device=positions.device)
            cols = self._columns[first:hi + 1]
            pos = positions[:, None]
            blocked = cols[None] > pos
            if window is not None:
                blocked |= cols[None] <= pos - window
            bias = torch.zeros(blocked.shape, dtype=key[2], device=positions.device).masked_fill_(blocked, float("-inf"))
            self._masks[key] = (first, hi + 1, bias.repeat_interleave(groups, dim=0)[:, None])
        return self._masks[key]

    def step(self, token_ids: torch.Tensor, t) -> Optional[torch.Tensor]:
        """Feed ``token_ids`` [b] at position ``t``: an int for every row (the cache holds
        0..t-1), or a tensor [b] of each row's own position (row j's cache holds 0..t[j]-1 of
        its own sequence); returns the next-token logits [b, v] fp32 where the output layer
        lives, else None."""
        b = token_ids.shape[0]
        if isinstance(t, torch.Tensor):
            lo, hi = (int(x) for x in torch.aminmax(t))
            if lo == hi:
                t = lo  # every row at the same position: no mask needed
            else:
                self._span, self._masks = (lo, hi), {}
        logits = None
        for model, layers in zip(self.models, self.layers):
            if model.pre_process:
                h = self._embed(model, token_ids)
            else:
                h = torch.empty((b, self.hidden_size), dtype=self.dtype, device=self.device)
                torch.distributed.recv(h, src=self.prev_rank)
            for layer in layers:
                h = self._layer(layer, h, t)
            if model.post_process:
                logits = self._logits(model, h)
            else:
                torch.distributed.send(h.contiguous(), dst=self.next_rank)
        return logits
