"""What every online algorithm shares (docs/online_core.md): the config sections of
generation and reward, the step skeleton, the micro-batches and the policy loss (the
trainer that builds the roles is :class:`aligner.algorithms.trainers.OnlineTrainer`). PPO (:mod:`aligner.algorithms.ppo`) and the REINFORCE
family (:mod:`aligner.algorithms.pg`) differ only in their advantages, their extra roles
(PPO's critic) and their options.

A step (:meth:`OnlineAlgorithm.train_step`, on the loop's :class:`StepContext`):

1. experience (:meth:`OnlineAlgorithm.make_experience`, by default one round of
   :class:`aligner.algorithms.experience.ExperienceMaker`): responses sampled on the live
   policy, scored by the reward source; old / reference log-probs (and values) from
   forward-only schedules.
2. global reductions (:meth:`OnlineAlgorithm.advantages`, the algorithm's own): token
   advantages, and whatever else the updates read, with statistics over the whole
   data-parallel batch.
3. ``epochs`` passes over the rollouts in mini-batches of ``mini_batch_size`` responses
   (global): one update of every trainable role per mini-batch
   (:attr:`OnlineAlgorithm.update_roles`), each through megatron-core's schedule with the
   count of the global mini-batch as normaliser (:func:`policy_loss` for the policy).
   Mini-batches are sets of global rows (:meth:`OnlineAlgorithm.minibatch_rows`), the
   same at any data-parallel size.
4. metrics, reduced over ranks: the experience's (reward, lengths, KL to the reference,
   train / rollout log-prob mismatch), the updates', the time split.

Shapes: n rows on this rank, S positions; per-token tensors [n, S] aligned with the token
they score (docs/online_core.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from aligner.algorithms.experience import Experience, ExperienceMaker, reduce_metric_store
from aligner.algorithms.losses.common import masked_moments
from aligner.algorithms.losses.policy import PolicyLossOptions, policy_objective
from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.models.logprobs import token_entropy
from aligner.training.algorithm import Algorithm, StepContext, metric
from aligner.training.batching import shifted_logprobs
from aligner.training.config import Choice, ConfigError, check_attribute_weights


# ------------------------------------------------------------------------------ choices
class RewardKind(Choice):
    """The kinds :func:`aligner.rewards.build_reward` builds."""

    model = "model"
    world = "world"
    function = "function"
    exact_answer = "exact_answer"


class ReferenceMode(Choice):
    host = "host"
    model = "model"


class Truncated(Choice):
    """Responses that end at the length limit without a stop token."""

    keep = "keep"
    mask = "mask"
    penalize = "penalize"


# ------------------------------------------------------------------------------ sections
@dataclass
class GenerationSection:
    """``<algorithm>.generation``: sampling of the rollouts (aligner.rollout.GenerationConfig).
    seed: base of the per-sample seeds (null: ``trainer.seed``)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_batch: int = 64


@dataclass
class RewardSection:
    """``<algorithm>.reward``: the reward source (aligner.rewards).

    kind: ``model`` (``path``: an HF reward-model folder), ``world`` (the embedded world's
    scorer), ``function`` (``function``: ``package.module:function``) or ``exact_answer``
    (1 for the exact stated answer of the prompt row's ``answer_field``, plus
    ``format_reward`` for any stated answer). attributes: the names of the outputs;
    attribute_weights (one per output) or reward_attribute make the scalar reward.
    """

    kind: RewardKind = RewardKind.model
    path: Optional[str] = None
    function: Optional[str] = None
    attributes: List[str] = field(
        default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    attribute_weights: Optional[List[float]] = None
    reward_attribute: str = "helpfulness"
    micro_batch_size: int = 8
    answer_field: str = "answer"
    format_reward: float = 0.0


@dataclass
class OnlineSection:
    """The options PPO and the REINFORCE family share (docs/ppo.md, docs/reinforce.md).

    samples_per_prompt: responses per prompt (G); a step has trainer.global_batch_size
    prompts, so its rollout buffer is global_batch_size x G responses.
    mini_batch_size: responses per optimizer update (global; null: the whole buffer).
    clip_eps (clip_eps_low / clip_eps_high: clip-higher), dual_clip: the clipped surrogate.
    truncated: responses without a stop token are kept, masked out of the losses (and of
    baselines / whitening), or given the score ``truncated_reward``. reference: ``host``
    (initial weights in host memory, swapped in) or ``model`` (a second model).
    offload: idle roles to host memory between phases.
    """

    kl_coef: float = 0.01
    clip_eps: float = 0.2
    clip_eps_low: Optional[float] = None
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    entropy_coef: float = 0.0
    mini_batch_size: Optional[int] = None
    target_kl: Optional[float] = None
    truncated: Truncated = Truncated.keep
    truncated_reward: float = -1.0
    samples_per_prompt: int = 1
    reference: ReferenceMode = ReferenceMode.host
    offload: bool = False
    generation: GenerationSection = field(default_factory=GenerationSection)
    reward: RewardSection = field(default_factory=RewardSection)


def check_online_section(key: str, s, global_batch_size: int, epochs_key: str) -> None:
    """The checks every online section shares (ConfigError naming ``<key>.<field>``)."""
    r = s.reward
    if r.kind == RewardKind.model and not r.path:
        raise ConfigError(f"{key}.reward.path is not set: {key}.reward.kind = model needs an HF reward-model folder",
                          hint=f"set {key}.reward.path=DIR, or {key}.reward.kind=world / exact_answer / function")
    if r.kind == RewardKind.function and not r.function:
        raise ConfigError(f"{key}.reward.function is not set: {key}.reward.kind = function needs"
                          " package.module:function")
    check_attribute_weights(f"{key}.reward", list(r.attributes), r.attribute_weights, r.reward_attribute,
                            need_reward_attribute=r.kind == RewardKind.model and r.attribute_weights is None)
    if r.kind == RewardKind.exact_answer and not r.answer_field:
        raise ConfigError(f"{key}.reward.answer_field is empty: the exact-answer reward reads the prompt row's answer"
                          " from that field")
    for name in ("samples_per_prompt", epochs_key):
        if s[name] < 1:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected >= 1")
    for name in ("clip_eps", "clip_eps_low", "clip_eps_high"):
        if s[name] is not None and not 0 < s[name] < 1:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected in (0, 1)")
    if s.dual_clip is not None and s.dual_clip <= 1:
        raise ConfigError(f"{key}.dual_clip = {s.dual_clip}: expected > 1 (or null)")
    if s.kl_coef < 0:
        raise ConfigError(f"{key}.kl_coef = {s.kl_coef}: expected >= 0")
    rollout = global_batch_size * s.samples_per_prompt
    if s.mini_batch_size is not None and (s.mini_batch_size < 1 or rollout % s.mini_batch_size):
        raise ConfigError(f"{key}.mini_batch_size = {s.mini_batch_size}: must divide the rollout buffer"
                          f" (trainer.global_batch_size x {key}.samples_per_prompt = {rollout})")
    if s.generation.max_new_tokens < 1:
        raise ConfigError(f"{key}.generation.max_new_tokens = {s.generation.max_new_tokens}: expected >= 1")


# ------------------------------------------------------------------------------ the policy loss
def policy_loss(options: PolicyLossOptions, batch: dict, logits: torch.Tensor):
    """One micro-batch's policy loss in the loop's convention, ``(numerator, denominator,
    metrics)`` (:func:`aligner.algorithms.losses.policy.policy_objective` on the per-token
    log-probs and entropy of the vocab-parallel ``logits`` [b, S, v/p])."""
    lp = shifted_logprobs(logits, batch["tokens"])
    entropy = F.pad(token_entropy(logits[:, :-1]), (1, 0))
    total, den, sums = policy_objective(options, lp, entropy, batch)
    return total, den.round().long(), {k: metric(v, c) for k, (v, c) in sums.items()}


# ------------------------------------------------------------------------------ the algorithm
def forward(model, batch):
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])


class OnlineAlgorithm(Algorithm):
    """The step skeleton of online RL (module docstring); subclasses give
    :meth:`advantages`, their roles' losses in :attr:`update_roles`, and may add metrics
    (:meth:`extra_metrics`) or change how experience is made (:meth:`make_experience`)."""

    owns_step = True
    key = "online"  # the config section, for messages
    # per-row tensors of ``advantages()``'s result that the micro-batches carry
    microbatch_keys: Tuple[str, ...] = ("advantages", "loss_mask")

    def __init__(self, section, maker: ExperienceMaker, rollout_buffer: int, epochs: int):
        s = section
        if s.truncated not in tuple(Truncated):
            raise ValueError(f"{self.key}.truncated = {s.truncated!r}: expected one of {[t.value for t in Truncated]}")
        if epochs < 1:
            raise ValueError(f"{self.key} epochs = {epochs}: expected >= 1")
        if s.reference not in ("host", "model"):
            raise ValueError(f"{self.key}.reference = {s.reference!r}: expected 'host' or 'model'")
        self.s = s
        self.maker = maker
        self.rollout_buffer = rollout_buffer
        self.epochs = epochs
        mbs = s.mini_batch_size or rollout_buffer
        if mbs < 1 or rollout_buffer % mbs:
            raise ValueError(f"{self.key}.mini_batch_size = {mbs} must divide the rollout buffer of {rollout_buffer}"
                             f" responses (trainer.global_batch_size x {self.key}.samples_per_prompt)")
        self.mini_batch_size = mbs
        self.optimizer_steps_per_step = epochs * (rollout_buffer // mbs)
        low = s.clip_eps if s.clip_eps_low is None else s.clip_eps_low
        high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
        self.loss_options = PolicyLossOptions(kind="clipped", clip_low=low, clip_high=high, dual_clip=s.dual_clip,
                                              entropy_coef=s.entropy_coef)

    def sample_tokens(self, sample: dict) -> int:
        return int(sample["prompt_tokens"].numel())

    # ---------------------------------------------------------------- hooks
    @property
    def update_roles(self) -> List[Tuple[str, Callable]]:
        """``(role name, loss(batch, output))`` updated once per mini-batch, in order."""
        return [("policy", self._policy_loss)]

    def _policy_loss(self, batch, logits):
        return policy_loss(self.loss_options, batch, logits)

    def make_experience(self, context: StepContext) -> Experience:
        """Responses and their rewards (before the log-prob passes)."""
        return self.maker.generate(context)

    def advantages(self, context: StepContext, exp: Experience) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        return {}

    # ---------------------------------------------------------------- micro-batches
    def _microbatches(self, exp: Experience, extra: Dict[str, torch.Tensor], rows: List[int], mbs: int) -> List[dict]:
        """Micro-batches of ``mbs`` rows; the last is filled with rows that count for nothing
        (and no rows at all give one such micro-batch)."""
        out = []
        for start in range(0, max(len(rows), 1), mbs):
            chunk = rows[start:start + mbs]
            idx = torch.tensor(chunk + [chunk[0] if chunk else 0] * (mbs - len(chunk)))
            batch = {"tokens": exp.tokens[idx], "position_ids": None, "attention_mask": None,
                     "old_logps": exp.old_logps[idx]}
            if exp.ref_logps is not None:
                batch["ref_logps"] = exp.ref_logps[idx]
            if exp.values is not None:
                batch["old_values"] = exp.values[idx]
            for k in self.microbatch_keys:
                batch[k] = extra[k][idx].float()
            batch["loss_mask"][len(chunk):] = 0.0
            out.append(batch)
        return out

    def minibatch_rows(self, context: StepContext, n_local: int, epoch: int) -> List[List[int]]:
        """This rank's rows of each mini-batch of ``epoch``, a function of the global rows
        only (the same global mini-batches at any data-parallel size).

        Global row ``g`` (rank r holds rows ``r·n_local ..``) has position ``π(g)`` in the
        epoch's order (identity in epoch 0, a permutation of (seed, step, epoch) later) and
        belongs to mini-batch ``π(g) mod M`` (M mini-batches). A rank may hold no row of a
        mini-batch; it then runs one micro-batch that counts for nothing.
        """
        n_global = n_local * context.dp_size
        minibatches = n_global // self.mini_batch_size
        if epoch == 0:
            position = torch.arange(n_global)
        else:
            g = torch.Generator().manual_seed(context.seed * 1_000_003 + context.step * 1009 + epoch)
            order = torch.randperm(n_global, generator=g)
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
        """``epochs`` x mini-batches of updates of :attr:`update_roles`; their metrics."""
        roles = self.update_roles
        stores: Dict[str, list] = {name: [] for name, _ in roles}
        norms: Dict[str, List[float]] = {name: [] for name, _ in roles}
        stopped_early = 0.0
        updates = 0
        for epoch in range(self.epochs):
            for rows in self.minibatch_rows(context, len(exp), epoch):
                micro = self._microbatches(exp, extra, rows, context.micro_batch_size)
                outputs = {}
                for name, loss in roles:
                    role = context.roles[name]
                    role.train()
                    role.zero_grad()
                    outputs[name] = context.run_schedule(role.chunks, micro, forward, loss, forward_only=False)
                    stores[name] += outputs[name]
                    _, norm = role.step()
                    norms[name].append(float(norm) if norm is not None else float("nan"))
                updates += 1
                if self.s.target_kl is not None:
                    kl = reduce_metric_store(outputs["policy"], context).get("policy/approx_kl", 0.0)
                    if kl > self.s.target_kl:
                        stopped_early = 1.0
                        break
            if stopped_early:
                break
        metrics = reduce_metric_store([d for name, _ in roles for d in stores[name]], context)
        for name, _ in roles:
            metrics[f"grad_norm/{name}"] = sum(norms[name]) / len(norms[name])
            metrics[f"grad_norm/{name}_first"] = norms[name][0]
            lr = context.roles[name].lr
            metrics["lr" if name == "policy" else f"lr/{name}"] = lr
        metrics.update({"updates": float(updates), "early_stop": stopped_early})
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
        ref = exp.ref_logps if exp.ref_logps is not None else exp.old_logps
        k1 = (exp.old_logps - ref).double()
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
        exp = self.maker.score_passes(context, exp)
        t1 = time.perf_counter()
        extra = self.advantages(context, exp)
        metrics = self.experience_metrics(context, exp, extra)
        t2 = time.perf_counter()
        metrics.update(self.update(context, exp, extra))
        t3 = time.perf_counter()
        if self.s.offload:
            reward.onload()
        total = time.perf_counter() - t0
        timings = dict(exp.timings, reductions=t2 - t1, updates=t3 - t2)
        for k, v in timings.items():
            metrics[f"time/{k}"] = v
            metrics[f"time/{k}_share"] = v / total
        metrics["step_time"] = total
        metrics["samples"] = float(self.rollout_buffer)
        return metrics
