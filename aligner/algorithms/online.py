"""The online core (docs/online_core.md): what PPO, the REINFORCE family and SteerLM 2.0's
sampling share — the config sections, the rollout's shape, the experience, the step
skeleton and the trainer that builds the roles.

A step (:meth:`OnlineAlgorithm.train_step`): experience (:class:`ExperienceMaker`:
generation on the live policy, rewards, old / reference log-probs, values), global
reductions (:meth:`OnlineAlgorithm.advantages`), ``epochs`` x mini-batches of updates of
every trainable role (:class:`RolloutShape`), metrics reduced over ranks. Sample ``k`` of
the prompt at position ``j`` of step ``t`` has the global index ``(t·P + j)·G + k`` and the
seed ``seed_for(seed, index)``: any layout and a resumed run generate the same responses.
Shapes: n rows on this rank (a prompt's G rows consecutive), S positions; per-token
tensors [n, S] aligned with the token they score (:mod:`aligner.training.forward`).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from aligner.algorithms.base import Trainer
from aligner.algorithms.losses.common import masked_moments, masked_whiten
from aligner.algorithms.losses.policy import KL_ESTIMATORS, PolicyLossOptions, aggregate_count, policy_objective
from aligner.config import Choice, ConfigError, fail, section_check
from aligner.data.datasets import longest_sequences, read_rows
from aligner.data.loading import dataset_paths
from aligner.data.prepared import is_prepared
from aligner.parallel import padded_length
from aligner.parallel.seeds import minibatch_order_generator
from aligner.models.gpt import unwrap_model
from aligner.rewards.config import RewardSection, check_reward_section, unset_reward_fields
from aligner.rewards.kinds import build_reward
from aligner.rewards.sources import RewardBatch, RewardSource, check_reward_source
from aligner.training.algorithm import Algorithm, StepContext
from aligner.training.batching import unpack_rows
from aligner.training.forward import (PassCost, collect_token_outputs, critic_values, forward, length_microbatches,
                                      pass_cost, policy_logps)
from aligner.runtime import is_rank0
from aligner.training.metrics import metric
from aligner.training.rollout_log import RolloutLog
from aligner.training.roles import ReferencePolicy, RoleSet


# ------------------------------------------------------------------------------ config
class ReferenceMode(Choice):
    host = "host"  # the initial weights in host memory, swapped into the policy's modules
    model = "model"  # a second model


class Truncated(Choice):
    """Responses that end at the length limit without a stop token."""

    keep = "keep"
    mask = "mask"  # out of the losses (and of baselines / whitening)
    penalize = "penalize"  # scored truncated_reward


KLEstimator = Choice("KLEstimator", [(name, name) for name in KL_ESTIMATORS], module=__name__)


@dataclass
class GenerationSection:
    """``<algorithm>.generation``: sampling of the rollouts (aligner.rollout.GenerationConfig)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None  # base of the per-sample seeds (null: trainer.seed)
    max_batch: int = 64  # rows the rollout engine decodes at once
    continuous_batching: bool = True  # a finished row's slot takes the next waiting prompt (docs/rollout.md)


def generation_config(section, default_seed: int, stop_token_ids: Sequence[int]):
    """The rollout engine's GenerationConfig of a ``generation`` section."""
    # the rollout engine is megatron-core: loaded when a run starts, not at config checks
    from aligner.rollout import GenerationConfig

    return GenerationConfig(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                            top_k=section.top_k, top_p=section.top_p,
                            seed=default_seed if section.seed is None else section.seed,
                            stop_token_ids=list(stop_token_ids))


@dataclass
class OnlineSection:
    """The options PPO and the REINFORCE family share (docs/ppo.md, docs/reinforce.md)."""

    kl_coef: float = 0.01  # β of the KL to the reference
    clip_eps: float = 0.2  # the clipped surrogate's ε (clip_eps_low / clip_eps_high: clip-higher)
    clip_eps_low: Optional[float] = None
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None  # c > 1: l = min(l, −c·A) for A < 0
    entropy_coef: float = 0.0
    mini_batch_size: Optional[int] = None  # responses per optimizer update (global; null: the whole buffer)
    epochs: int = 1  # passes over each rollout buffer
    target_kl: Optional[float] = None  # stop the epochs once a mini-batch's approximate KL exceeds it
    truncated: Truncated = Truncated.keep
    truncated_reward: float = -1.0  # the score of a truncated response under truncated: penalize
    samples_per_prompt: int = 1  # G; a step has trainer.global_batch_size prompts
    reference: ReferenceMode = ReferenceMode.host
    offload: bool = False  # idle roles to host memory between phases
    packed: bool = True  # update passes on packed rows where that needs fewer micro-batches (docs/online_core.md)
    pack_tokens: Optional[int] = None  # tokens per packed micro-batch (null: trainer.micro_batch_size x S)
    generation: GenerationSection = field(default_factory=GenerationSection)
    reward: RewardSection = field(default_factory=RewardSection)


@dataclass(frozen=True)
class RolloutShape:
    """One online step's rollout: ``prompts`` (P, ``trainer.global_batch_size``) sampled
    ``samples_per_prompt`` (G) times each, ``rows`` = P·G responses, updated in
    ``epochs`` passes of mini-batches of ``mini_batch_size`` responses (global)."""

    prompts: int
    samples_per_prompt: int
    mini_batch_size: int
    epochs: int

    @property
    def rows(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def minibatches(self) -> int:
        return self.rows // self.mini_batch_size

    @property
    def optimizer_steps(self) -> int:
        """Updates of each trainable role per step."""
        return self.epochs * self.minibatches

    @classmethod
    def of(cls, key: str, section, global_batch_size: int) -> "RolloutShape":
        """The shape of ``section`` (``cfg[key]``), checked: ConfigError naming the key."""
        for name in ("samples_per_prompt", "epochs"):
            if section[name] < 1:
                fail(f"{key}.{name}", section[name], "expected >= 1")
        rows = global_batch_size * section.samples_per_prompt
        mbs = rows if section.mini_batch_size is None else section.mini_batch_size
        if mbs < 1 or rows % mbs:
            raise ConfigError(f"{key}.mini_batch_size = {section.mini_batch_size}: must divide the rollout buffer"
                              f" (trainer.global_batch_size x {key}.samples_per_prompt = {rows})")
        return cls(global_batch_size, section.samples_per_prompt, mbs, section.epochs)


def check_online_section(s, key: str, global_batch_size: int) -> None:
    """The options every online section shares, its reward and its rollout's shape
    (ConfigError naming ``<key>.<field>``)."""
    check_reward_section(s.reward, f"{key}.reward")
    RolloutShape.of(key, s, global_batch_size)
    for name in ("clip_eps", "clip_eps_low", "clip_eps_high"):
        if s[name] is not None and not 0 < s[name] < 1:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected in (0, 1)")
    if s.dual_clip is not None and s.dual_clip <= 1:
        raise ConfigError(f"{key}.dual_clip = {s.dual_clip}: expected > 1 (or null)")
    for name in ("kl_coef", "entropy_coef"):
        if not s[name] >= 0:
            fail(f"{key}.{name}", s[name], "expected >= 0")
    if s.target_kl is not None and not s.target_kl > 0:
        fail(f"{key}.target_kl", s.target_kl, "expected > 0 (or null: no early stop)")
    if not math.isfinite(s.truncated_reward):
        fail(f"{key}.truncated_reward", s.truncated_reward, "expected a finite number")
    if s.pack_tokens is not None and s.pack_tokens < 1:
        fail(f"{key}.pack_tokens", s.pack_tokens, "expected >= 1 (or null: trainer.micro_batch_size x the step's length)")


@section_check(GenerationSection)
def check_generation_section(g, key: str, cfg=None) -> None:
    """Sampling values the rollout engine can run (ConfigError naming ``<key>.<field>``)."""
    for name in ("max_new_tokens", "max_batch"):
        if g[name] < 1:
            fail(f"{key}.{name}", g[name], "expected >= 1")
    if not (math.isfinite(g.temperature) and g.temperature >= 0):
        fail(f"{key}.temperature", g.temperature, "expected a finite number >= 0 (0: greedy)")
    if g.top_k < 0:
        fail(f"{key}.top_k", g.top_k, "expected >= 0 (0: no top-k)")
    if not 0 < g.top_p <= 1:
        fail(f"{key}.top_p", g.top_p, "expected in (0, 1] (1: no top-p)")


# ------------------------------------------------------------------------------ experience
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
    routing: Optional[torch.Tensor] = None  # [n, S, L, k] int16: the rollout's experts (moe.routing_replay)
    routing_layers: Optional[torch.Tensor] = None  # [L] long: their layer numbers on this rank
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
            if f.name == "routing_layers":
                out[f.name] = v
            elif torch.is_tensor(v):
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
                if f.name == "routing_layers":  # one list of layers, not per row
                    out[f.name] = values[0]
                    continue
                if f.name == "routing":  # [n, S, L, k]: unrecorded positions are -1
                    values = [F.pad(v, (0, 0, 0, 0, 0, S - v.shape[1]), value=-1) for v in values]
                elif values[0].dim() == 2 and f.name != "attribute_scores":
                    values = [F.pad(v, (0, S - v.shape[1]), value=pad_id if f.name == "tokens" else 0) for v in values]
                out[f.name] = torch.cat(values)
        return Experience(**out)


class ExperienceMaker:
    """Makes a step's :class:`Experience` (module docstring).

    generation: the sampling settings (:func:`generation_config`; its ``seed`` is the base
    of the per-sample seeds); samples_per_prompt: G. reward: a reward source (None: rewards 0). reference: a
    :class:`aligner.training.roles.ReferencePolicy` or None; critic: the critic's trainable
    role or None. tokenizer: the policy's (decodes responses). max_seq_len: prompt +
    response tokens at most (default: the model's context). routing_replay (an MoE
    policy, ``moe.routing_replay``): the rollout records each token's experts and every
    policy pass over the experience (old log-probs, updates) routes them the same way.
    packed / pack_tokens: the log-prob passes on the micro-batches of least estimated work, rows cut to
    their micro-batch's longest or packed rows
    (:func:`aligner.training.forward.length_microbatches`; never with an MoE policy, whose
    router losses and recorded routing are per padded row). max_batch / continuous_batching: the
    rollout engine's slots and slot refill (:class:`aligner.rollout.RolloutEngine`).
    """

    # sample indices of extra rounds (dynamic sampling) start at round x ROUND_STRIDE
    ROUND_STRIDE = 2 ** 40

    def __init__(self, generation, reward: Optional[RewardSource], tokenizer, *, samples_per_prompt: int = 1,
                 reference=None, critic=None, max_seq_len: Optional[int] = None, max_batch: int = 64,
                 packed: bool = False, pack_tokens: Optional[int] = None, continuous_batching: bool = True):
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
        self.continuous_batching = continuous_batching
        self.routing_replay = False
        self.packed = packed
        self.pack_tokens = pack_tokens
        self.engine = None

    def _engine(self, policy):
        if self.engine is None:
            # the rollout engine is megatron-core: loaded at the first generation, not at config checks
            from aligner.rollout import RolloutEngine

            self.engine = RolloutEngine(policy.modules, policy.modules[0].model_cfg, tokenizer=self.tokenizer,
                                        max_batch=self.max_batch, max_seq_len=self.max_seq_len,
                                        continuous_batching=self.continuous_batching)
        return self.engine

    def keep_in_step(self, context: StepContext) -> None:
        """On a rank that skips a round of generation other data-parallel ranks run: with the
        policy's experts split over those ranks (EP > 1) its MoE layers take part in their
        forwards (:meth:`aligner.rollout.RolloutEngine.keep_in_step`); otherwise nothing."""
        self._engine(context.roles["policy"]).keep_in_step()

    def generate(self, context: StepContext, prompts: Optional[Sequence[dict]] = None, round: int = 0) -> Experience:
        """Responses and their rewards (the step's experience before its log-prob passes, :meth:`score_passes`).

        prompts / round: another round of prompts for the same step (dynamic sampling):
        this rank's share of the round's global block of ``len(context.samples)`` prompts.
        Round r's sample k of the prompt at position j has the global sample index
        ``r·ROUND_STRIDE + (t·P + j)·G + k`` and the group id ``r·P + j`` (round 0: as above).
        """
        from aligner.rollout import seed_for  # the rollout package is megatron-core (see _engine)

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
        result = engine.generate(rows, self.generation, seeds=seeds, record_routing=self.routing_replay)
        t1 = time.perf_counter()
        n = len(rows)
        S = padded_length(int(result.lengths.max()))
        routing = routing_layers = None
        if self.routing_replay:
            r = result.routing
            routing = torch.nn.functional.pad(r, (0, 0, 0, 0, 0, S - r.shape[1]), value=-1)
            routing_layers = torch.tensor(result.routing_layers, dtype=torch.long)
        tokens = torch.full((n, S), result.pad_id, dtype=torch.long)
        tokens[:, :result.tokens.shape[1]] = result.tokens
        # response token j of row i sits at position prompt_lengths[i] + j
        offset = torch.arange(S)[None, :] - result.prompt_lengths[:, None]
        response = (offset >= 0) & (offset < result.response_lengths[:, None])
        mask = response.float()
        rollout = torch.zeros(n, S)
        if result.logprobs.shape[1]:
            picked = result.logprobs.gather(1, offset.clamp(0, result.logprobs.shape[1] - 1))
            rollout = torch.where(response, picked, rollout)
        # the engine decodes with this tokenizer (a final stop token left out): its texts
        texts = result.texts if result.texts is not None else self.tokenizer.decode_batch(
            [self._response_ids(result, i) for i in range(n)])
        if self.reward is None:  # responses to train on, not to score (SPIN, on-policy distillation)
            rewards, attributes = torch.zeros(n, dtype=torch.float64), None
        else:
            batch = RewardBatch(prompts=[prompts[j // G]["prompt"] for j in range(n)], responses=texts,
                                metadata=meta, step=context.step, sample_indices=index)
            rewards, attributes = self.reward.score(batch)
        t2 = time.perf_counter()
        return Experience(
            tokens=tokens, response_mask=mask, prompt_lengths=result.prompt_lengths.clone(),
            response_lengths=result.response_lengths.clone(), rollout_logps=rollout,
            routing=routing, routing_layers=routing_layers,
            rewards=rewards.double(), truncated=torch.tensor([r != "stop_token" for r in result.stop_reasons]),
            group=torch.tensor(group), sample_index=torch.tensor(index), attribute_scores=attributes,
            texts=texts, metadata=meta, timings={"generation": t1 - t0, "scoring": t2 - t1},
        )

    @staticmethod
    def _response_ids(result, i: int) -> List[int]:
        ids = result.response_tokens(i)
        return ids[:-1] if result.stop_reasons[i] == "stop_token" else ids

    def score_passes(self, context: StepContext, exp: Experience, old_logps: bool = True) -> Experience:
        """Step 1's log-prob passes: old and reference log-probs, values (forward-only
        schedules). old_logps False: no old-log-prob pass (the update's own forward gives
        them, :meth:`OnlineAlgorithm.old_logps_from_update`)."""
        t0 = time.perf_counter()
        policy = context.roles["policy"]
        mbs = context.micro_batch_size
        run, last = context.run_schedule, context.from_last_stage
        pack = {"lengths": (exp.prompt_lengths + exp.response_lengths).tolist() if self.packed else None,
                "token_budget": self.pack_tokens}
        if old_logps:
            exp.old_logps = collect_token_outputs(run, policy.chunks, exp.tokens, mbs, policy_logps, last,
                                                  routing=exp.routing, routing_layers=exp.routing_layers, **pack)
            policy.train()
        if self.reference is not None:
            with self.reference.active() as chunks:
                exp.ref_logps = collect_token_outputs(run, chunks, exp.tokens, mbs, policy_logps, last, **pack)
        if self.critic is not None:
            exp.values = collect_token_outputs(run, self.critic.chunks, exp.tokens, mbs, critic_values, last, **pack)
            self.critic.train()
        exp.timings["logprob_passes"] = time.perf_counter() - t0
        return exp


# ------------------------------------------------------------------------------ the algorithm
def policy_loss(options: PolicyLossOptions, batch: dict, logits: torch.Tensor, kept: Optional[list] = None):
    """One micro-batch's policy loss in the loop's convention, ``(numerator, denominator,
    metrics)``: :func:`aligner.algorithms.losses.policy.policy_objective` on the per-token
    log-probs and entropy of the vocab-parallel ``logits`` [b, S, v/p] (of a packed batch:
    computed on the packed rows, then one row per sample, as on padded rows).

    A batch without ``old_logps`` (the update runs on the weights that generated: the old
    policy is this forward's) takes this forward's detached log-probs as the old ones (ratio
    exactly 1, the on-policy gradient); ``kept`` then gets ``(experience rows, their
    log-probs)`` for the step's metrics."""
    # vocab-parallel: megatron-core, loaded when training
    from aligner.models.logprobs import shifted_logprobs_entropy

    lp, entropy = shifted_logprobs_entropy(logits, batch["tokens"], entropy_grad=bool(options.entropy_coef))
    if "unpack_index" in batch:
        lp, entropy = unpack_rows(lp, batch, shifted=True), unpack_rows(entropy, batch, shifted=True)
    if "old_logps" not in batch:
        batch = dict(batch, old_logps=lp.detach())
        if kept is not None:
            rows = batch["experience_rows"].cpu()
            kept.append((rows, lp.detach()[:len(rows)].float().cpu()))
    total, den, sums = policy_objective(options, lp, entropy, batch)
    return total, den.round().long(), {k: metric(v, c) for k, (v, c) in sums.items()}


class OnlineAlgorithm(Algorithm):
    """The step skeleton of online RL (module docstring); subclasses give
    :meth:`advantages`, their roles' losses in :attr:`update_roles`, and may add metrics
    (:meth:`extra_metrics`) or change how experience is made (:meth:`make_experience`).

    section: the algorithm's config section (:class:`OnlineSection`); shape: the checked
    :class:`RolloutShape` of a step."""

    owns_step = True
    key = "online"  # the config section, for messages
    # per-row tensors of ``advantages()``'s result that the micro-batches carry
    microbatch_keys: Tuple[str, ...] = ("advantages", "loss_mask")
    rollout_log: Optional[RolloutLog] = None  # trainer.log_rollouts > 0
    # the update's forward computes what the forward-only passes compute (the trainer sets
    # False for an MoE policy or adapter dropout, whose training forwards differ)
    training_forward_is_pass = True
    _kept: Optional[list] = None  # (experience rows, log-probs) of the update's forward, while kept

    def __init__(self, section, maker: ExperienceMaker, shape: RolloutShape):
        s = section
        if s.truncated not in tuple(Truncated):
            raise ValueError(f"{self.key}.truncated = {s.truncated!r}: expected one of {[t.value for t in Truncated]}")
        if s.reference not in tuple(ReferenceMode):
            raise ValueError(f"{self.key}.reference = {s.reference!r}: expected 'host' or 'model'")
        self.s = s
        self.maker = maker
        self.shape = shape
        self.packed = bool(getattr(s, "packed", False))  # update passes on packed rows (off for an MoE policy)
        if maker is not None:  # its log-prob passes pack as the section says
            maker.packed, maker.pack_tokens = self.packed, getattr(s, "pack_tokens", None)
        self.optimizer_steps_per_step = shape.optimizer_steps
        low = s.clip_eps if s.clip_eps_low is None else s.clip_eps_low
        high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
        self.loss_options = PolicyLossOptions(kind="clipped", clip_low=low, clip_high=high, dual_clip=s.dual_clip,
                                              entropy_coef=s.entropy_coef)

    @property
    def reward_source(self) -> RewardSource:
        return self.maker.reward

    def setup(self, loop) -> None:
        t = loop.cfg
        if t.log_rollouts > 0:
            self.rollout_log = RolloutLog(loop.out_dir, t.log_rollouts, t.log_rollouts_rows)

    def log_rollouts(self, context: StepContext, exp: Experience, extra: Dict[str, torch.Tensor]) -> None:
        """Global rank 0's first rows of the step to the rollout log (aligner/training/rollout_log.py)."""
        step = context.step + 1  # as metrics.jsonl numbers it
        if self.rollout_log is None or not self.rollout_log.due(step) or not is_rank0():
            return
        names = self.maker.reward.attributes or []
        mask = exp.response_mask
        policy = (exp.old_logps * mask).sum(-1)
        ref = None if exp.ref_logps is None else (exp.ref_logps * mask).sum(-1)
        adv = (extra["advantages"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        rows = []
        for i in range(len(exp)):
            if exp.filler is not None and bool(exp.filler[i]):
                continue
            p = int(exp.prompt_lengths[i])
            rows.append(dict(
                sample_index=int(exp.sample_index[i]),
                prompt=self.maker.tokenizer.decode(exp.tokens[i, :p].tolist()), response=exp.texts[i],
                reward=float(exp.rewards[i]),
                attributes={} if exp.attribute_scores is None else
                {n: float(exp.attribute_scores[i, j]) for j, n in enumerate(names)},
                advantage=float(adv[i]), length=int(exp.response_lengths[i]), eos=not bool(exp.truncated[i]),
                logprob=float(policy[i]), ref_logprob=None if ref is None else float(ref[i])))
            if len(rows) == self.rollout_log.max_rows:
                break
        self.rollout_log.write(step, rows)

    def sample_tokens(self, sample: dict) -> int:
        return int(sample["prompt_tokens"].numel())

    # ---------------------------------------------------------------- hooks
    @property
    def update_roles(self) -> List[Tuple[str, Callable]]:
        """``(role name, loss(batch, output))`` updated once per mini-batch, in order."""
        return [("policy", self._policy_loss)]

    def _policy_loss(self, batch, logits):
        return policy_loss(self.loss_options, batch, logits, self._kept)

    def one_update_on_rollout_weights(self) -> bool:
        """A step makes one optimizer update per role on the rollout (one epoch, one
        mini-batch), so every update micro-batch runs on the weights that generated, and
        that forward is the forward-only pass's."""
        return self.shape.optimizer_steps == 1 and self.training_forward_is_pass

    def old_logps_from_update(self) -> bool:
        """The old log-probs are the policy update's own forward, detached, instead of a
        forward pass before it (docs/online_core.md, "Old log-probs"): only where that pass
        is redundant and nothing reads them before the update. Default: never."""
        return False

    def role_loss_count(self, role: str, batch: dict) -> int:
        """The count the loss of update role ``role`` returns for ``batch``, from the
        micro-batch alone (an MoE role's router losses are weighed by it, docs/moe.md)."""
        if role != "policy":
            raise NotImplementedError(f"{type(self).__name__} gives no loss count for the role {role!r}")
        return aggregate_count(batch["loss_mask"], self.loss_options.aggregation)

    def make_experience(self, context: StepContext) -> Experience:
        """Responses and their rewards (before the log-prob passes)."""
        return self.maker.generate(context)

    def advantages(self, context: StepContext, exp: Experience) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        return {}

    def whitened(self, context: StepContext, adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """``adv`` whitened with the mean and variance of every counted token of the
        data-parallel batch (float64 moments summed over ranks); as it is when none counts."""
        moments = context.all_reduce_dp(masked_moments(adv, loss_mask))
        return masked_whiten(adv, loss_mask, moments) if float(moments[0]) > 0 else adv

    # ---------------------------------------------------------------- micro-batches
    def _microbatches(self, exp: Experience, extra: Dict[str, torch.Tensor], rows: List[int], mbs: int,
                      cost: PassCost) -> List[dict]:
        """Micro-batches of ``mbs`` rows; the last is filled with rows that count for nothing
        (and no rows at all give one such micro-batch). With ``packed``: the micro-batches
        of the least estimated work for the policy (``cost``,
        :func:`aligner.training.forward.length_microbatches`):
        without pipeline stages the rows sorted by length, each micro-batch cut to its
        longest row (its per-row tensors cut alike), or the rows packed into micro-batches
        of ``pack_tokens`` tokens where that makes fewer micro-batches (the per-row tensors
        stay one row per sample, and the losses see one row per sample, :func:`unpack_rows`)."""
        if self.packed and rows:
            ends = exp.prompt_lengths + exp.response_lengths
            micro = length_microbatches(exp.tokens[rows], ends[rows].tolist(), mbs, getattr(self.s, "pack_tokens", None),
                                        cost=cost)
            if micro is not None:
                out = []
                for b in micro:
                    idx = torch.tensor(rows)[b["rows"]]
                    if "unpack_index" in b:  # packed rows: the per-row tensors stay [k, S]
                        out.append(self._row_tensors(exp, extra, idx, dict(b, experience_rows=idx)))
                        continue
                    width = b["tokens"].shape[1]  # sorted rows cut to their longest: [k, width]
                    batch = self._row_tensors(exp, extra, idx, dict(b, experience_rows=idx), width)
                    batch["padding"] = torch.arange(width)[None, :] >= ends[idx][:, None]
                    out.append(batch)
                return out
        out = []
        for start in range(0, max(len(rows), 1), mbs):
            chunk = rows[start:start + mbs]
            idx = torch.tensor(chunk + [chunk[0] if chunk else 0] * (mbs - len(chunk)))
            batch = self._row_tensors(exp, extra, idx, {"tokens": exp.tokens[idx], "position_ids": None,
                                                        "attention_mask": None,
                                                        "experience_rows": torch.tensor(chunk, dtype=torch.long)})
            ends = (exp.prompt_lengths + exp.response_lengths)[idx]
            batch["padding"] = torch.arange(exp.tokens.shape[1])[None, :] >= ends[:, None]
            if exp.routing is not None:  # the policy's passes route as the rollout did
                batch["routing"], batch["routing_layers"] = exp.routing[idx], exp.routing_layers
            batch["loss_mask"][len(chunk):] = 0.0
            out.append(batch)
        return out

    def _row_tensors(self, exp: Experience, extra: Dict[str, torch.Tensor], idx: torch.Tensor, batch: dict,
                     width: Optional[int] = None) -> dict:
        """``batch`` with the per-row tensors of experience rows ``idx`` (log-probs, values,
        advantages...); width: per-token tensors cut to their first ``width`` positions (a
        micro-batch of rows cut to its longest, :func:`aligner.training.forward.trimmed_rows`)."""
        def pick(t):
            t = t[idx]
            return t[:, :width] if width is not None and t.dim() > 1 else t

        if exp.old_logps is not None:  # else the update's forward gives them (policy_loss)
            batch["old_logps"] = pick(exp.old_logps)
        if exp.ref_logps is not None:
            batch["ref_logps"] = pick(exp.ref_logps)
        if exp.values is not None:
            batch["old_values"] = pick(exp.values)
        for k in self.microbatch_keys:
            batch[k] = pick(extra[k]).float()
        return batch

    def minibatch_rows(self, context: StepContext, n_local: int, epoch: int) -> List[List[int]]:
        """This rank's rows of each mini-batch of ``epoch``, a function of the global rows
        only (the same global mini-batches at any data-parallel size).

        Global row ``g`` (rank r holds rows ``r·n_local ..``) has position ``π(g)`` in the
        epoch's order (identity in epoch 0, a permutation of (seed, step, epoch) later) and
        belongs to mini-batch ``π(g) mod M`` (M mini-batches). A rank may hold no row of a
        mini-batch; it then runs one micro-batch that counts for nothing.
        """
        n_global = n_local * context.dp_size
        minibatches = n_global // self.shape.mini_batch_size
        if epoch == 0:
            position = torch.arange(n_global)
        else:
            order = torch.randperm(n_global, generator=minibatch_order_generator(context.seed, context.step, epoch))
            position = torch.empty_like(order)
            position[order] = torch.arange(n_global)
        mine = position[context.dp_rank * n_local:(context.dp_rank + 1) * n_local]
        out = []
        for k in range(minibatches):
            rows = [i for i in range(n_local) if int(mine[i]) % minibatches == k]
            out.append(sorted(rows, key=lambda i: int(mine[i])))
        return out

    # ---------------------------------------------------------------- updates
    def update(self, context: StepContext, exp: Experience, extra: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """``epochs`` x mini-batches of updates of :attr:`update_roles`; their metrics.
        Without ``exp.old_logps`` (:meth:`old_logps_from_update`) the policy's update forward
        gives them: set on ``exp`` afterwards."""
        if exp.old_logps is None:
            if not self.one_update_on_rollout_weights():
                raise ValueError("the experience has no old log-probs and the step makes more than one update"
                                 " per rollout: the old-log-prob pass is needed")
            self._kept = []
            try:
                metrics = self._update(context, exp, extra)
                exp.old_logps = context.from_last_stage(self._kept_logps(exp, self._kept))
            finally:
                self._kept = None
            return metrics
        return self._update(context, exp, extra)

    @staticmethod
    def _kept_logps(exp: Experience, kept: list) -> Optional[torch.Tensor]:
        """[n, S] from the update's ``(rows, log-probs)``; None where no loss ran (not the
        last pipeline stage)."""
        if not kept:
            return None
        out = torch.zeros(exp.tokens.shape)
        seen = torch.zeros(len(exp), dtype=torch.bool)
        for rows, values in kept:
            out[rows, :values.shape[1]] = values  # a micro-batch cut to its longest row is narrower
            seen[rows] = True
        if not bool(seen.all()):
            raise RuntimeError(f"the update's forward covered {int(seen.sum())} of {len(exp)} experience rows")
        return out

    def _update(self, context: StepContext, exp: Experience, extra: Dict[str, torch.Tensor]) -> Dict[str, float]:
        roles = self.update_roles
        stores: Dict[str, list] = {name: [] for name, _ in roles}
        norms: Dict[str, List[float]] = {name: [] for name, _ in roles}
        stopped_early = 0.0
        updates = 0
        positions = 0
        cost = pass_cost(context.roles["policy"].chunks)
        for epoch in range(self.shape.epochs):
            for rows in self.minibatch_rows(context, len(exp), epoch):
                micro = self._microbatches(exp, extra, rows, context.micro_batch_size, cost)
                positions += sum(b["tokens"].numel() for b in micro)
                outputs = {}
                for name, loss in roles:
                    role = context.roles[name]
                    role.train()
                    role.zero_grad()
                    # the rollout's routing is the policy's: another role (a critic) routes by itself
                    own = micro if name == "policy" else [
                        {k: v for k, v in b.items() if k not in ("routing", "routing_layers")} for b in micro]
                    outputs[name] = context.run_schedule(role.chunks, own, forward, loss, forward_only=False,
                                                         count=functools.partial(self.role_loss_count, name))
                    stores[name] += outputs[name]
                    _, norm = role.step()
                    norms[name].append(float(norm) if norm is not None else float("nan"))
                updates += 1
                if self.s.target_kl is not None:
                    kl = context.reduce_metrics(outputs["policy"]).get("policy/approx_kl", 0.0)
                    if kl > self.s.target_kl:
                        stopped_early = 1.0
                        break
            if stopped_early:
                break
        metrics = context.reduce_metrics([d for name, _ in roles for d in stores[name]])
        for name, _ in roles:
            metrics[f"grad_norm/{name}"] = sum(norms[name]) / len(norms[name])
            metrics[f"grad_norm/{name}_first"] = norms[name][0]
            lr = context.roles[name].lr
            metrics["lr" if name == "policy" else f"lr/{name}"] = lr
        metrics.update({"updates": float(updates), "early_stop": stopped_early,
                        # token positions of the update micro-batches (padding included), over the DP ranks
                        "update_positions": float(context.all_reduce_dp(torch.tensor([float(positions)]))[0])})
        return metrics

    # ---------------------------------------------------------------- metrics
    @staticmethod
    def global_moments(context, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[Σ mask, Σ mask·x, Σ mask·x²]`` over the data-parallel batch."""
        return context.all_reduce_dp(masked_moments(values, mask))

    def global_mean(self, context, values: torch.Tensor) -> float:
        """Mean of the per-row ``values`` [n] over the data-parallel batch."""
        mom = self.global_moments(context, values.double(), torch.ones(len(values)))
        return float(mom[1]) / max(float(mom[0]), 1.0)

    def experience_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        mask = exp.response_mask
        ones = torch.ones(len(exp))
        out: Dict[str, float] = {}

        def mean_std(name, values):
            mom = self.global_moments(context, values, ones)
            count = float(mom[0])
            mean = float(mom[1]) / max(count, 1.0)
            out[f"{name}/mean"] = mean
            out[f"{name}/std"] = math.sqrt(max(0.0, float(mom[2]) / max(count, 1.0) - mean * mean))

        mean_std("reward", exp.rewards.double())
        mean_std("response_length", exp.response_lengths.double())
        out["eos_rate"] = self.global_mean(context, (~exp.truncated).double())
        out["truncated_share"] = 1.0 - out["eos_rate"]
        if exp.ref_logps is not None:  # without a reference pass (kl_coef = 0) it is not measured
            k1 = (exp.old_logps - exp.ref_logps).double()
            kl_tok = self.global_moments(context, k1, mask)
            out["kl_ref"] = float(kl_tok[1]) / max(float(kl_tok[0]), 1.0)  # mean per token, k1
            out["kl_ref/sequence"] = self.global_mean(context, (k1 * mask).sum(-1))
        diff = (exp.old_logps - exp.rollout_logps).double()
        mismatch = self.global_moments(context, (diff.exp() - 1).abs(), mask)
        out["logprob_mismatch"] = float(mismatch[1]) / max(float(mismatch[0]), 1.0)
        maxdiff = context.all_reduce_dp(torch.tensor([float((diff.abs() * mask).max()) if len(exp) else 0.0]),
                                        op="max")
        out["logprob_mismatch/max_abs"] = float(maxdiff[0])
        if exp.attribute_scores is not None and self.maker.reward.attributes:
            for j, name in enumerate(self.maker.reward.attributes):
                out[f"reward/{name}"] = self.global_mean(context, exp.attribute_scores[:, j])
        out.update(self.extra_metrics(context, exp, extra))
        return out

    # ---------------------------------------------------------------- the step
    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        reward = self.maker.reward
        idle = [role for name, role in context.roles.trainable.items() if name != "policy"]
        if self.s.offload:  # generation needs the policy only
            for role in idle:
                role.offload()
        exp = self.make_experience(context)
        if self.s.offload:
            reward.offload()
            for role in idle:
                role.onload()
        exp = self.maker.score_passes(context, exp, old_logps=not self.old_logps_from_update())
        t1 = time.perf_counter()
        extra = self.advantages(context, exp)
        t2 = time.perf_counter()
        updates = self.update(context, exp, extra)  # sets exp.old_logps where the update gives them
        t3 = time.perf_counter()
        metrics = self.experience_metrics(context, exp, extra)
        metrics.update(updates)
        self.log_rollouts(context, exp, extra)
        t4 = time.perf_counter()
        if self.s.offload:
            reward.onload()
        total = time.perf_counter() - t0
        timings = dict(exp.timings, reductions=(t2 - t1) + (t4 - t3), updates=t3 - t2)
        for k, v in timings.items():
            metrics[f"time/{k}"] = v
            metrics[f"time/{k}_share"] = v / total
        metrics["step_time"] = total
        metrics["samples"] = float(self.shape.rows)
        return metrics


# ------------------------------------------------------------------------------ the trainer
class OnlineTrainer(Trainer):
    """The roles of an online algorithm built from its section (``cfg[key]``): reference
    (unless :meth:`needs_reference` says no), reward source, the experience maker, then
    :meth:`build_algorithm` (the algorithm's own roles and options)."""

    data_kind = "prompts"
    key = "online"
    replays_routing = True

    def __init__(self, cfg):
        # a Python callable as <key>.reward.function (from Python): kept here, its name recorded
        self.reward_function, cfg = self._take_reward_function(cfg)
        super().__init__(cfg)

    @classmethod
    def _take_reward_function(cls, cfg):
        """``(callable or None, cfg)``: a dict config's ``<key>.reward.function`` that is a
        Python callable, and the config with its ``module:qualname`` in its place."""
        fn = cfg.get(cls.key, {}).get("reward", {}).get("function") if isinstance(cfg, dict) else None
        if fn is None or isinstance(fn, str) or not callable(fn):
            return None, cfg
        name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        section = dict(cfg[cls.key], reward=dict(cfg[cls.key]["reward"], function=name))
        return fn, dict(cfg, **{cls.key: section})

    @classmethod
    def check(cls, cfg):
        check_online_section(cfg[cls.key], cls.key, cfg.trainer.global_batch_size)

    @classmethod
    def check_batch(cls, cfg, dp_size: int = 1) -> None:
        """The online batch rule (docs/online_core.md): ``trainer.global_batch_size`` counts
        prompts, split evenly over the data-parallel ranks (a prompt's G rows stay on its
        rank); ``trainer.micro_batch_size`` counts rows, any number (a short last micro-batch
        is filled with rows that count for nothing)."""
        P = cfg.trainer.global_batch_size
        if P % dp_size:
            raise ConfigError(f"trainer.global_batch_size = {P} prompts do not split evenly over {dp_size}"
                              " data-parallel ranks", hint=f"use a multiple of {dp_size}")

    def section(self):
        return self.cfg[self.key]

    def shape(self) -> RolloutShape:
        return RolloutShape.of(self.key, self.section(), self.cfg.trainer.global_batch_size)

    def needs_reference(self) -> bool:
        return True

    def prepare(self):
        train = self.load_data(self.cfg.data.train)
        self.check_train_size(len(train), "prompts")
        policy_models = self.build_models()
        roles, algo = self.build_roles(policy_models, len(train))
        algo.prompt_pool = train
        return algo, policy_models, train, None, {"roles": roles}

    def max_steps(self, n_prompts: int) -> int:
        t = self.cfg.trainer
        if t.max_epochs is None:
            return t.max_steps
        return min(t.max_steps if t.max_steps >= 0 else 10**9, t.max_epochs * (n_prompts // t.global_batch_size))

    def build_roles(self, policy_models, n_prompts: int):
        """Reference, reward and the algorithm's own roles (before any training or resume:
        the reference is the initial policy), then the algorithm."""
        s, t = self.section(), self.cfg.trainer
        roles = RoleSet()
        reference = None
        if self.needs_reference():
            if self.cfg.lora.enabled:  # the base under the adapters is the reference: no copy, no second model
                reference = ReferencePolicy(policy_models, "adapters")
            elif s.reference == ReferenceMode.host:
                reference = ReferencePolicy(policy_models, "host")
            else:
                reference = ReferencePolicy(policy_models, "model", reference_chunks=self.build_models())
                roles.add(reference.role)
        roles.reference = reference
        r = s.reward
        reward = build_reward(r.kind, path=r.path, function=self.reward_function or r.function,
                              tokenizer=self.tokenizer(),
                              attributes=list(r.attributes) if r.attributes else None,
                              attribute_weights=list(r.attribute_weights) if r.attribute_weights is not None
                              else None, reward_attribute=r.reward_attribute, micro_batch_size=r.micro_batch_size,
                              answer_field=r.answer_field, format_reward=r.format_reward, where=f"{self.key}.reward")
        if reward.role is not None:
            roles.add(reward.role)
        gen = generation_config(s.generation, t.seed, [self.tokenizer().eos_id])
        algo = self.build_algorithm(roles, gen, reward, reference, self.shape(), self.max_steps(n_prompts))
        algo.maker.routing_replay = bool(self.cfg.moe.routing_replay)
        # the policy's role is the loop's (built after this): its models, and every other trainable role's
        trained = list(policy_models) + [m for r in roles.trainable.values() for m in r.chunks]
        if any(unwrap_model(m).model_cfg.num_experts for m in trained):
            # MoE passes stay on padded rows: the router losses and load statistics are per
            # micro-batch of padded rows, a recorded routing is one row per sample, and with
            # experts split over the DP ranks (EP > 1) every rank must run as many micro-batches
            algo.packed = algo.maker.packed = False
            # and a router's training forward is not its forward-only one (sinkhorn routing)
            algo.training_forward_is_pass = False
        if self.cfg.lora.enabled and self.cfg.lora.dropout > 0:  # the adapters' dropout runs in training only
            algo.training_forward_is_pass = False
        return roles, algo

    def build_algorithm(self, roles, generation, reward, reference, shape: RolloutShape, max_steps: int):
        raise NotImplementedError

    def load_data(self, path):
        data = super().load_data(path)
        if data is not None:
            limit = self.model_config().max_position_embeddings
            over = (longest_sequences(data) >= limit).nonzero()[0]  # from the mapped index files
            if over.size:
                i = int(over[0])
                raise ConfigError(f"{data.where(i)}: the row has a prompt of {len(data[i]['prompt_tokens'])} tokens;"
                                  f" prompt + response must fit the model's max_position_embeddings = {limit} tokens",
                                  hint=f"shorten the prompt, or set data.max_length below {limit} so that"
                                       " data.overlong applies")
        return data

    def unset_required(self) -> List[str]:
        """The reward's fields its kind requires (``pg.reward.path`` for a reward model)."""
        return unset_reward_fields(self.section().reward, f"{self.key}.reward")

    def check_data_rows(self) -> None:
        """Also: with the exact-answer reward every prompt row carries its answer (the
        error names the file, the line and the field)."""
        super().check_data_rows()
        r = self.section().reward
        check_reward_source(f"{self.key}.reward", str(r.kind), path=r.path,
                            function=self.reward_function or r.function,
                            attributes=list(r.attributes) if r.attributes else None,
                            attribute_weights=r.attribute_weights, reward_attribute=r.reward_attribute,
                            prompts=self.cfg.data.train, names_key=True)
        if r.kind != "exact_answer":
            return
        rows = ((path, lineno, row) for path in dataset_paths(self.cfg.data.train) if not is_prepared(path)
                for lineno, row, _ in read_rows(path))
        for path, lineno, row in rows:
            value = row.get(r.answer_field)
            if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
                raise ConfigError(f"{path}:{lineno}: field {r.answer_field!r} is missing or not a single answer"
                                  f" ({self.key}.reward.kind = exact_answer reads each prompt row's answer from"
                                  f" {self.key}.reward.answer_field = {r.answer_field!r})")
