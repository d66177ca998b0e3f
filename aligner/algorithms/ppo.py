"""PPO-RLHF in one job (docs/ppo.md): policy, reference, critic and reward by role, experience
made inside the step with the rollout engine, several PPO epochs per rollout.

A step (:meth:`PPOAlgorithm.train_step`, on the loop's :class:`StepContext`):

1. experience (:class:`aligner.algorithms.experience.ExperienceMaker`): the step's prompts
   are sampled on the live policy, scored by the reward source; old / reference log-probs
   and the critic's values come from forward-only schedules.
2. token rewards ``r_t = −β·KL_t`` on response tokens plus the score on the last one
   (:func:`~aligner.algorithms.losses.ppo_token_rewards`, KL estimator ``k1`` / ``abs`` /
   ``k3``, clamped); GAE (γ, λ); advantages whitened with the mean / variance of every
   response token of the whole data-parallel batch.
3. ``ppo_epochs`` passes over the rollouts in mini-batches of ``mini_batch_size``
   responses (global): one policy update (clipped surrogate, optional dual-clip and
   clip-higher, entropy bonus) and one critic update (clipped value loss) per mini-batch,
   each through megatron-core's schedule with token-level normalisation over the global
   mini-batch. Mini-batches are sets of global rows (:meth:`PPOAlgorithm.minibatch_rows`),
   the same at any data-parallel size: in epoch 0 row g joins mini-batch g mod M, later
   epochs permute the rows first (a function of seed, step and epoch). Before the first
   update the policy is the rollout policy, so the first ratio is 1. With ``target_kl`` the updates stop once a
   mini-batch's approximate KL to the rollout policy exceeds it.
4. metrics, reduced over ranks (docs/ppo.md lists them).

Responses that end at the length limit without a stop token are kept (``truncated:
keep``), left out of both losses (``mask``) or given the score ``truncated_reward``
(``penalize``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from omegaconf import MISSING

from aligner.algorithms.experience import Experience, ExperienceMaker
from aligner.algorithms.losses import compute_advantages, kl_estimate, masked_moments, masked_whiten, ppo_value_loss
from aligner.algorithms.losses.advantages import gae_returns
from aligner.algorithms.online import (  # noqa: F401  (the shared sections and choices, importable from here)
    GenerationSection,
    OnlineAlgorithm,
    OnlineSection,
    ReferenceMode,
    RewardKind,
    RewardSection,
    Truncated,
)
from aligner.algorithms.trainers import OnlineTrainer, register_trainer
from aligner.training.algorithm import StepContext, metric
from aligner.training.config import Choice, InitSection, OptimSection, RunConfig

TRUNCATED = tuple(t.value for t in Truncated)


class KLEstimator(Choice):
    """PPO's KL penalty in the reward (:func:`aligner.algorithms.losses.kl_penalty`)."""

    abs = "abs"
    k1 = "k1"
    k3 = "k3"


# ------------------------------------------------------------------------------ config
@dataclass
class PPOSection(OnlineSection):
    """``ppo``: PPO-RLHF (docs/ppo.md); the shared options in :class:`OnlineSection`.

    critic_init: ``auto`` (the reward model when reward.kind = model, else the policy's
    initial weights), ``reward``, ``policy`` or an HF folder.
    """

    kl_estimator: KLEstimator = KLEstimator.abs
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    ppo_epochs: int = 1
    whiten_advantages: bool = True
    critic_init: str = "auto"
    critic_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=9e-6))


@dataclass
class PPOConfig(RunConfig):
    """PPO-RLHF, from an SFT model (``init.hf`` required) and a reward source."""

    algorithm: str = "ppo"
    init: InitSection = field(default_factory=lambda: InitSection(hf=MISSING))
    ppo: PPOSection = field(default_factory=PPOSection)


# ------------------------------------------------------------------------------ algorithm
class PPOAlgorithm(OnlineAlgorithm):
    """PPO on the roles ``policy`` and ``critic`` (module docstring): the online step
    (:class:`aligner.algorithms.online.OnlineAlgorithm`) with GAE advantages and a critic
    update after each policy update."""

    name = "ppo"
    key = "ppo"
    microbatch_keys = ("advantages", "returns", "loss_mask")

    def __init__(self, section: PPOSection, maker: ExperienceMaker, rollout_buffer: int):
        if section.kl_estimator not in tuple(k.value for k in KLEstimator):
            raise ValueError(f"ppo.kl_estimator = {section.kl_estimator!r}: expected one of"
                             f" {[k.value for k in KLEstimator]}")
        super().__init__(section, maker, rollout_buffer, section.ppo_epochs)

    @property
    def update_roles(self):
        return [("policy", self._policy_loss), ("critic", self._value_loss)]

    # ---------------------------------------------------------------- advantages
    def advantages(self, context: StepContext, exp: Experience) -> Dict[str, torch.Tensor]:
        """Token rewards, GAE and whitening over the data-parallel batch (float64 moments)."""
        s = self.s
        mask = exp.response_mask
        scores = exp.rewards.clone()
        keep = torch.ones(len(exp))
        if s.truncated == "penalize":
            scores = torch.where(exp.truncated, torch.full_like(scores, s.truncated_reward), scores)
        elif s.truncated == "mask":
            keep = (~exp.truncated).float()
        loss_mask = mask * keep[:, None]
        ref = exp.ref_logps if exp.ref_logps is not None else exp.old_logps
        token_kl = kl_estimate(exp.old_logps, ref, str(s.kl_estimator))
        values = exp.values * mask
        adv = compute_advantages("gae", scores.float(), mask, exp.group, token_kl=token_kl, kl_coef=s.kl_coef,
                                 values=values, gamma=s.gamma, lam=s.lam)
        returns = gae_returns(adv, values, mask)
        if s.whiten_advantages:
            moments = context.all_reduce_dp(masked_moments(adv, loss_mask))
            if float(moments[0]) > 0:
                adv = masked_whiten(adv, loss_mask, moments)
        return {"advantages": adv * loss_mask, "returns": returns, "loss_mask": loss_mask,
                "scores": scores}

    # ---------------------------------------------------------------- critic
    def _value_loss(self, batch, values):
        from aligner.algorithms.experience import critic_values

        v = critic_values(batch, values).float()
        mask = batch["loss_mask"]
        loss, stats = ppo_value_loss(v, batch["old_values"], batch["returns"], mask, clip=self.s.value_clip)
        count = mask.sum()
        metrics = {"loss/value": metric(loss.detach() * count, count),
                   "value/clipfrac": metric(stats["clipfrac"] * count, count)}
        return loss * count, count.round().long(), metrics

    # ---------------------------------------------------------------- metrics
    def extra_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        """The KL penalty in the reward and the critic's explained variance of the returns."""
        out: Dict[str, float] = {}
        mask = exp.response_mask
        ref = exp.ref_logps if exp.ref_logps is not None else exp.old_logps
        est = kl_estimate(exp.old_logps, ref, str(self.s.kl_estimator)).double()
        mom = self.global_moments(context, est, mask)
        out["kl_penalty"] = float(mom[1]) / max(float(mom[0]), 1.0)
        lm = extra["loss_mask"]
        r = self.global_moments(context, extra["returns"].double(), lm)
        e = self.global_moments(context, (extra["returns"] - exp.values).double(), lm)
        if float(r[0]) > 0:
            var_r = float(r[2]) / float(r[0]) - (float(r[1]) / float(r[0])) ** 2
            var_e = float(e[2]) / float(e[0]) - (float(e[1]) / float(e[0])) ** 2
            out["explained_variance"] = 1.0 - var_e / var_r if var_r > 0 else float("nan")
        return out


# ------------------------------------------------------------------------------ trainer
@register_trainer("ppo")
class PPOTrainer(OnlineTrainer):
    """``aligner train ppo``: roles built from the config, then the shared loop."""

    schema = PPOConfig
    key = "ppo"
    epochs_key = "ppo_epochs"

    def build_algorithm(self, roles, generation, reward, reference, rollout_buffer: int, max_steps: int):
        """The critic (its own optimizer and schedule) and the algorithm."""
        from aligner.training.roles import build_trainable_role

        s = self.cfg.ppo
        dtype = torch.bfloat16 if self.cfg.init.dtype == "bf16" else torch.float32
        mbs = s.mini_batch_size or rollout_buffer
        critic_models, critic_cfg = self.build_critic(reward, dtype)
        critic = build_trainable_role("critic", critic_models, s.critic_optim,
                                      max_steps * s.ppo_epochs * (rollout_buffer // mbs), export_head="value",
                                      model_cfg=critic_cfg)
        roles.add(critic)
        maker = ExperienceMaker(generation, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                reference=reference, critic=critic, max_batch=s.generation.max_batch)
        return PPOAlgorithm(s, maker, rollout_buffer)

    def build_critic(self, reward, dtype):
        """The critic's chunks: a value head on the reward model (its head initialised to the
        reward's combination of attributes, so the first values predict the reward), on the
        policy's initial weights, or on an HF folder."""
        from aligner.models import ModelConfig, build_model, load_hf_weights
        from aligner.models.gpt import ScoreHead
        from aligner.parallel import get_device

        init = self.cfg.ppo.critic_init
        if init == "auto":
            init = "reward" if self.cfg.ppo.reward.kind == "model" else "policy"
        if init == "reward":
            if self.cfg.ppo.reward.kind != "model":
                raise ValueError("ppo.critic_init = reward needs ppo.reward.kind = model")
            path = self.cfg.ppo.reward.path
            if reward.tokenizer.vocab_size != self.tokenizer().vocab_size:
                raise ValueError("ppo.critic_init = reward: the reward model's tokenizer differs from the policy's,"
                                 " and the critic reads policy tokens; set ppo.critic_init = policy")
        elif init == "policy":
            path = self.cfg.init.hf
        else:
            path = init
        cfg = ModelConfig.from_hf(path) if path else self.model_config()
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.tokenizer().pad_id
        vpp = self.cfg.parallel.vpp
        stages = [None] if not vpp else list(range(vpp))
        n_out = getattr(reward, "num_outputs", 1) if init == "reward" else 1
        models = [build_model(cfg, head="value", num_outputs=n_out, params_dtype=dtype, vp_stage=st).to(get_device())
                  for st in stages]
        if path:
            load_hf_weights(models, path, cfg, head="value")
        if n_out > 1:
            # one value output: the reward's own combination of the attribute outputs
            r = self.cfg.ppo.reward
            if r.attribute_weights is not None:
                w = torch.tensor(list(r.attribute_weights), dtype=torch.float32)
            else:
                w = torch.zeros(n_out)
                w[list(r.attributes).index(r.reward_attribute)] = 1.0
            for m in models:
                if m.head is not None:
                    combined = (w.to(m.head.weight.dtype) @ m.head.weight.detach().float().to(w.dtype)).reshape(1, -1)
                    head = ScoreHead(cfg.hidden_size, 1, cfg.init_std, m.head.weight.dtype)
                    with torch.no_grad():
                        head.weight.copy_(combined.to(head.weight.dtype))
                    m.head, m.num_outputs = head, 1
        return models, cfg

