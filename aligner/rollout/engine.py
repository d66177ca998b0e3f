"""Batched generation from the megatron-core GPT model in any TP / PP layout.

Notation: n prompts, b rows in the batch being generated, s tokens in one forward, h hidden,
v vocabulary (real rows; padded rows are cut off).

Design
------
- **Two decode paths.** For the local and fused layer specs (``decode_impl="fused"``, the
  default where supported) :class:`~aligner.rollout.decode.FusedDecoder` runs the prefill
  and every decode step on the model's own parameters with a fraction of megatron-core's
  per-step Python dispatch, with its own KV cache. Otherwise (``"megatron"``, any layer
  spec) every forward goes through megatron-core's model with its
  :class:`StaticInferenceContext` (one per model chunk: megatron-core's attention stores
  the keys and values; the engine moves ``sequence_len_offset`` forward and drops finished
  rows' slots). The two agree to float rounding; tests hold both to HF greedy parity.
- **Prompts of different lengths: right padding.** Every prompt starts at column 0, so a
  token's column is its position and the rotary embedding is exact without position ids.
  With the fused decoder the prefill runs every prompt whole (``max(prompt lengths)``
  columns, a causal mask: a row's padding comes after its tokens, so no token attends to
  it) and takes each row's logits at its own last prompt token: the first decision of
  every row is its first response token, and no decode step reads a prompt token. Each
  row then decodes at its own column; the fused decoder's per-row positions (rope, cache
  column, a mask of the keys past the row's position: the padding, until the row's own
  tokens overwrite it) are those of continuous batching below. megatron-core's static
  context has one sequence offset for the whole batch, so on its path every row is at the
  same column: the prefill runs the shortest prompt's columns and a longer prompt's
  remaining tokens are fed one per decode step (the row's own token is taken instead of a
  sampled one). Masks given to megatron-core are explicit: causal ``[1, 1, s, s]`` for the
  prefill, all-visible ``[1, 1, 1, s_kv]`` for decode steps (True = blocked).
- **Sampling decisions** are made on exactly one rank: the first tensor-parallel rank of
  the last pipeline stage (the *source*). Logits are gathered over the TP group
  (``runtime_gather_output=True``), the source picks the tokens (its per-sample generators
  are the only random state used; with the fused decoder each sample's uniforms are drawn
  a block at a time, the same numbers as one draw per step: ``sampling.SlotUniforms``),
  their log-probs and the finished flags, and broadcasts them as one ``[3, b]`` float64
  tensor over the model-parallel group (TP x PP; with no other rank nothing is packed or
  sent). Every rank therefore holds the same tokens and returns the same result.
- **Pipeline parallelism** runs stage by stage for every forward: the first stage embeds
  the step's tokens, each stage sends its hidden state ``[s, b, h]`` to the next with a
  point-to-point send/recv, the last stage computes the logits. With virtual pipeline
  chunks the activation goes around the ring of pipeline ranks once per chunk. Pipeline
  bubbles are accepted: generation is one sequence of dependent steps.
- **Sequence parallelism** (a model built with it at TP > 1): the fused decoder's prefill
  and steps hold every row on every rank, as without it. megatron-core's forward splits a
  call's columns over the TP ranks, so on its path the prefill runs the shortest prompt
  cut to a multiple of TP (the rest is fed as a longer prompt's tail) and a decode step
  runs its token then TP - 1 copies behind a causal mask (:meth:`RolloutEngine._forward`).
- **Log-probs** are ``log_softmax`` of the raw fp32 logits at the chosen token: the
  model's own distribution, before temperature, top-k and top-p; the same value the
  training path computes on a full forward of the finished sequence.
- **Stops**: each row ends on its own, on a stop token (kept as the last response token),
  on a stop string appearing in its decoded response (the token that completes it is the
  last one kept), after ``max_new_tokens``, or when the context is full. Finished rows are
  removed from the batch and their cache slots dropped.
- **Continuous batching** (fused decoder, ``continuous_batching=True``, the default): when
  a call has more prompts than ``max_batch``, a finished row's slot goes to the next
  waiting prompt (prompts enter shortest first) instead of the batch running on thinner
  until its longest row ends; slots are dropped only when nothing waits. A call's decode
  steps then follow the total of the response lengths over ``max_batch``, not the sum over
  batches of each batch's longest response. Each slot has its own position: the fused
  decoder indexes the rope tables per row, writes each row's key and value at the row's
  own column and masks keys beyond the row's extent (and before its sliding window).
  Waiting prompts are prefilled by the fused decoder ``max_batch`` at a time, ahead of
  the slots they take (right padded, causal attention within each prompt, every prompt
  but its last token); a prompt's keys and values are copied into the slot it takes, and
  the slot's next decode step feeds its last prompt token beside the running rows' tokens,
  which decides its first response token.
  Which slots refill with which prompts follows from the broadcast finished flags alone,
  so every rank of the model-parallel group takes the same decisions. Sample i draws from
  its own generator (``seed_for(seed, i)`` or ``seeds[i]``) whatever slot and step it
  decodes in, and the logits of a row do not depend on its neighbours (to float
  rounding), so outputs are those of batch-by-batch decoding. Decode steps through
  megatron-core's forward (``decode_impl="megatron"``, the Transformer Engine spec) keep
  one position for the whole batch and run batch by batch, and so does a generation that
  records routing (``record_routing``; the capture follows every row's own column).
  docs/rollout.md has the measurements.

All ranks of a model-parallel group call :meth:`RolloutEngine.generate` together with the
same prompts and config (SPMD); data-parallel replicas generate independently, except
that with experts split over data-parallel ranks (EP > 1) they call ``generate`` together
(any prompts each): a replica with nothing left to generate passes a dummy token through its
MoE layers while another one still runs, since every forward exchanges tokens between them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer

from aligner.models.config import ModelConfig
from aligner.models.gpt import unwrap_model
from aligner.models.moe import RoutingCapture
from aligner.parallel import get_device
from aligner.rollout.decode import FusedDecoder, unsupported_reason
from aligner.rollout.sampling import SlotUniforms, chosen_logprobs, select_tokens

# Why a row stopped: code in the broadcast decision tensor -> name in the result.
CONTINUE, STOP_TOKEN, STOP_STRING, MAX_NEW_TOKENS, CONTEXT_LENGTH = 0, 1, 2, 3, 4
STOP_REASONS = {
    STOP_TOKEN: "stop_token",
    STOP_STRING: "stop_string",
    MAX_NEW_TOKENS: "max_new_tokens",
    CONTEXT_LENGTH: "context_length",
}


@dataclass
class GenerationConfig:
    """How to generate (config group ``generation``).

    max_new_tokens: response tokens per sample at most.
    greedy: argmax decoding; temperature, top_k and top_p are then ignored. A
    ``temperature`` of 0 also means greedy.
    temperature: logits are divided by it before sampling (> 0).
    top_k: sample among the k most likely tokens (0 = no limit).
    top_p: nucleus sampling: the smallest set of most likely tokens whose mass reaches
    top_p (1.0 = no limit).
    stop_token_ids: a sample ends after emitting one of these (kept in its response).
    None means the tokenizer's EOS (or the model config's ``eos_token_id``); [] means none.
    stop_strings: a sample ends when its decoded response contains one of these (needs a
    tokenizer).
    seed: base seed; sample i of a call draws from ``seed_for(seed, i)`` unless the call
    passes per-request ``seeds``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: Optional[Sequence[int]] = None
    stop_strings: Sequence[str] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self):
        def bad(name, expected):
            value = getattr(self, name)
            raise ValueError(f"GenerationConfig.{name} = {value!r}: expected {expected}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "a positive integer")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = no top-k)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not (0.0 < self.top_p <= 1.0):
            bad("top_p", "a number in (0, 1]")
        if not isinstance(self.greedy, bool):
            bad("greedy", "true or false")
        if not _is_int(self.seed):
            bad("seed", "an integer")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not all(
                    _is_int(t) for t in self.stop_token_ids):
                bad("stop_token_ids", "a list of integer token ids (or null for the EOS token)")
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if isinstance(self.stop_strings, str):
            bad("stop_strings", "a list of strings, not one string")
        self.stop_strings = tuple(self.stop_strings or ())
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(
                    f"GenerationConfig.stop_strings contains {s!r}: expected non-empty strings"
                )
        if self.temperature == 0:
            self.greedy = True

    @property
    def sampling(self) -> bool:
        return not self.greedy


@dataclass
class GenerationResult:
    """What :meth:`RolloutEngine.generate` returns, rows in the order of the prompts.

    tokens: [n, L] int64, prompt followed by response, right-padded with ``pad_id``.
    lengths: [n] prompt + response tokens. prompt_lengths / response_lengths: [n].
    logprobs: [n, R] fp32, ``logprobs[i, j]`` = log-prob of response token j of row i under
    the model's unmodified distribution (``log_softmax`` of the raw logits), 0 past the end.
    texts: decoded responses when the engine has a tokenizer (a final stop token is left
    out of the text; a stop string is kept), else None.
    stop_reasons: per row, ``stop_token``, ``stop_string``, ``max_new_tokens`` or
    ``context_length``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    response_lengths: torch.Tensor
    logprobs: torch.Tensor
    texts: Optional[list]
    stop_reasons: list
    prompt_lengths: torch.Tensor
    pad_id: int = 0
    routing: Optional[torch.Tensor] = None  # [n, L, layers, k] with record_routing (see generate)
    routing_layers: Optional[list] = None  # the layer numbers of routing's third axis

    def response_tokens(self, i: int) -> list:
        start = int(self.prompt_lengths[i])
        return self.tokens[i, start:int(self.lengths[i])].tolist()

    def response_logprobs(self, i: int) -> torch.Tensor:
        return self.logprobs[i, :int(self.response_lengths[i])]

    def __len__(self) -> int:
        return len(self.stop_reasons)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def seed_for(base_seed: int, index: int) -> int:
    """Seed of sample ``index`` of a call with ``GenerationConfig.seed = base_seed``
    (decorrelated streams: numpy ``SeedSequence`` of the pair)."""
    return int(np.random.SeedSequence([int(base_seed) & (2**63 - 1), int(index)]).generate_state(
        1, np.uint64)[0] & (2**63 - 1))


class RolloutEngine:
    """Generate from this rank's model chunks (see the module docstring for the design).

    model_chunks: this rank's model, or its list of virtual-pipeline chunks (wrappers such
    as DDP / Float16Module are unwrapped); every chunk must be a causal LM (no score head).
    model_cfg: the architecture (vocabulary size, context length, EOS / pad ids).
    tokenizer: optional, anything with ``encode(str) -> list[int]`` and
    ``decode(list[int]) -> str`` (and ``eos_id`` / ``pad_id`` when known); needed for string
    prompts, stop strings and texts.
    max_batch: prompts are generated in batches of at most this many rows (sorted by length,
    so that rows of similar length share a batch).
    max_seq_len: context length (prompt + response); default and upper bound
    ``model_cfg.max_position_embeddings``.
    decode_impl: how the forwards run. ``"megatron"``: megatron-core's forward with its
    ``StaticInferenceContext`` for the prefill and every step (any layer spec; a longer
    prompt's tail is fed one token per step); ``"fused"``:
    :class:`~aligner.rollout.decode.FusedDecoder` on the same parameters, every prompt
    prefilled whole (local and fused layer specs; much less Python overhead per step);
    ``"auto"``: fused where supported, else megatron.
    continuous_batching: with the fused decoder, a row that finishes hands its slot to the
    next waiting prompt of the call, so up to ``max_batch`` rows decode at every step until
    the prompts run out (see the module docstring); False decodes the prompts in batches of
    ``max_batch``, each until its last row ends. Outputs are the same either way. Decode
    steps through megatron-core's forward always run batch by batch.

    Constructing the engine is a collective over the model-parallel group.
    """

    # Sampling with the fused decoder draws each sample's uniforms this many (at most
    # max_new_tokens) at a time from its generator (SlotUniforms): one call per sample and
    # block instead of per sample and step, the same numbers.
    draw_block = 256

    def __init__(self, model_chunks, model_cfg: ModelConfig, tokenizer=None, max_batch: int = 64,
                 max_seq_len: Optional[int] = None, decode_impl: str = "auto",
                 continuous_batching: bool = True):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        if not chunks:
            raise ValueError("RolloutEngine needs at least one model chunk")
        self.models = unwrap_model(chunks)
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"RolloutEngine max_batch = {max_batch!r}: expected a positive integer")
        self.max_batch = int(max_batch)
        context = model_cfg.max_position_embeddings
        if max_seq_len is not None and (not _is_int(max_seq_len) or not 1 < max_seq_len <= context):
            raise ValueError(
                f"RolloutEngine max_seq_len = {max_seq_len!r}: expected an integer in 2..{context}"
                " (model.max_position_embeddings)"
            )
        self.max_seq_len = int(max_seq_len or context)
        for i, model in enumerate(self.models):
            config = model.config
            if getattr(model, "head", None) is not None:
                raise ValueError(f"model chunk {i} has a {model.head_type!r} head: generation needs a causal LM")
            if config.context_parallel_size != 1:
                raise ValueError("generation does not support context parallelism (parallel.cp must be 1)")
        config = self.models[0].config
        self.hidden_size = config.hidden_size
        self.pipeline_dtype = config.pipeline_dtype or config.params_dtype
        self.device = get_device()
        self.vocab_size = model_cfg.vocab_size

        # sequence parallelism: megatron-core's forward splits dim 0 ([s, b, h]) over the TP
        # ranks (see _forward); the fused decoder's steps keep every row on every rank
        self.sp_size = ps.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        if self.pp_size > 1:
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
        has_logits = any(m.post_process for m in self.models)
        self.is_source = has_logits and ps.get_tensor_model_parallel_rank() == 0
        self.mp_group = None
        self.source_rank = None
        if torch.distributed.is_initialized():
            group = ps.get_model_parallel_group()
            if torch.distributed.get_world_size(group) > 1:
                # Find the source's global rank: the largest rank that says it is the source.
                me = torch.tensor([torch.distributed.get_rank() if self.is_source else -1],
                                  dtype=torch.int64, device=self.device)
                torch.distributed.all_reduce(me, op=torch.distributed.ReduceOp.MAX, group=group)
                self.mp_group, self.source_rank = group, int(me.item())
        self.decoder = self._make_decoder(decode_impl)
        if self.decoder is None and self.sp_size > 1:
            for model in self.models:
                for layer in model.decoder.layers:
                    if not isinstance(layer.self_attention.core_attention, DotProductAttention):
                        raise ValueError(
                            "generation under parallel.sequence_parallel = true through megatron-core's forward"
                            " needs attention that honours an explicit mask (a decode step is padded to TP"
                            f" columns), which {type(layer.self_attention.core_attention).__name__} does not:"
                            " set model.layer_spec = fused"
                        )
        if not isinstance(continuous_batching, bool):
            raise ValueError(
                f"RolloutEngine continuous_batching = {continuous_batching!r}: expected true or false"
            )
        # every rank took the same decoder choice, so every rank takes the same path
        self.continuous = continuous_batching and self.decoder is not None
        self.forwards = 0  # model forwards (prefills and decode steps) since construction
        self.row_steps = 0  # rows x decode steps since construction (the decode work done)
        self.routing_capture = RoutingCapture(self.models)  # an MoE model's routers (else none)
        self._ep_group, self._moe_layers = self._expert_parallel()

    def _make_decoder(self, decode_impl: str) -> Optional[FusedDecoder]:
        """The fused decoder, or None for megatron-core decode steps; every rank of the
        model-parallel group takes the same choice."""
        if decode_impl not in ("auto", "fused", "megatron"):
            raise ValueError(
                f"RolloutEngine decode_impl = {decode_impl!r}: expected 'auto', 'fused' or 'megatron'"
            )
        if decode_impl == "megatron":
            return None
        reason = unsupported_reason(self.models)
        if self.mp_group is not None:
            ok = torch.tensor([0 if reason else 1], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=self.mp_group)
            if not ok.item() and reason is None:
                reason = "another pipeline stage's layers are not supported"
        if reason is not None:
            if decode_impl == "fused":
                raise ValueError(f"RolloutEngine decode_impl = 'fused' is not possible: {reason}")
            return None
        return FusedDecoder(self.models, self.vocab_size, self.device,
                            getattr(self, "prev_rank", None), getattr(self, "next_rank", None))

    def _expert_parallel(self):
        """(group, MoE layers) when this rank's experts are split over an expert-parallel
        group (EP > 1), else (None, []). The token dispatcher of every MoE layer exchanges
        tokens within the expert-parallel x tensor-parallel group, so every rank of it must
        run each MoE layer the same number of times, though its data-parallel replica may
        have fewer prompts or finish sooner (see :meth:`_ep_running`)."""
        layers = [layer.mlp for model in self.models for layer in model.decoder.layers
                  if isinstance(getattr(layer, "mlp", None), MoELayer)]
        if not layers or not torch.distributed.is_initialized() or ps.get_expert_model_parallel_world_size() == 1:
            return None, []
        return ps.get_expert_tensor_and_model_parallel_group(), layers

    def _ep_running(self, running: bool) -> bool:
        """Whether any rank of the expert-parallel group runs a forward next (collective over
        it; ``running``: whether this rank does). Every forward of a generation is preceded
        by this call with True; a rank with nothing left to generate calls it with False
        and, while another rank still runs, passes a dummy token through its MoE layers
        (:meth:`_idle_moe_pass`) in step with that rank's forward."""
        if self._ep_group is None:
            return running
        flag = torch.tensor([1 if running else 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._ep_group)
        return bool(flag.item())

    def keep_in_step(self) -> None:
        """For a rank that skips a :meth:`generate` call its expert-parallel peers make (e.g.
        an extra round of generation only some data-parallel ranks need): pass its share of
        their forwards' token exchange until none of them generates any more. A no-op
        without expert parallelism; with it, collective over the expert-parallel x
        tensor-parallel group."""
        if self._ep_group is None:
            return
        was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        try:
            self._keep_in_step()
        finally:
            for m, training in zip(self.models, was_training):
                m.train(training)
            self._drop_inference_buffers()

    def _drop_inference_buffers(self) -> None:
        """Forget megatron-core's global memory buffers made during generation: under sequence
        parallelism its layers all-gather into them, and one made in inference mode cannot
        be written by a later training pass (torch refuses in-place updates of inference
        tensors); that pass makes its own."""
        if self.sp_size > 1:
            buffers = ps.get_global_memory_buffer().buffer
            for key in [k for k, t in buffers.items() if t.is_inference()]:
                del buffers[key]

    def _keep_in_step(self) -> None:
        while self._ep_running(False):  # another expert-parallel rank still generates
            self._idle_moe_pass()

    @torch.inference_mode()
    def _idle_moe_pass(self) -> None:
        """Each MoE layer of this rank, in forward order, on one dummy token ``[1, 1, h]``
        (zeros; megatron-core's router cannot take zero tokens): this rank's share of the
        token exchange of a forward another expert-parallel rank runs. Routing is dropless
        and an expert's MLP acts on each token alone, so the dummy token changes no other
        token's output; its own output is dropped."""
        dummy = torch.zeros((1, 1, self.hidden_size), dtype=self.pipeline_dtype, device=self.device)
        for moe in self._moe_layers:
            moe(dummy)

    # ------------------------------------------------------------------ inputs
    def _pad_id(self) -> int:
        for value in (getattr(self.tokenizer, "pad_id", None), self.model_cfg.pad_token_id,
                      getattr(self.tokenizer, "eos_id", None)):
            if _is_int(value) and 0 <= value < self.vocab_size:
                return int(value)
        return 0

    def _default_stop_ids(self) -> list:
        eos = getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = self.model_cfg.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def _token_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise TypeError(
                f"prompts: expected a list of strings or of token-id lists, got {type(prompts).__name__}"
            )
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompts[{i}] is a string: string prompts need a tokenizer")
                ids = list(self.tokenizer.encode(prompt))
            elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
                ids = prompt.tolist()
            elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
                ids = list(prompt)
            else:
                raise TypeError(
                    f"prompts[{i}]: expected a string or a list of token ids, got {type(prompt).__name__}"
                )
            if not ids:
                raise ValueError(
                    f"prompts[{i}] is empty: generation needs at least one prompt token (e.g. BOS)"
                )
            for j, tok in enumerate(ids):
                if not _is_int(tok) or not 0 <= tok < self.vocab_size:
                    raise ValueError(
                        f"prompts[{i}][{j}] = {tok!r}: expected a token id in 0..{self.vocab_size - 1}"
                    )
            if len(ids) >= self.max_seq_len:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens but the context holds {self.max_seq_len}"
                    " (prompt + response): no room to generate; shorten the prompt"
                )
            out.append([int(t) for t in ids])
        return out

    def _stop_ids(self, config: GenerationConfig) -> list:
        ids = self._default_stop_ids() if config.stop_token_ids is None else list(config.stop_token_ids)
        for tok in ids:
            if not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"GenerationConfig.stop_token_ids contains {tok}, which is not a token of the"
                    f" vocabulary (0..{self.vocab_size - 1})"
                )
        return sorted(set(ids))

    # ------------------------------------------------------------------ public
    def generate(self, prompts, config: Optional[GenerationConfig] = None,
                 seeds: Optional[Sequence[int]] = None, record_routing: bool = False) -> GenerationResult:
        """Generate a response for every prompt (strings or token-id lists).

        seeds: one per prompt (reproducible per request), or None for
        ``seed_for(config.seed, i)``. Returns a :class:`GenerationResult` (CPU tensors), the
        same on every rank of the model-parallel group. record_routing (an MoE model): the
        result's ``routing`` holds the experts every token fed to the model was routed to
        by this rank's MoE layers, aligned with ``tokens`` (the last token of a row, never
        fed, and padding: -1), for routing replay (aligner.models.moe).
        """
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config: expected a GenerationConfig, got {type(config).__name__}")
        token_prompts = self._token_prompts(prompts)
        n = len(token_prompts)
        stop_ids = self._stop_ids(config)
        if config.stop_strings and self.tokenizer is None:
            raise ValueError("GenerationConfig.stop_strings needs a tokenizer (RolloutEngine(tokenizer=...))")
        if seeds is None:
            seeds = [seed_for(config.seed, i) for i in range(n)]
        else:
            seeds = list(seeds)
            if len(seeds) != n:
                raise ValueError(f"seeds: {len(seeds)} seeds for {n} prompts; pass one per prompt")
            for i, s in enumerate(seeds):
                if not _is_int(s):
                    raise ValueError(f"seeds[{i}] = {s!r}: expected an integer")

        if record_routing and not self.routing_capture.enabled:
            raise ValueError("record_routing: the model has no mixture-of-experts layers")
        responses: list = [None] * n
        order = sorted(range(n), key=lambda i: len(token_prompts[i]))
        was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        width = min(max((len(p) for p in token_prompts), default=0) + config.max_new_tokens, self.max_seq_len)
        capture = self.routing_capture
        try:
            # up to max_batch prompts are one batch either way: nothing would wait for a slot;
            # routing is recorded batch by batch
            continuous = self.continuous and not record_routing
            with capture.recording(n, width) if record_routing else contextlib.nullcontext():
                if continuous:
                    self._generate_fused(token_prompts, order, seeds, config, stop_ids, responses, False)
                for start in range(0, 0 if continuous else n, self.max_batch):
                    rows = order[start:start + self.max_batch]
                    if self.decoder is not None:
                        self._generate_fused(token_prompts, rows, seeds, config, stop_ids, responses,
                                             record_routing)
                        continue
                    batch = self._generate_batch(
                        [token_prompts[i] for i in rows], [seeds[i] for i in rows], config, stop_ids,
                        row_ids=rows if record_routing else None,
                    )
                    for i, resp in zip(rows, batch):
                        responses[i] = resp
            self._keep_in_step()  # after the recording: the idle passes' dummy tokens are no row's
        finally:
            for m, training in zip(self.models, was_training):
                m.train(training)
            self._drop_inference_buffers()
        result = self._result(token_prompts, responses, config.max_new_tokens)
        if record_routing:
            result.routing = capture.choices[:, :result.tokens.shape[1]]
            result.routing_layers = list(capture.layers)
        return result

    # ------------------------------------------------------------------ result
    def _result(self, prompts, responses, max_new_tokens) -> GenerationResult:
        n = len(prompts)
        pad = self._pad_id()
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        response_lengths = torch.tensor([len(r[0]) for r in responses], dtype=torch.int64)
        lengths = prompt_lengths + response_lengths
        width = int(lengths.max()) if n else 0
        resp_width = int(response_lengths.max()) if n else 0
        # built as padded Python lists, one tensor each (fp32 log-probs round-trip exactly)
        tokens = torch.tensor([prompt + resp + [pad] * (width - len(prompt) - len(resp))
                               for prompt, (resp, _, _) in zip(prompts, responses)],
                              dtype=torch.int64).view(n, width)
        logprobs = torch.tensor([logps + [0.0] * (resp_width - len(logps)) for (_, logps, _) in responses],
                                dtype=torch.float32).view(n, resp_width)
        reasons = [STOP_REASONS[r[2]] for r in responses]
        texts = None
        if self.tokenizer is not None:
            ids = [list(resp[:-1] if code == STOP_TOKEN else resp) for (resp, _, code) in responses]
            batch = getattr(self.tokenizer, "decode_batch", None)  # aligner's tokenizers: one call
            texts = batch(ids) if batch is not None else [self.tokenizer.decode(x) for x in ids]
        return GenerationResult(tokens=tokens, lengths=lengths, response_lengths=response_lengths,
                                logprobs=logprobs, texts=texts, stop_reasons=reasons,
                                prompt_lengths=prompt_lengths, pad_id=pad)

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def _generate_batch(self, prompts, seeds, config: GenerationConfig, stop_ids, row_ids=None) -> list:
        """Generate for one batch with decode steps through megatron-core's forward; returns
        per row ``(response ids, log-probs, stop code)``.

        megatron-core's static inference context keeps one sequence offset for the whole
        batch, so every row is at the same column: the prefill runs the shortest prompt's
        columns and a longer prompt's remaining tokens are fed one per decode step (those
        rows are *in prompt*: their own token is taken instead of a sampled one). State is
        kept in cache-slot order (``rows[j]`` is the prompt index of slot j); finished rows
        are written out and their slots removed. row_ids: the prompts' rows in the routing
        being recorded (None: not recording).
        """
        device = self.device
        b = len(prompts)
        max_new = config.max_new_tokens
        plen = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        end = torch.clamp(plen + max_new, max=self.max_seq_len)  # one past a row's last column
        total = int(end.max())
        max_plen = int(plen.max())
        tokens = torch.full((b, total), self._pad_id(), dtype=torch.int64, device=device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.int64, device=device)
        # logprobs[j, c]: log-prob of the token at column c (response columns only are read)
        logprobs = torch.zeros((b, total), dtype=torch.float32, device=device)
        stop_t = torch.tensor(stop_ids, dtype=torch.int64, device=device)
        generators = None
        if config.sampling and self.is_source:
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        rows = list(range(b))
        out: list = [None] * b

        t = self._prefill_columns(int(plen.min()))
        # megatron-core's decode steps under sequence parallelism write sp_size - 1 padding
        # columns past a step
        contexts = [StaticInferenceContext(b, total + self.sp_size - 1) for _ in self.models]
        if row_ids is not None:  # which rows and columns the model call routes
            self.routing_capture.feed(row_ids, range(t))
        logits = self._prefill(tokens, t, contexts)
        while True:
            # Column t of every slot: sampled, or the slot's own prompt token while t < its length.
            in_prompt = (t < plen) if t < max_plen else None
            chosen, logp, finished = self._shared_decision(
                logits, t, in_prompt, tokens, plen, end,
                [generators[r] for r in rows] if generators else None, config, stop_t, len(rows), device)
            tokens[:, t] = chosen
            logprobs[:, t] = logp
            t += 1
            if bool(finished.any()):
                done = finished.nonzero().squeeze(-1).tolist()
                self._write_out(out, done, rows, tokens, logprobs, plen, t, stop_t, config)
                keep_mask = ~finished
                if not bool(keep_mask.any()):
                    break
                keep = keep_mask.nonzero().squeeze(-1)
                self._keep_cache_rows(contexts, keep)
                tokens, logprobs = tokens[keep], logprobs[keep]
                plen, end = plen[keep], end[keep]
                kept = keep.tolist()
                rows = [rows[j] for j in kept]
                max_plen = int(plen.max())
            self.row_steps += len(rows)
            if row_ids is not None:
                self.routing_capture.feed([row_ids[r] for r in rows], [t - 1])
            self._ep_running(True)
            logits = self._forward(tokens[:, t - 1:t], self._visible_mask(t), contexts)
        return out

    @torch.inference_mode()
    def _generate_fused(self, prompts, order, seeds, config: GenerationConfig, stop_ids, out: list,
                        record: bool) -> None:
        """Generate with the fused decoder for the prompts ``order`` (indices into ``prompts``,
        shortest first), writing ``out[i] = (response ids, log-probs, stop code)``; with slot
        refill when there are more of them than ``max_batch``.

        The first ``max_batch`` start together: one prefill of every prompt whole (right
        padded, :meth:`FusedDecoder.prefill`), whose logits give each row's first response
        token. The rest wait. Slot j holds prompt ``rows[j]`` at its own column ``col[j]``
        (the column being decided); every step decides a response token for every slot. A
        slot whose row finished takes the next waiting prompt (:meth:`_admit`); when none
        waits the slot is dropped. Every rank takes the same decisions: they follow from the
        broadcast finished flags alone. record: feed the routing capture (prompt index =
        routing row) before every forward (batch by batch only: nothing may wait).
        """
        device = self.device
        max_new = config.max_new_tokens
        total = max(min(len(prompts[i]) + max_new, self.max_seq_len) for i in order)
        b = min(self.max_batch, len(order))
        rows, waiting = list(order[:b]), list(reversed(order[b:]))  # pop() gives the next prompt
        tokens = torch.full((b, total), self._pad_id(), dtype=torch.int64, device=device)
        for j, i in enumerate(rows):
            tokens[j, :len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.int64, device=device)
        logprobs = torch.zeros((b, total), dtype=torch.float32, device=device)
        plen = torch.tensor([len(prompts[i]) for i in rows], dtype=torch.int64, device=device)
        end = torch.clamp(plen + max_new, max=self.max_seq_len)
        stop_t = torch.tensor(stop_ids, dtype=torch.int64, device=device)
        # one generator per sample, made when it enters a slot: its stream is its own; its
        # uniforms are drawn a block at a time (the same numbers as one draw per step)
        uniforms = None
        if config.sampling and self.is_source:
            uniforms = SlotUniforms(min(max_new, self.draw_block), device)
            uniforms.reset([seeds[i] for i in rows])
        capture = self.routing_capture if record else None
        assert capture is None or not waiting, "routing is recorded batch by batch"
        staged: dict = {}  # waiting prompt -> its prefilled keys and values (see _admit)

        width = int(plen.max())
        self.decoder.start(b, total)
        if capture is not None:
            capture.feed(rows, range(width))
        self._ep_running(True)  # the prefill is a forward: MoE layers exchange tokens
        _, logits = self.decoder.prefill(tokens[:, :width], plen, torch.arange(b, device=device), logits=True)
        self.forwards += 1
        col = plen.clone()  # each slot's next column: its first response token
        # Per step only a few tensor ops of bookkeeping: tokens and log-probs are written
        # through flat indices (slot * total + column).
        base = torch.arange(b, device=device) * total
        while True:
            chosen, logp, finished = self._shared_decision(
                logits, col, None, tokens, plen, end, uniforms, config, stop_t, len(rows), device)
            flat = base + col
            tokens.view(-1).index_copy_(0, flat, chosen)
            logprobs.view(-1).index_copy_(0, flat, logp)
            col += 1
            feed = chosen  # the token each slot feeds next: the one just decided ...
            if bool(finished.any()):
                done = finished.nonzero().squeeze(-1).tolist()
                self._write_out(out, done, rows, tokens, logprobs, plen, col, stop_t, config)
                if capture is not None:  # a row's last token is never fed; its padding columns
                    for j in done:       # (routed in the prefill) are no token of it
                        capture.forget(rows[j], int(col[j]) - 1)
                refill = done[:len(waiting)]
                if refill:
                    newcomers = [waiting.pop() for _ in refill]
                    self._admit(refill, newcomers, prompts, seeds, max_new, rows, tokens, logprobs, plen, end, col,
                                uniforms, waiting, staged)
                gone = done[len(refill):]
                if gone:
                    if len(gone) == len(rows):
                        break
                    keep_mask = torch.ones(len(rows), dtype=torch.bool, device=device)
                    keep_mask[gone] = False
                    keep = keep_mask.nonzero().squeeze(-1)
                    self.decoder.keep_rows(keep)
                    if uniforms is not None:
                        uniforms.keep(keep)
                    tokens, logprobs = tokens[keep], logprobs[keep]
                    plen, end, col = plen[keep], end[keep], col[keep]
                    rows = [rows[j] for j in keep.tolist()]
                    base = torch.arange(len(rows), device=device) * total
                # ... except for the newcomers, whose last prompt token it is: read every slot's
                # from its column
                feed = tokens.view(-1).index_select(0, base + col - 1)
            self.row_steps += len(rows)
            if capture is not None:
                capture.feed_each(rows, col - 1)
            self._ep_running(True)
            logits = self.decoder.step(feed, col - 1)
            self.forwards += 1

    def _admit(self, slots, newcomers, prompts, seeds, max_new, rows, tokens, logprobs, plen, end, col,
               uniforms, waiting, staged) -> None:
        """Put the prompts ``newcomers`` into the freed ``slots`` (state updated in place).

        Prompts are prefilled ahead, ``max_batch`` at a time: a newcomer not yet prefilled
        is prefilled by the fused decoder together with the next waiting prompts
        (:meth:`FusedDecoder.prefill`, one call, right padded: every prompt but its last
        token; ``staged`` keeps the keys and values of those that wait on). A prompt that
        takes a slot gets its prefilled columns copied in (:meth:`FusedDecoder.take`); the
        slot's next step feeds its last prompt token beside the running rows' tokens and
        decides its first response token. A prefill of one newcomer costs about as much as
        one of ``max_batch`` (a CPU step's dispatch, a GPU's weight reads).
        """
        device = self.device
        for j, i in zip(slots, newcomers):
            p = prompts[i]
            rows[j] = i
            tokens[j] = self._pad_id()
            tokens[j, :len(p)] = torch.tensor(p, dtype=torch.int64, device=device)
            logprobs[j] = 0.0
            plen[j] = len(p)
            end[j] = min(len(p) + max_new, self.max_seq_len)
            if uniforms is not None:
                uniforms.assign(j, seeds[i])
        missing = [i for i in newcomers if i not in staged]
        if missing:  # every rank stages the same prompts: the order of ``waiting`` is shared
            group = missing + [i for i in reversed(waiting) if i not in staged][:self.max_batch - len(missing)]
            c = max(len(prompts[i]) for i in group) - 1
            kv = None
            if c > 0:
                ids = torch.full((len(group), c), self._pad_id(), dtype=torch.int64, device=device)
                for row, i in enumerate(group):
                    ids[row, :len(prompts[i]) - 1] = torch.tensor(prompts[i][:-1], dtype=torch.int64, device=device)
                self._ep_running(True)  # the prefill is a forward: MoE layers exchange tokens
                lengths = torch.tensor([len(prompts[i]) - 1 for i in group], dtype=torch.int64, device=device)
                kv, _ = self.decoder.prefill(ids, lengths)
                self.forwards += 1
            for row, i in enumerate(group):
                staged[i] = (kv, row)
        for j, i in zip(slots, newcomers):
            kv, row = staged.pop(i)
            if len(prompts[i]) > 1:
                self.decoder.take(kv, row, j, len(prompts[i]) - 1)
            col[j] = len(prompts[i])

    def _write_out(self, out, done, rows, tokens, logprobs, plen, t, stop_t, config) -> None:
        """Record the finished slots ``done`` (their last column is ``t - 1``; ``t`` an int
        or per slot [b]) with the reason."""
        stop_set = set(stop_t.tolist())
        starts = plen.tolist()  # one conversion each for all the slots, not one per slot
        ends = t.tolist() if isinstance(t, torch.Tensor) else [t] * len(starts)
        for j in done:
            p, t_j = starts[j], ends[j]
            resp = tokens[j, p:t_j].tolist()
            if resp[-1] in stop_set:
                code = STOP_TOKEN
            elif config.stop_strings and self._has_stop_string(resp, config.stop_strings):
                code = STOP_STRING
            elif len(resp) >= config.max_new_tokens:
                code = MAX_NEW_TOKENS
            else:
                code = CONTEXT_LENGTH
            out[rows[j]] = (resp, logprobs[j, p:t_j].tolist(), code)

    def _has_stop_string(self, response_ids, stop_strings) -> bool:
        text = self.tokenizer.decode(list(response_ids))
        return any(s in text for s in stop_strings)

    def _shared_decision(self, logits, t, in_prompt, tokens, plen, end, generators, config, stop_t,
                         n_rows: int, device):
        """The source rank's decision for the rows' next tokens (:meth:`_decide`), sent to every
        rank of the model-parallel group as one ``[3, b]`` float64 tensor (exact for token
        ids, fp32 log-probs and flags): (chosen token ids, their log-probs, finished flags).
        ``generators``: the slots' generators, or their :class:`SlotUniforms`."""
        if self.mp_group is None:  # this rank is the source and the only rank: nothing to send
            return self._decide(logits, t, in_prompt, tokens, plen, end, generators, config, stop_t)
        if self.is_source:
            decision = torch.stack([x.double() for x in self._decide(
                logits, t, in_prompt, tokens, plen, end, generators, config, stop_t)])
        else:
            decision = torch.empty((3, n_rows), dtype=torch.float64, device=device)
        torch.distributed.broadcast(decision, src=self.source_rank, group=self.mp_group)
        return decision[0].long(), decision[1].float(), decision[2] != 0

    def _decide(self, logits, t, in_prompt, tokens, plen, end, generators,
                config: GenerationConfig, stop_t):
        """On the source rank: token, log-prob and finished flag of column ``t`` (an int, or
        per slot [b]) for every slot -> ([b] int64, [b] fp32, [b] bool). ``in_prompt`` [b]
        marks slots still reading their prompt (None when no slot does); ``generators``: the
        slots' own, or (no slot in its prompt) their :class:`SlotUniforms`; None when greedy."""
        if in_prompt is None:
            drawn = isinstance(generators, SlotUniforms)
            chosen = select_tokens(logits, greedy=config.greedy, temperature=config.temperature,
                                   top_k=config.top_k, top_p=config.top_p,
                                   generators=None if drawn else generators,
                                   uniforms=generators.draw() if drawn else None)
        else:
            # Only generating slots draw random numbers: a sample's stream is its own.
            if isinstance(t, torch.Tensor):
                chosen = tokens.gather(1, t[:, None]).squeeze(1)
            else:
                chosen = tokens[:, t].clone()
            gen_idx = (~in_prompt).nonzero().squeeze(-1)
            if gen_idx.numel():
                gens = None if generators is None else [generators[j] for j in gen_idx.tolist()]
                chosen[gen_idx] = select_tokens(
                    logits[gen_idx], greedy=config.greedy, temperature=config.temperature,
                    top_k=config.top_k, top_p=config.top_p, generators=gens,
                )
        logp = chosen_logprobs(logits, chosen)
        finished = t + 1 >= end
        if stop_t.numel():
            finished |= torch.isin(chosen, stop_t)
        if in_prompt is not None:
            finished &= ~in_prompt
        if config.stop_strings:
            for j in (~finished).nonzero().squeeze(-1).tolist():
                if in_prompt is not None and bool(in_prompt[j]):
                    continue
                p = int(plen[j])
                t_j = int(t[j]) if isinstance(t, torch.Tensor) else t
                ids = tokens[j, p:t_j].tolist() + [int(chosen[j])]
                if self._has_stop_string(ids, config.stop_strings):
                    finished[j] = True
        return chosen, logp, finished

    # ------------------------------------------------------------------ model steps
    def _prefill_columns(self, shortest: int) -> int:
        """The columns the prefill runs: the shortest prompt, under sequence parallelism cut
        to a multiple of the TP size (megatron-core splits them evenly over the TP ranks; the
        rest are fed one per step as a longer prompt's tail); may be 0."""
        return shortest - shortest % self.sp_size

    def _prefill(self, tokens: torch.Tensor, t: int, contexts) -> Optional[torch.Tensor]:
        """The prefill of columns ``0..t-1`` of every row -> the logits of column ``t`` (as
        :meth:`_forward`). With ``t == 0`` (sequence parallelism, a prompt shorter than the
        TP size) nothing runs: column 0 is every row's own prompt token, so the source's
        decision reads no logits and gets zeros."""
        if t == 0:
            return torch.zeros((tokens.shape[0], self.vocab_size), device=self.device) if self.is_source else None
        self._ep_running(True)
        return self._forward(tokens[:, :t], self._causal_mask(t), contexts)

    def _causal_mask(self, s: int) -> torch.Tensor:
        return torch.ones((s, s), dtype=torch.bool, device=self.device).triu(1)[None, None]

    def _visible_mask(self, s_kv: int) -> torch.Tensor:
        return torch.zeros((1, 1, 1, s_kv), dtype=torch.bool, device=self.device)

    @staticmethod
    def _keep_cache_rows(contexts, keep: torch.Tensor) -> None:
        """Drop the cache slots of finished rows (keys/values are ``[s, b, groups, d]``)."""
        for ctx in contexts:
            for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
                ctx.key_value_memory_dict[layer] = (k.index_select(1, keep), v.index_select(1, keep))

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, contexts) -> Optional[torch.Tensor]:
        """One forward of ``input_ids`` [b, s] through every chunk on this rank, stage by
        stage; returns the last position's logits [b, v] fp32 where the output layer lives,
        else None."""
        b, s = input_ids.shape
        p = self.sp_size
        last = -1  # the last column's place in megatron-core's logits
        if s % p:
            # Sequence parallelism splits the s columns over the p TP ranks: a decode step
            # (s = 1) runs p columns, its token then p - 1 copies, behind a causal mask, so
            # the token sees the cache and itself only. The copies' keys land past the
            # cache's extent and the next step overwrites them. megatron-core keeps the
            # last column of each rank's share: here every column, the token's first.
            assert s == 1, s
            offset = contexts[0].sequence_len_offset
            input_ids = input_ids.expand(b, p)
            mask = torch.ones((p, offset + p), dtype=torch.bool, device=self.device).triu(offset + 1)[None, None]
            last = 0
        logits = None
        self.forwards += 1
        self.routing_capture.split = p  # each rank's routers see its share of the columns
        for model, ctx in zip(self.models, contexts):
            if model.pre_process:
                out = model(input_ids, None, mask, inference_context=ctx, runtime_gather_output=True)
            else:  # under sequence parallelism: this rank's share of the columns
                hidden = torch.empty((input_ids.shape[1] // p, b, self.hidden_size), dtype=self.pipeline_dtype,
                                     device=self.device)
                torch.distributed.recv(hidden, src=self.prev_rank)
                model.set_input_tensor(hidden)
                out = model(None, None, mask, inference_context=ctx, runtime_gather_output=True)
            if model.post_process:
                logits = out[:, last, :self.vocab_size].float()
            else:
                torch.distributed.send(out.contiguous(), dst=self.next_rank)
            ctx.increment_sequence_len_offset(s)
        self.routing_capture.split = 1
        return logits
