"""Experience for online algorithms: generate, score, old / reference log-probs, values
(docs/online_core.md). Shared by PPO, the REINFORCE family and SteerLM 2.0 sampling.

A step's experience (:meth:`ExperienceMaker.make`):

1. the step's prompts (the loop's global batch: its order is a function of the step) are
   split over data-parallel ranks; each prompt is sampled ``samples_per_prompt`` (G) times
   with :class:`aligner.rollout.RolloutEngine` on the live policy modules (no weight copy,
   any TP / PP layout). Sample ``k`` of the prompt at position ``j`` of step ``t`` has the
   global sample index ``(t · P + j) · G + k`` (P prompts per step) and draws from the
   seed ``seed_for(seed, global index)``: a run, a resumed run and any DP size generate
   the same responses.
2. the reward source scores the decoded responses (one scalar per response, and per
   attribute when it has attributes).
3. forward-only passes through megatron-core's schedule give the policy's log-probs of
   the sampled tokens on the training path (``old_logps``), the reference's
   (``ref_logps``) and the critic's values (``values``).

Shapes: n = (local prompts) x G rows, S positions (the longest prompt + response, padded
to a multiple of 8 x TP). Per-token tensors are aligned with the token they score:
position ``p`` holds ``log π(tokens[p] | tokens[<p])`` and the value ``V`` of the state
``tokens[<p]`` in which ``tokens[p]`` was chosen; ``response_mask[p] = 1`` on response
tokens. Rows of one prompt are consecutive (``group`` = the prompt's position in the
step), so group statistics (RLOO, GRPO) are reductions over blocks of G rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from aligner.rewards import RewardBatch, RewardSource
from aligner.rollout import GenerationConfig, RolloutEngine, seed_for
from aligner.training.batching import shifted_logprobs


@dataclass
class Experience:
    """One data-parallel rank's rollouts of a step (module docstring for shapes)."""

    tokens: torch.Tensor  # [n, S] long
    response_mask: torch.Tensor  # [n, S] float
    prompt_lengths: torch.Tensor  # [n]
    response_lengths: torch.Tensor  # [n]
    rollout_logps: torch.Tensor  # [n, S] from the rollout engine
    rewards: torch.Tensor  # [n] float64, the reward source's scalar
    truncated: torch.Tensor  # [n] bool: ended without a stop token (length limit)
    group: torch.Tensor  # [n] long: the prompt's position in the step
    sample_index: torch.Tensor  # [n] long: global sample index
    old_logps: Optional[torch.Tensor] = None  # [n, S]
    ref_logps: Optional[torch.Tensor] = None  # [n, S]
    values: Optional[torch.Tensor] = None  # [n, S]
    attribute_scores: Optional[torch.Tensor] = None  # [n, A]
    filler: Optional[torch.Tensor] = None  # [n] bool: rows that count for nothing (a batch topped up)
    texts: List[str] = field(default_factory=list)
    metadata: List[dict] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, rows: Sequence[int]) -> "Experience":
        """The rows ``rows`` (tensors indexed, lists picked)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()] if v else []
            else:
                out[f.name] = v
        return replace(self, **out)

    @staticmethod
    def concat(parts: Sequence["Experience"], pad_id: int = 0) -> "Experience":
        """The rows of ``parts`` in order, per-token tensors right-padded to the longest S
        (tokens with ``pad_id``, everything else with 0); timings summed."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        S = max(p.tokens.shape[1] for p in parts)
        out = {}
        for f in fields(Experience):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "timings":
                total: Dict[str, float] = {}
                for v in values:
                    for k, t in v.items():
                        total[k] = total.get(k, 0.0) + t
                out[f.name] = total
            elif all(v is None for v in values):
                out[f.name] = None
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            else:
                if any(v is None for v in values):
                    raise ValueError(f"Experience.concat: field {f.name} is set in some parts only")
                if values[0].dim() == 2 and f.name != "attribute_scores":
                    values = [F.pad(v, (0, S - v.shape[1]), value=pad_id if f.name == "tokens" else 0) for v in values]
                out[f.name] = torch.cat(values)
        return Experience(**out)


def collect_token_outputs(run_schedule, chunks, tokens: torch.Tensor, micro_batch_size: int, per_token,
                          from_last_stage) -> torch.Tensor:
    """``per_token(batch, output) -> [b, S]`` over every row of ``tokens`` [n, S] in a
    forward-only schedule over ``chunks``; [n, S] fp32 on every pipeline stage.

    The last micro-batch is filled with copies of row 0 (fixed shapes for the pipeline)."""
    n, s = tokens.shape
    micro = []
    for start in range(0, n, micro_batch_size):
        rows = tokens[start:start + micro_batch_size]
        real = rows.shape[0]
        if real < micro_batch_size:
            rows = torch.cat([rows, tokens[:1].expand(micro_batch_size - real, s)])
        micro.append({"tokens": rows, "position_ids": None, "attention_mask": None, "real": real})
    collected: List[torch.Tensor] = []

    def forward(model, batch):
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    def loss(batch, output):
        values = per_token(batch, output).float()
        collected.append(values[: batch["real"]].detach().cpu())
        return output.sum() * 0.0, 1, {}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        run_schedule(chunks, micro, forward, loss, forward_only=True)
    result = torch.cat(collected) if collected else None
    return from_last_stage(result)


def policy_logps(batch, logits) -> torch.Tensor:
    """Per-token log-probs of ``batch["tokens"]`` (aligned: position p scores token p)."""
    return shifted_logprobs(logits, batch["tokens"])


def critic_values(batch, values) -> torch.Tensor:
    """Values [b, s, 1] -> [b, s] aligned with the token chosen in that state (shift by one)."""
    return F.pad(values[..., 0][:, :-1], (1, 0))


class ExperienceMaker:
    """Makes a step's :class:`Experience` (module docstring).

    generation: the sampling settings (its ``seed`` is the base of the per-sample seeds);
    samples_per_prompt: G. reward: a :class:`aligner.rewards.RewardSource`. reference: a
    :class:`aligner.training.roles.ReferencePolicy` or None; critic: the critic's
    trainable role or None. tokenizer: the policy's (decodes responses). max_seq_len:
    prompt + response tokens at most (default: the model's context).
    """

    def __init__(self, generation: GenerationConfig, reward: RewardSource, tokenizer, *,
                 samples_per_prompt: int = 1, reference=None, critic=None, max_seq_len: Optional[int] = None,
                 max_batch: int = 64):
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt = {samples_per_prompt}: expected >= 1")
        self.generation = generation
        self.reward = reward
        self.tokenizer = tokenizer
        self.samples_per_prompt = samples_per_prompt
        self.reference = reference
        self.critic = critic
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.engine: Optional[RolloutEngine] = None

    def check_prompts(self, prompts: Sequence[dict], model_cfg, source: str = "prompts") -> None:
        """Every prompt leaves room for a response: an error naming the sample otherwise."""
        limit = self.max_seq_len or model_cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            n = int(p["prompt_tokens"].numel())
            if n >= limit:
                raise ValueError(
                    f"{source}: sample {p.get('index', i)} has a prompt of {n} tokens, but prompt + response must fit"
                    f" {limit} tokens (model.max_position_embeddings / the generation limit): shorten or drop it"
                )

    def _engine(self, policy) -> RolloutEngine:
        if self.engine is None:
            self.engine = RolloutEngine(policy.modules, policy.modules[0].model_cfg, tokenizer=self.tokenizer,
                                        max_batch=self.max_batch, max_seq_len=self.max_seq_len)
        return self.engine

    # sample indices of extra rounds (dynamic sampling) start at round x ROUND_STRIDE
    ROUND_STRIDE = 2 ** 40

    def generate(self, context, prompts: Optional[Sequence[dict]] = None, round: int = 0) -> Experience:
        """Steps 1 and 2 of the module docstring: responses and their rewards.

        prompts / round: another round of prompts for the same step (dynamic sampling):
        this rank's share of the round's global block of ``len(context.samples)`` prompts.
        Round r's sample k of the prompt at position j has the global sample index
        ``r·ROUND_STRIDE + (t·P + j)·G + k`` and the group id ``r·P + j`` (round 0: as above).
        """
        policy = context.roles["policy"]
        G = self.samples_per_prompt
        P = len(context.samples)
        share = math.ceil(P / context.dp_size)
        first = context.dp_rank * share
        prompts = list(context.local_samples if prompts is None else prompts)
        base = context.step * P
        rows, seeds, group, index, meta = [], [], [], [], []
        for j, p in enumerate(prompts):
            for k in range(G):
                g = round * self.ROUND_STRIDE + (base + first + j) * G + k
                rows.append(p["prompt_tokens"].tolist())
                seeds.append(seed_for(self.generation.seed, g))
                group.append(round * P + first + j)
                index.append(g)
                meta.append(dict(p.get("meta", {}), group=round * P + first + j, sample_index=g,
                                 prompt_index=int(p.get("index", -1))))
        for i, r in enumerate(rows):
            limit = self.max_seq_len or policy.modules[0].model_cfg.max_position_embeddings
            if len(r) >= limit:
                raise ValueError(f"prompt of sample {index[i]} (dataset row {meta[i]['prompt_index']}) has {len(r)}"
                                 f" tokens; prompt + response must fit {limit} tokens")
        t0 = time.perf_counter()
        engine = self._engine(policy)
        result = engine.generate(rows, self.generation, seeds=seeds)
        t1 = time.perf_counter()
        n = len(rows)
        multiple = 8 * ps.get_tensor_model_parallel_world_size()
        longest = int(result.lengths.max())
        S = int(math.ceil(longest / multiple) * multiple)
        tokens = torch.full((n, S), result.pad_id, dtype=torch.long)
        tokens[:, :result.tokens.shape[1]] = result.tokens
        mask = torch.zeros(n, S)
        rollout = torch.zeros(n, S)
        for i in range(n):
            p, r = int(result.prompt_lengths[i]), int(result.response_lengths[i])
            mask[i, p:p + r] = 1.0
            rollout[i, p:p + r] = result.logprobs[i, :r]
        texts = [self.tokenizer.decode(self._response_ids(result, i)) for i in range(n)]
        batch = RewardBatch(prompts=[prompts[j // G]["prompt"] for j in range(n)], responses=texts,
                            metadata=meta, step=context.step, sample_indices=index)
        rewards, attributes = self.reward.score(batch)
        t2 = time.perf_counter()
        return Experience(
            tokens=tokens, response_mask=mask, prompt_lengths=result.prompt_lengths.clone(),
            response_lengths=result.response_lengths.clone(), rollout_logps=rollout,
            rewards=rewards.double(), truncated=torch.tensor([r != "stop_token" for r in result.stop_reasons]),
            group=torch.tensor(group), sample_index=torch.tensor(index), attribute_scores=attributes,
            texts=texts, metadata=meta, timings={"generation": t1 - t0, "scoring": t2 - t1},
        )

    @staticmethod
    def _response_ids(result, i: int) -> List[int]:
        ids = result.response_tokens(i)
        return ids[:-1] if result.stop_reasons[i] == "stop_token" else ids

    def score_passes(self, context, exp: Experience) -> Experience:
        """Step 3: old and reference log-probs, values (forward-only schedules)."""
        t0 = time.perf_counter()
        policy = context.roles["policy"]
        mbs = context.micro_batch_size
        run, last = context.run_schedule, context.from_last_stage
        exp.old_logps = collect_token_outputs(run, policy.chunks, exp.tokens, mbs, policy_logps, last)
        policy.train()
        if self.reference is not None:
            with self.reference.active() as chunks:
                exp.ref_logps = collect_token_outputs(run, chunks, exp.tokens, mbs, policy_logps, last)
        if self.critic is not None:
            exp.values = collect_token_outputs(run, self.critic.chunks, exp.tokens, mbs, critic_values, last)
            self.critic.train()
        exp.timings["logprob_passes"] = time.perf_counter() - t0
        return exp

    def make(self, context) -> Experience:
        return self.score_passes(context, self.generate(context))


def reduce_metric_store(store: Sequence[dict], context) -> Dict[str, float]:
    """Sum ``name -> tensor([sum, count])`` over micro-batches and data-parallel ranks (last
    pipeline stage), then ``sum / count`` on every rank."""
    sums = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted({k for d in store for k in d})
        totals = torch.zeros(len(keys), 2, dtype=torch.float64)
        for d in store:
            for i, k in enumerate(keys):
                if k in d:
                    totals[i] += d[k].detach().double().cpu().reshape(2)
        context.all_reduce_dp(totals)
        sums = {k: (float(totals[i, 0]), float(totals[i, 1])) for i, k in enumerate(keys)}
    sums = context.from_last_stage(sums) or {}
    return {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}
