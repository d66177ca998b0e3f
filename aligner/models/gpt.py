"""The policy / reward / value model: megatron-core ``GPTModel`` built for the current layout.

``build_model(cfg, head=None)`` builds this rank's part of the model for the current
TP/PP layout (embedding on the first pipeline stage, final norm and output layer or head on
the last). Notation: b batch, s sequence, h hidden, v padded vocab, p TP size, N head outputs.

Forward (every stage; the first reads ``input_ids``, the others the activation set by
the pipeline schedule through ``set_input_tensor``)::

    model(input_ids [b, s], position_ids [b, s] or None, attention_mask or None)
      -> last stage, LM:    logits [b, s, v/p]   (vocab-parallel: this TP rank's slice)
      -> last stage, head:  values [b, s, N]     (full, identical on every TP rank)
      -> other stages:      hidden [s, b, h]

Conventions every caller follows:

- Batches are right-padded. ``attention_mask=None`` means causal attention, which is exact
  for right padding: a real token never sees the pads that follow it. Read outputs at
  non-pad positions only.
- ``attention_mask``, when given, is megatron-core's boolean ``[b, 1, s, s]`` with
  **True = blocked**, and it must contain the causal part itself
  (:func:`attention_mask_from_padding` / :func:`packed_attention_mask` build it).
- ``position_ids``: None means ``0..s-1`` for every row (what HF uses for right padding).
  Given, they drive the rotary embedding per token, as HF does (left padding, packed
  sequences with positions restarting per sample).
- Padded vocabulary rows (``cfg.padded_vocab_size() > cfg.vocab_size``) get logit
  ``finfo.min``, so softmax, log-probs and sampling see exactly the real vocabulary.
- What the family adds at the model's ends (its adapter, :mod:`aligner.models.architectures`):
  an embedding multiplier (Gemma: sqrt(h)), final-logit soft-capping ``cap · tanh(x / cap)``
  (before the padded rows are masked), partial rotary embedding, and a second rope for the
  sliding-window layers (Gemma 3: the rotary frequencies passed to the layers are then
  [s, b, 2, d], global then local; ``layer_spec.rotary_for_layer`` picks a layer's).
- Heads (``head="reward"`` / ``"value"``): the output layer is replaced by a replicated
  ``Linear(h, N, bias=False)`` on the final-norm hidden state (the HF
  ``*ForSequenceClassification`` ``score`` layer). Identical inputs and loss on every TP
  rank give identical head gradients; under sequence parallelism the hidden state is
  gathered first.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from aligner.models.config import ModelConfig
from aligner.models.layer_spec import announce_layer_spec, check_parallel_support, resolve_layer_spec
from aligner.parallel import get_device

HEADS = ("reward", "value")


def rope_inv_freq(cfg: ModelConfig, theta: Optional[float] = None, scaled: bool = True) -> torch.Tensor:
    """Rotary inverse frequencies [rotary_dim/2] as HF computes them (default, llama3, linear;
    ``rotary_dim = head_dim · partial_rotary_factor``). ``theta`` replaces ``cfg.rope_theta``
    and ``scaled=False`` leaves the scaling out (Gemma 3's local rope)."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    base = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaled:
        return inv_freq
    rs = cfg.rope_scaling or {}
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif cfg.rope_type == "llama3":
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class ScoreHead(torch.nn.Module):
    """``Linear(h, N, bias=False)`` on hidden states [s, b, h] -> [s, b, N], replicated on
    every TP rank (its weight is the HF sequence-classification ``score.weight``)."""

    def __init__(self, hidden_size: int, num_outputs: int, init_std: float, dtype, seed: int = 0):
        super().__init__()
        # A fixed generator: every rank (and every layout) starts from the same head.
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_outputs, hidden_size, generator=gen) * init_std
        self.weight = torch.nn.Parameter(weight.to(device=get_device(), dtype=dtype))
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight)


class AlignerGPTModel(GPTModel):
    """megatron-core ``GPTModel`` with HF-exact rotary embeddings, vocab-padding masking,
    per-token position ids and an optional score head (see the module docstring)."""

    def __init__(self, *args, model_cfg: ModelConfig, head: Optional[str] = None,
                 num_outputs: int = 1, head_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_cfg = model_cfg
        self.head_type = head
        self.num_outputs = num_outputs if head else None
        if hasattr(self, "rotary_pos_emb"):
            self.rotary_pos_emb.inv_freq = rope_inv_freq(model_cfg).to(get_device())
        # Gemma 3: the sliding-window layers' rope (layer_spec.rotary_for_layer picks it)
        self.local_inv_freq = None
        if model_cfg.rope_local_theta is not None:
            self.local_inv_freq = rope_inv_freq(model_cfg, model_cfg.rope_local_theta, scaled=False).to(get_device())
        self.embedding_multiplier = model_cfg.architecture.embedding_multiplier(model_cfg)
        if self.pre_process and self.embedding_multiplier is not None:
            self.embedding.register_forward_hook(self._scale_embedding)
        self.head = None
        if self.post_process and head is not None:
            del self.output_layer  # the head replaces the vocabulary projection
            self.head = ScoreHead(self.config.hidden_size, num_outputs, model_cfg.init_std,
                                  self.config.params_dtype, seed=head_seed)
        elif self.post_process and (model_cfg.padded_vocab_size() > model_cfg.vocab_size
                                    or model_cfg.final_logit_softcapping):
            self.output_layer.register_forward_hook(self._final_logits)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron-core's, except that a head model has no output layer to tie or pad:
        the language module's output-layer handling is skipped and the head is saved as a
        replicated tensor (``head.weight``)."""
        if self.head is None:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        self.post_process = False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = True

    # -- embeddings and logits --------------------------------------------------------
    def _scale_embedding(self, module, inputs, output):
        """The family's embedding multiplier (Gemma: sqrt(h), in the embedding's dtype as HF
        rounds it)."""
        return output * torch.tensor(self.embedding_multiplier, dtype=output.dtype, device=output.device)

    def _final_logits(self, module, inputs, output):
        """Final-logit soft-capping (``cap · tanh(logits / cap)``, Gemma), then the padded
        vocabulary rows masked to ``finfo.min``."""
        logits, bias = output
        cap = self.model_cfg.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        local = logits.shape[-1]
        start = 0 if local == self.vocab_size else ps.get_tensor_model_parallel_rank() * local
        valid = max(0, min(local, self.model_cfg.vocab_size - start))
        if valid < local:
            pad = torch.arange(local, device=logits.device) >= valid
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return logits, bias

    # -- positions --------------------------------------------------------------------
    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        # megatron-core's rotary embedding uses positions 0..s-1; honour explicit ones.
        explicit = (position_ids is not None and out[1] is not None and inference_context is None
                    and packed_seq_params is None and self.config.context_parallel_size == 1)
        if explicit:
            out = (out[0], self._rotary(position_ids.t(), self.rotary_pos_emb.inv_freq)) + tuple(out[2:])
        if self.local_inv_freq is not None and out[1] is not None:
            # both ropes, [s, b, 2, d]: the global one, then the local one
            positions = position_ids.t() if explicit else torch.arange(out[1].shape[0], device=out[1].device)[:, None]
            local = self._rotary(positions, self.local_inv_freq)
            out = (out[0], torch.cat(torch.broadcast_tensors(out[1], local), dim=2)) + tuple(out[2:])
        return out

    @staticmethod
    def _rotary(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """positions [s, b] -> rotary frequencies [s, b, 1, d] (megatron-core's layout)."""
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [s, b, d/2]
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    # -- heads ----------------------------------------------------------------------
    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.head is None:
            return super()._postprocess(hidden_states, *args, **kwargs)
        if kwargs.get("labels") is not None:
            raise ValueError("a model with a score head takes no labels; compute the loss outside")
        if self.config.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        return self.head(hidden_states).transpose(0, 1).contiguous()  # [b, s, N]


def build_model(
    cfg: ModelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    head: Optional[str] = None,
    num_outputs: int = 1,
    params_dtype: torch.dtype = torch.float32,
    layer_spec: Optional[str] = None,
    vp_stage: Optional[int] = None,
    head_seed: int = 0,
    **config_overrides,
) -> AlignerGPTModel:
    """Build this rank's part of the model for the current megatron-core parallel state.

    pre_process / post_process default to "first / last pipeline stage". ``head``:
    None (causal LM), ``"reward"`` or ``"value"`` (score head with ``num_outputs``).
    ``layer_spec``: ``auto`` | ``te`` | ``fused`` | ``local`` (default ``cfg.layer_spec``; see
    :mod:`aligner.models.layer_spec`: auto is TE when it can run, else torch's fused
    attention and norms, else megatron-core's local spec). ``config_overrides`` go to the
    TransformerConfig.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if head is not None and head not in HEADS:
        raise ValueError(f"head must be one of {HEADS} or None, got {head!r}")
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs the parallel state: call aligner.parallel.initialize() first")
    tc = cfg.to_transformer_config(params_dtype, **config_overrides)
    requested = cfg.layer_spec if layer_spec is None else layer_spec
    spec = resolve_layer_spec(requested)
    if spec == "te" and requested == "auto" and not cfg.architecture.te_spec_builds(cfg):
        spec = "fused"  # Transformer Engine's spec does not build this family's layer
    check_parallel_support(spec, sequence_parallel=tc.sequence_parallel, context_parallel=tc.context_parallel_size)
    announce_layer_spec(spec, requested)
    module_spec, final_norm = cfg.architecture.layer_spec(cfg, spec)
    block_spec = TransformerBlockSubmodules(
        layer_specs=[module_spec] * get_num_layers_to_build(tc, vp_stage=vp_stage),
        layer_norm=final_norm,
    )
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = AlignerGPTModel(
        config=tc,
        transformer_layer_spec=block_spec,
        vocab_size=cfg.padded_vocab_size(),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings and head is None,
        position_embedding_type="rope",
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=cfg.rope_theta,
        vp_stage=vp_stage,
        model_cfg=cfg,
        head=head,
        num_outputs=num_outputs,
        head_seed=head_seed,
    )
    if spec == "local":
        # megatron-core's torch norms are always fp32; the mixed-precision optimizer
        # checkpoints only parameters of the model's dtype, so they take params_dtype
        for module in model.modules():
            if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                module.to(params_dtype)
    if cfg.num_experts:
        _mark_expert_params(model)
    return model


def _mark_expert_params(model) -> None:
    """Mark the routed experts' parameters as expert-parallel (``allreduce = False``) at
    every expert-parallel size. megatron-core marks them only at EP > 1, and the mark
    decides how DDP reduces their gradients (over the expert-data-parallel group, which at
    EP = 1 is the data-parallel group: the same sum) and how its optimizer groups them (a
    separate optimizer for experts): marked always, the optimizer, and so a checkpoint's
    optimizer state, has the same structure at every EP size and a run resumes at another."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def unwrap_model(model):
    """The ``AlignerGPTModel`` inside DDP / Float16Module wrappers (lists map elementwise)."""
    if isinstance(model, (list, tuple)):
        return [unwrap_model(m) for m in model]
    while hasattr(model, "module") and not isinstance(model, GPTModel):
        model = model.module
    return model


def reward_at_last_token(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Head outputs ``values`` [b, s, N] at each right-padded row's last real token
    (position ``lengths - 1``) -> [b, N]."""
    if lengths.shape != values.shape[:1]:
        raise ValueError(f"reward_at_last_token: lengths {tuple(lengths.shape)} for values {tuple(values.shape)}")
    if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > values.shape[1]):
        raise ValueError(
            f"reward_at_last_token: lengths must lie in [1, {values.shape[1]}], got {lengths.tolist()}"
        )
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, lengths.to(values.device) - 1]


# -- attention masks and positions ------------------------------------------------------
def attention_mask_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """HF-style ``padding_mask`` [b, s] (1 = real token, 0 = pad, any side) -> megatron's
    boolean ``[b, 1, s, s]``, True = blocked: causal and no pad keys."""
    b, s = padding_mask.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=padding_mask.device).tril()
    allowed = causal[None] & padding_mask.bool()[:, None, :]
    return (~allowed)[:, None]


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``segment_ids`` [b, s] (same id = same sample; pads get their own id or -1) ->
    block-diagonal causal ``[b, 1, s, s]``, True = blocked."""
    b, s = segment_ids.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (~(causal[None] & same))[:, None]


def position_ids_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only ([b, s]; pads get 0): left padding as HF's
    ``generate`` numbers it."""
    pos = padding_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) * padding_mask.long()


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 for every new segment id along each row ([b, s])."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start_idx
