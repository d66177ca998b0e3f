"""PPO-RLHF in one job (docs/ppo.md): policy, reference, critic and reward by role, the
experience made inside the step with the rollout engine, several epochs per rollout.
``aligner train ppo``.

On the online core (:mod:`aligner.algorithms.online`), PPO's step has: token rewards
``r_t = −β·KL_t`` with the score on the last response token and GAE (γ, λ) against the
critic's values (:func:`~aligner.algorithms.losses.advantages.gae_token_advantages`,
registered as ``gae``), advantages whitened over every response token of the
data-parallel batch; per mini-batch one policy update (clipped surrogate, optional dual
clip and clip-higher, entropy bonus) and one critic update (clipped value loss,
:func:`ppo_value_loss`, here: PPO is the one algorithm with a critic). With ``target_kl`` the updates
stop once a mini-batch's approximate KL to the rollout policy exceeds it. Truncated
responses are kept, masked out of both losses, or scored ``truncated_reward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from aligner.algorithms.base import RunConfig, init_from_hf, register_trainer
from aligner.algorithms.losses.advantages import compute_advantages, estimator, gae_returns
from aligner.algorithms.losses.policy import kl_estimate
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
from aligner.parallel import get_device
from aligner.config import ConfigError
from aligner.training.algorithm import StepContext
from aligner.training.config import InitSection, OptimSection
from aligner.training.forward import critic_values
from aligner.training.metrics import metric

PPO_KL_ESTIMATORS = ("abs", "k1", "k3")  # estimates of KL_t that belong in the reward


# ------------------------------------------------------------------------------ config
@dataclass
class PPOSection(OnlineSection):
    """``ppo``: PPO-RLHF (docs/ppo.md); the shared options in :class:`OnlineSection`."""

    kl_estimator: KLEstimator = KLEstimator.abs  # abs | k1 | k3 (clamped), in the reward
    gamma: float = 1.0  # GAE's discount
    lam: float = 0.95  # GAE's λ
    value_clip: float = 0.2  # the critic's clip around its rollout values
    whiten_advantages: bool = True
    # auto (the reward model when reward.kind = model, else the policy's initial weights),
    # reward, policy or an HF folder
    critic_init: str = "auto"
    # with lora.enabled: the critic is a second adapter set (the lora section's rank, alpha,
    # targets) and a value head on the policy's own base weights, not a second model
    critic_lora: bool = False
    critic_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=9e-6))


@dataclass
class PPOConfig(RunConfig):
    """PPO-RLHF, from an SFT model (``init.hf`` required) and a reward source."""

    algorithm: str = "ppo"
    init: InitSection = field(default_factory=init_from_hf)
    ppo: PPOSection = field(default_factory=PPOSection)


def check_ppo_section(s, key: str = "ppo") -> None:
    for name in ("gamma", "lam"):  # GAE's discount and λ
        if not 0 <= s[name] <= 1:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected in [0, 1]")
    if s.kl_estimator not in PPO_KL_ESTIMATORS:
        raise ConfigError(f"{key}.kl_estimator: {str(s.kl_estimator)!r} is not accepted; expected one of"
                          f" {', '.join(PPO_KL_ESTIMATORS)}")


# ------------------------------------------------------------------------------ the critic's loss
def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped value loss (docs/ppo.md).

    ``V_c = V_old + clip(V − V_old, −c, c)``; ``L = 0.5 · masked_mean(max((V_c − R)², (V − R)²))``.
    values (with grad), old_values, returns, mask: [b, s].
    Stats: ``loss``, ``clipfrac`` (share of tokens where the clipped error is the larger),
    ``values`` (mean), ``returns`` (mean).
    """
    # the toolkit's one masked mean: aligner.models pulls megatron-core, loaded when training
    from aligner.models.logprobs import masked_mean

    for name, other in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if tuple(other.shape) != tuple(values.shape):
            raise ValueError(f"{name} has shape {tuple(other.shape)}; expected {tuple(values.shape)} like values")
    m = mask.to(values.dtype)
    old, ret = old_values.detach(), returns.detach()
    v_clipped = old + (values - old).clamp(-clip, clip)
    err_clipped, err = (v_clipped - ret) ** 2, (values - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_clipped, err), m)
    stats = {
        "loss": loss.detach(),
        "clipfrac": masked_mean((err_clipped > err).to(values.dtype), m).detach(),
        "values": masked_mean(values.detach(), m),
        "returns": masked_mean(ret, m),
    }
    return loss, stats


# ------------------------------------------------------------------------------ algorithm
class PPOAlgorithm(OnlineAlgorithm):
    """PPO on the roles ``policy`` and ``critic`` (module docstring)."""

    name = "ppo"
    key = "ppo"
    microbatch_keys = ("advantages", "returns", "loss_mask")

    def __init__(self, section: PPOSection, maker: ExperienceMaker, shape: RolloutShape):
        if section.kl_estimator not in PPO_KL_ESTIMATORS:
            raise ValueError(f"ppo.kl_estimator = {section.kl_estimator!r}: expected one of {list(PPO_KL_ESTIMATORS)}")
        super().__init__(section, maker, shape)

    @property
    def update_roles(self):
        return [("policy", self._policy_loss), ("critic", self._value_loss)]

    def token_kl(self, exp: Experience) -> torch.Tensor:
        """The KL estimate of every token to the reference (0 without one) [n, S]."""
        ref = exp.ref_logps if exp.ref_logps is not None else exp.old_logps
        return kl_estimate(exp.old_logps, ref, str(self.s.kl_estimator))

    def advantages(self, context: StepContext, exp: Experience) -> Dict[str, torch.Tensor]:
        """GAE over the token rewards, whitened over the data-parallel batch; the returns."""
        s = self.s
        mask = exp.response_mask
        scores = exp.rewards.clone()
        keep = torch.ones(len(exp))
        if s.truncated == Truncated.penalize:
            scores = torch.where(exp.truncated, torch.full_like(scores, s.truncated_reward), scores)
        elif s.truncated == Truncated.mask:
            keep = (~exp.truncated).float()
        loss_mask = mask * keep[:, None]
        values = exp.values * mask
        adv = compute_advantages("gae", scores.float(), mask, exp.group, token_kl=self.token_kl(exp),
                                 kl_coef=s.kl_coef, values=values, gamma=s.gamma, lam=s.lam)
        returns = gae_returns(adv, values, mask)
        if s.whiten_advantages and estimator("gae").whiten:
            adv = self.whitened(context, adv, loss_mask)
        return {"advantages": adv * loss_mask, "returns": returns, "loss_mask": loss_mask, "scores": scores}

    def role_loss_count(self, role, batch):
        if role == "critic":
            return int(batch["loss_mask"].sum().round())  # the value loss's tokens
        return super().role_loss_count(role, batch)

    def _value_loss(self, batch, values):
        v = critic_values(batch, values).float()
        mask = batch["loss_mask"]
        loss, stats = ppo_value_loss(v, batch["old_values"], batch["returns"], mask, clip=self.s.value_clip)
        count = mask.sum()
        metrics = {"loss/value": metric(loss.detach() * count, count),
                   "value/clipfrac": metric(stats["clipfrac"] * count, count)}
        return loss * count, count.round().long(), metrics

    def extra_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        """The KL penalty in the reward and the critic's explained variance of the returns."""
        out: Dict[str, float] = {}
        mom = self.global_moments(context, self.token_kl(exp).double(), exp.response_mask)
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

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        check_ppo_section(cfg.ppo)
        if cfg.ppo.critic_lora:
            if not cfg.lora.enabled:
                raise ConfigError("ppo.critic_lora = true: a second adapter set on the policy's base needs"
                                  " lora.enabled = true")
            if cfg.ppo.critic_init not in ("auto", "policy"):
                raise ConfigError(f"ppo.critic_init = {cfg.ppo.critic_init}: with ppo.critic_lora the critic's base"
                                  " is the policy's; expected auto or policy")

    def build_roles(self, policy_models, n_prompts: int):
        self._policy_models = policy_models  # the base a second adapter set shares (ppo.critic_lora)
        return super().build_roles(policy_models, n_prompts)

    def build_algorithm(self, roles, generation, reward, reference, shape: RolloutShape, max_steps: int):
        """The critic (its own optimizer and schedule) and the algorithm."""
        # roles wrap models in megatron-core's DDP and optimizer: loaded when a run starts
        from aligner.training.roles import build_trainable_role

        s = self.cfg.ppo
        shared = []
        if s.critic_lora:
            critic_models, critic_cfg, shared = self.build_adapter_critic()
        else:
            critic_models, critic_cfg = self.build_critic(reward)
        critic = build_trainable_role("critic", critic_models, s.critic_optim, max_steps * shape.optimizer_steps,
                                      export_head="value", model_cfg=critic_cfg)
        critic.borrowed = frozenset(id(p) for p in shared)  # the policy's: offloading the critic leaves them
        roles.add(critic)
        maker = ExperienceMaker(generation, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                reference=reference, critic=critic, max_batch=s.generation.max_batch,
                                continuous_batching=s.generation.continuous_batching)
        return PPOAlgorithm(s, maker, shape)

    def build_adapter_critic(self):
        """``ppo.critic_lora``: the critic's chunks on the policy's frozen base (shared
        parameters, :func:`aligner.models.lora.share_base`) with a value head and adapters of
        their own (A drawn with seed ``trainer.seed + 1``); returns them, the architecture
        and the shared parameters."""
        # the model code is megatron-core: loaded when models are built
        from aligner.models import build_model
        from aligner.models.lora import LoraSettings, apply_lora, share_base

        cfg, lo = self.model_config(), self.cfg.lora
        vpp = self.cfg.parallel.vpp
        stages = [None] if not vpp else list(range(vpp))
        # built whole, then its base is replaced by the policy's (its own is released)
        models = [build_model(cfg, head="value", num_outputs=1, params_dtype=self.params_dtype(), vp_stage=st)
                  .to(get_device()) for st in stages]
        shared = share_base(models, self._policy_models)
        settings = LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora,
                                targets=tuple(lo.targets), seed=self.cfg.trainer.seed + 1)
        apply_lora(models, cfg, settings)
        return models, cfg, shared

    def build_critic(self, reward):
        """The critic's chunks: a value head on the reward model (its head initialised to the
        reward's combination of attributes, so the first values predict the reward), on the
        policy's initial weights, or on an HF folder."""
        # the model code is megatron-core: loaded when models are built
        from aligner.models import ModelConfig, build_model, load_hf_weights
        from aligner.models.gpt import ScoreHead

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
        n_out = reward.num_outputs if init == "reward" else 1
        p = self.cfg.parallel  # split as the policy is (an MoE critic trains at TP > 1 only so)
        models = [build_model(cfg, head="value", num_outputs=n_out, params_dtype=self.params_dtype(), vp_stage=st,
                              sequence_parallel=p.sequence_parallel and p.tp > 1).to(get_device()) for st in stages]
        if path:
            load_hf_weights(models, path, cfg, head="value")
        if n_out > 1:
            # one value output: the reward's own combination of the attribute outputs
            r = self.cfg.ppo.reward
            if r.attribute_weights is not None:
                w = torch.tensor(list(r.attribute_weights), dtype=torch.float32)
            else:
                w = torch.zeros(n_out)
                w[list(reward.attributes).index(r.reward_attribute)] = 1.0  # the names it records (preflight)
            for m in models:
                if m.head is not None:
                    combined = (w.to(m.head.weight.dtype) @ m.head.weight.detach().float().to(w.dtype)).reshape(1, -1)
                    head = ScoreHead(cfg.hidden_size, 1, cfg.init_std, m.head.weight.dtype)
                    with torch.no_grad():
                        head.weight.copy_(combined.to(head.weight.dtype))
                    m.head, m.num_outputs = head, 1
        return models, cfg
