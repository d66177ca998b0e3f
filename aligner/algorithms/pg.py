"""The REINFORCE family on the online core (docs/reinforce.md): RLOO, GRPO, Dr. GRPO,
REINFORCE++ and any registered estimator as ``pg.advantage``, DAPO's dynamic sampling and
overlong shaping, KL in the reward or as a loss term; ``aligner train pg`` (``rloo``, ``grpo``).

What is REINFORCE-specific beside the online core (:mod:`aligner.algorithms.online`): the
sequence rewards (truncated responses, the overlong penalty), extra generation rounds
until every rank holds its share of groups with signal, the advantages by name over the
valid rows of each group, and the policy loss's kind and aggregation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from aligner.algorithms.base import RunConfig, init_from_hf, register_trainer
from aligner.algorithms.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    estimator,
    groups_with_signal,
    overlong_penalty,
)
from aligner.algorithms.losses.policy import AGGREGATIONS, POLICY_LOSSES, kl_estimate
from aligner.algorithms.online import (
    Experience,
    ExperienceMaker,
    KLEstimator,
    OnlineAlgorithm,
    OnlineSection,
    OnlineTrainer,
    RolloutShape,
    Truncated,
)
from aligner.config import Choice, ConfigError, registered
from aligner.parallel.seeds import prompt_round_generator
from aligner.training.algorithm import StepContext
from aligner.training.config import InitSection

Aggregation = Choice("Aggregation", [(name, name) for name in AGGREGATIONS], module=__name__)


class KLMode(Choice):
    reward = "reward"
    loss = "loss"


class OldLogpsPass(Choice):
    """The forward pass for the old log-probs before the update."""

    auto = "auto"  # skipped where the update's own forward gives them (docs/online_core.md, "Old log-probs")
    always = "always"


PG_INPUTS = ("token_kl", "kl_coef", "gamma")  # what pg gives an advantage estimator beyond the rewards
KL_IN_REWARD = ("k1", "abs")


def pg_estimators():
    """The registered advantage estimators pg can run: those that read no more than it gives."""
    return [name for name, e in ADVANTAGE_ESTIMATORS.items() if set(e.inputs) <= set(PG_INPUTS)]


# ------------------------------------------------------------------------------ config
@dataclass
class PGSection(OnlineSection):
    """``pg``: the REINFORCE family (docs/reinforce.md); the shared options (clip, KL
    coefficient, samples per prompt, mini-batches, epochs, truncated responses, generation,
    reward) in :class:`aligner.algorithms.online.OnlineSection`."""

    advantage: str = registered(pg_estimators, "rloo")  # a registered estimator's name
    loss: str = registered(POLICY_LOSSES, "reinforce")  # reinforce (on-policy) | clipped | gspo | cispo
    aggregation: Aggregation = Aggregation.token_mean  # how token losses become the objective
    aggregation_constant: Optional[float] = None  # seq_sum_constant's C (null: generation.max_new_tokens)
    kl_mode: KLMode = KLMode.reward  # KL in the reward (k1 | abs) or as a loss term (k1 | k2 | k3 | k3+)
    kl_estimator: KLEstimator = KLEstimator.k1  # kl_coef 0: no reference pass at all
    gamma: float = 1.0  # REINFORCE++'s discount
    dynamic_sampling: bool = False  # DAPO: resample groups whose rewards are all equal
    max_generation_rounds: int = 4  # rounds of generation per step at most (dynamic sampling)
    overlong_buffer: Optional[int] = None  # DAPO's soft overlong penalty: L_cache (null: off)
    overlong_max_length: Optional[int] = None  # L_max (null: generation.max_new_tokens)
    samples_per_prompt: int = 4
    old_logps_pass: OldLogpsPass = OldLogpsPass.auto  # always: run it even where the update's forward gives them


@dataclass
class PGConfig(RunConfig):
    """The REINFORCE family, from an SFT model (``init.hf`` required) and a reward source."""

    algorithm: str = "pg"
    init: InitSection = field(default_factory=init_from_hf)
    pg: PGSection = field(default_factory=PGSection)


def check_pg_section(s, global_batch_size: int, key: str = "pg") -> None:
    """The pg-specific checks (ConfigError naming ``pg.<field>``)."""
    entry = estimator(s.advantage)
    if s.kl_mode == KLMode.reward and s.kl_estimator not in KL_IN_REWARD:
        raise ConfigError(f"{key}.kl_estimator = {str(s.kl_estimator)!r} does not belong in the reward: with"
                          f" {key}.kl_mode = reward use one of {', '.join(KL_IN_REWARD)}",
                          hint=f"or set {key}.kl_mode=loss (k1, k2, k3, k3+)")
    if s.kl_mode == KLMode.loss and s.kl_estimator == "abs":
        raise ConfigError(f"{key}.kl_estimator = 'abs' has no useful gradient as a loss term: with {key}.kl_mode ="
                          " loss use one of k1, k2, k3, k3+")
    if entry.needs_group and s.samples_per_prompt < 2:
        raise ConfigError(f"{key}.samples_per_prompt = {s.samples_per_prompt}: {key}.advantage = {s.advantage!r}"
                          " compares the samples of a prompt's group and needs >= 2")
    shape = RolloutShape.of(key, s, global_batch_size)
    if s.loss == "reinforce" and shape.optimizer_steps != 1:
        raise ConfigError(f"{key}.loss = reinforce is on-policy (no ratio to the rollout policy): one update per"
                          f" rollout buffer ({key}.epochs = 1, {key}.mini_batch_size = null or {shape.rows})",
                          hint=f"for several updates per rollout set {key}.loss=clipped")
    if s.aggregation_constant is not None and not s.aggregation_constant > 0:
        raise ConfigError(f"{key}.aggregation_constant = {s.aggregation_constant}: expected > 0 (or null)")
    if not 0 <= s.gamma <= 1:
        raise ConfigError(f"{key}.gamma = {s.gamma}: expected in [0, 1] (a discount)")
    if s.max_generation_rounds < 1:
        raise ConfigError(f"{key}.max_generation_rounds = {s.max_generation_rounds}: expected >= 1")
    l_max = s.overlong_max_length or s.generation.max_new_tokens
    if s.overlong_max_length is not None and s.overlong_max_length < 1:
        raise ConfigError(f"{key}.overlong_max_length = {s.overlong_max_length}: expected >= 1 (or null)")
    if s.overlong_buffer is not None and not 1 <= s.overlong_buffer <= l_max:
        raise ConfigError(f"{key}.overlong_buffer = {s.overlong_buffer}: expected in 1..{l_max}"
                          f" ({key}.overlong_max_length, default {key}.generation.max_new_tokens)")


# ------------------------------------------------------------------------------ algorithm
class PGAlgorithm(OnlineAlgorithm):
    """REINFORCE-family step on the online core (module docstring)."""

    name = "pg"
    key = "pg"

    def __init__(self, section: PGSection, maker: ExperienceMaker, shape: RolloutShape):
        super().__init__(section, maker, shape)
        s = section
        if s.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"pg.advantage = {s.advantage!r}: expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
        o = self.loss_options
        o.kind = str(s.loss)
        entry = POLICY_LOSSES[o.kind]  # its own clip range where clip_eps_low / clip_eps_high are unset
        if entry.clip_low is not None and s.clip_eps_low is None:
            o.clip_low = entry.clip_low
        if entry.clip_high is not None and s.clip_eps_high is None:
            o.clip_high = entry.clip_high
        o.aggregation = str(s.aggregation)
        o.constant = s.aggregation_constant or float(s.generation.max_new_tokens)
        self.kl_in_loss = s.kl_mode == KLMode.loss and s.kl_coef > 0
        self.kl_in_reward = s.kl_mode == KLMode.reward and s.kl_coef > 0
        o.kl_coef = s.kl_coef if self.kl_in_loss else 0.0
        o.kl_estimator = str(s.kl_estimator)
        self.overlong_max_length = s.overlong_max_length or s.generation.max_new_tokens
        self.prompt_pool: Optional[List[dict]] = None  # the training prompts (the trainer sets them)
        self.counters: Dict[str, float] = {}

    def old_logps_from_update(self) -> bool:
        """One update per rollout on the weights that generated and no KL in the reward (whose
        advantages read the old log-probs before the update), unless ``old_logps_pass = always``."""
        return (self.s.old_logps_pass == OldLogpsPass.auto and not self.kl_in_reward
                and self.one_update_on_rollout_weights())

    # ---------------------------------------------------------------- rewards
    def sequence_rewards(self, exp: Experience):
        """``(r [n] float64, overlong penalty [n])``: the source's score (``truncated_reward``
        for responses without EOS under ``truncated: penalize``) plus the penalty."""
        s = self.s
        r = exp.rewards.double().clone()
        if s.truncated == Truncated.penalize:
            r = torch.where(exp.truncated, torch.full_like(r, s.truncated_reward), r)
        if s.overlong_buffer:
            penalty = overlong_penalty(exp.response_lengths, self.overlong_max_length, s.overlong_buffer)
        else:
            penalty = torch.zeros_like(r)
        return r + penalty, penalty

    def valid_rows(self, exp: Experience) -> torch.Tensor:
        """Rows that count: not a filler, and with ``truncated: mask`` ended by EOS. [n] bool."""
        valid = torch.ones(len(exp), dtype=torch.bool)
        if exp.filler is not None:
            valid &= ~exp.filler
        if self.s.truncated == Truncated.mask:
            valid &= ~exp.truncated
        return valid

    # ---------------------------------------------------------------- experience
    def round_prompts(self, context: StepContext, round: int) -> List[dict]:
        """This rank's share of round ``round``'s prompts (round >= 1): a block of
        ``len(context.samples)`` prompts drawn from the training prompts as a function of
        (seed, step, round), split over data-parallel ranks as the loop splits a step."""
        if not self.prompt_pool:
            raise ValueError("pg.dynamic_sampling needs the training prompts (PGAlgorithm.prompt_pool)")
        P = len(context.samples)
        order = torch.randperm(len(self.prompt_pool), generator=prompt_round_generator(context.seed, context.step,
                                                                                        round))[:P]
        block = [self.prompt_pool[int(i)] for i in order]
        while len(block) < P:  # fewer prompts than a step: repeat the draw
            block += block[:P - len(block)]
        share = -(-P // context.dp_size)
        return block[context.dp_rank * share:(context.dp_rank + 1) * share]

    def _split_groups(self, exp: Experience):
        """(groups with signal, groups without) as lists of row lists, in row order."""
        G = self.maker.samples_per_prompt
        shaped, _ = self.sequence_rewards(exp)
        signal = groups_with_signal(shaped, exp.group, self.valid_rows(exp))
        keep, drop = [], []
        for start in range(0, len(exp), G):
            rows = list(range(start, start + G))
            (keep if bool(signal[start]) else drop).append(rows)
        return keep, drop

    def make_experience(self, context: StepContext) -> Experience:
        """One round of generation; with dynamic sampling, more rounds until every rank holds
        its share of groups with signal (module docstring)."""
        exp = self.maker.generate(context)
        self.counters = {"pg/generation_rounds": 1.0, "pg/groups_dropped": 0.0, "pg/groups_short": 0.0}
        if not self.s.dynamic_sampling:
            return exp
        quota = len(context.local_samples)
        parts = [exp]
        keep, drop = self._split_groups(exp)
        kept = [(0, rows) for rows in keep[:quota]]
        dropped = [(0, rows) for rows in drop]
        rounds = 1
        while True:
            short = torch.tensor([float(quota - len(kept))])
            if float(context.all_reduce_dp(short.clone(), op="max")[0]) <= 0 or rounds >= self.s.max_generation_rounds:
                break
            prompts = self.round_prompts(context, rounds)
            if len(kept) < quota and prompts:
                extra = self.maker.generate(context, prompts=prompts, round=rounds)
                parts.append(extra)
                keep, drop = self._split_groups(extra)
                kept += [(len(parts) - 1, rows) for rows in keep[:quota - len(kept)]]
                dropped += [(len(parts) - 1, rows) for rows in drop]
            else:  # experts split over the data-parallel ranks: in step with those generating
                self.maker.keep_in_step(context)
            rounds += 1
        fillers = dropped[:quota - len(kept)]
        counts = context.all_reduce_dp(torch.tensor([float(len(dropped)), float(len(fillers))], dtype=torch.float64))
        self.counters = {"pg/generation_rounds": float(rounds), "pg/groups_dropped": float(counts[0]),
                         "pg/groups_short": float(counts[1])}
        chosen = []
        for is_filler, items in ((False, kept), (True, fillers)):
            for part, rows in items:
                sub = parts[part].select(rows)
                sub.filler = torch.full((len(rows),), is_filler)
                chosen.append(sub)
        out = Experience.concat(chosen, pad_id=self.maker.tokenizer.pad_id)
        out.timings = {}
        for part in parts:  # every round's generation and scoring
            for k, v in part.timings.items():
                out.timings[k] = out.timings.get(k, 0.0) + v
        return out

    # ---------------------------------------------------------------- advantages
    def advantages(self, context: StepContext, exp: Experience) -> Dict[str, torch.Tensor]:
        """Per-token advantages of the configured estimator over the valid rows; REINFORCE++'s
        returns whitened with the moments of every valid token of the data-parallel batch."""
        s = self.s
        mask = exp.response_mask
        shaped, penalty = self.sequence_rewards(exp)
        valid = self.valid_rows(exp)
        loss_mask = mask * valid[:, None].to(mask.dtype)
        token_kl = None
        if self.kl_in_reward:
            token_kl = kl_estimate(exp.old_logps, exp.ref_logps, str(s.kl_estimator)).double() * mask
        adv = compute_advantages(s.advantage, shaped, mask, exp.group, valid=valid, token_kl=token_kl,
                                 kl_coef=s.kl_coef if self.kl_in_reward else 0.0, gamma=s.gamma)
        if estimator(s.advantage).whiten:
            adv = self.whitened(context, adv, loss_mask)
        return {"advantages": adv * loss_mask, "loss_mask": loss_mask, "scores": shaped, "penalty": penalty,
                "valid": valid, "token_kl": token_kl}

    # ---------------------------------------------------------------- metrics
    def extra_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        """Counters of dynamic sampling, overlong shaping and masking; the shaped score; the
        KL estimate in the reward; groups of the batch without signal."""
        G = self.maker.samples_per_prompt
        out = dict(self.counters)
        valid = extra["valid"]
        real = torch.ones(len(exp), dtype=torch.bool) if exp.filler is None else ~exp.filler
        signal = groups_with_signal(extra["scores"], exp.group, valid)
        counts = torch.tensor([float((~signal & real).sum()) / G, float((extra["penalty"] < 0).sum()),
                               float((exp.truncated & real & ~valid).sum()) if self.s.truncated == Truncated.mask else 0.0],
                              dtype=torch.float64)
        counts = context.all_reduce_dp(counts)
        out["pg/groups_without_signal"] = float(counts[0])
        out["pg/overlong_penalized"] = float(counts[1])
        out["pg/truncated_masked"] = float(counts[2])
        out["pg/overlong_penalty"] = self.global_mean(context, extra["penalty"])
        out["pg/score"] = self.global_mean(context, extra["scores"])
        adv = extra["advantages"].double()
        mom = self.global_moments(context, adv, extra["loss_mask"])
        out["pg/advantage_mean"] = float(mom[1]) / max(float(mom[0]), 1.0)
        if extra["token_kl"] is not None:
            k = self.global_moments(context, extra["token_kl"], exp.response_mask)
            out["kl_penalty"] = float(k[1]) / max(float(k[0]), 1.0)
        return out


# ------------------------------------------------------------------------------ trainer
@register_trainer("pg")
class PGTrainer(OnlineTrainer):
    """``aligner train pg``: reference (only with a KL term), reward, the shared loop."""

    schema = PGConfig
    key = "pg"

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check_pg_section(cfg.pg, cfg.trainer.global_batch_size)

    def needs_reference(self) -> bool:
        return self.cfg.pg.kl_coef > 0

    def build_algorithm(self, roles, generation, reward, reference, shape: RolloutShape, max_steps: int):
        s = self.cfg.pg
        maker = ExperienceMaker(generation, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                reference=reference, max_batch=s.generation.max_batch,
                                continuous_batching=s.generation.continuous_batching)
        return PGAlgorithm(s, maker, shape)
