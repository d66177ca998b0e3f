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

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.algorithms.experience import Experience, ExperienceMaker, reduce_metric_store
from aligner.algorithms.losses import (
    KL_KINDS,
    gae_advantages,
    kl_penalty,
    masked_moments,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from aligner.algorithms.trainers import _BaseTrainer, register_trainer
from aligner.models.logprobs import token_entropy
from aligner.training.algorithm import Algorithm, StepContext, metric
from aligner.training.batching import shifted_logprobs
from omegaconf import MISSING

from aligner.training.config import Choice, InitSection, OptimSection, RunConfig

TRUNCATED = ("keep", "mask", "penalize")


class KLEstimator(Choice):
    abs = "abs"
    k1 = "k1"
    k3 = "k3"


class Truncated(Choice):
    keep = "keep"
    mask = "mask"
    penalize = "penalize"


class ReferenceMode(Choice):
    host = "host"
    model = "model"


class RewardKind(Choice):
    model = "model"
    world = "world"
    function = "function"


# ------------------------------------------------------------------------------ config
@dataclass
class GenerationSection:
    """``ppo.generation``: sampling of the rollouts (aligner.rollout.GenerationConfig).
    seed: base of the per-sample seeds (null: ``trainer.seed``)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_batch: int = 64


@dataclass
class RewardSection:
    """``ppo.reward``: the reward source (aligner.rewards).

    kind: ``model`` (``path``: an HF reward-model folder), ``world`` (the embedded world's
    scorer) or ``function`` (``function``: ``package.module:function``). attributes: the
    names of the outputs; attribute_weights (one per output) or reward_attribute make the
    scalar reward.
    """

    kind: RewardKind = RewardKind.model
    path: Optional[str] = None
    function: Optional[str] = None
    attributes: List[str] = field(
        default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    attribute_weights: Optional[List[float]] = None
    reward_attribute: str = "helpfulness"
    micro_batch_size: int = 8


@dataclass
class PPOSection:
    """``ppo``: PPO-RLHF (docs/ppo.md).

    samples_per_prompt: responses per prompt (G); a step has trainer.global_batch_size
    prompts, so its rollout buffer is global_batch_size x G responses.
    mini_batch_size: responses per optimizer update (global; null: the whole buffer).
    reference: ``host`` (initial weights in host memory, swapped in) or ``model`` (a second
    model). critic_init: ``auto`` (the reward model when reward.kind = model, else the
    policy's initial weights), ``reward``, ``policy`` or an HF folder.
    """

    kl_coef: float = 0.01
    kl_estimator: KLEstimator = KLEstimator.abs
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_low: Optional[float] = None
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batch_size: Optional[int] = None
    whiten_advantages: bool = True
    target_kl: Optional[float] = None
    truncated: Truncated = Truncated.keep
    truncated_reward: float = -1.0
    samples_per_prompt: int = 1
    reference: ReferenceMode = ReferenceMode.host
    critic_init: str = "auto"
    offload: bool = False
    generation: GenerationSection = field(default_factory=GenerationSection)
    reward: RewardSection = field(default_factory=RewardSection)
    critic_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=9e-6))


@dataclass
class PPOConfig(RunConfig):
    """PPO-RLHF, from an SFT model (``init.hf`` required) and a reward source."""

    algorithm: str = "ppo"
    init: InitSection = field(default_factory=lambda: InitSection(hf=MISSING))
    ppo: PPOSection = field(default_factory=PPOSection)


# ------------------------------------------------------------------------------ algorithm
class PPOAlgorithm(Algorithm):
    """PPO on the roles ``policy`` and ``critic`` (module docstring)."""

    name = "ppo"
    owns_step = True

    def __init__(self, section: PPOSection, maker: ExperienceMaker, rollout_buffer: int):
        s = section
        if s.truncated not in TRUNCATED:
            raise ValueError(f"ppo.truncated = {s.truncated!r}: expected one of {TRUNCATED}")
        if s.ppo_epochs < 1:
            raise ValueError(f"ppo.ppo_epochs = {s.ppo_epochs}: expected >= 1")
        if s.kl_estimator not in KL_KINDS:
            raise ValueError(f"ppo.kl_estimator = {s.kl_estimator!r}: expected one of {KL_KINDS}")
        if s.reference not in ("host", "model"):
            raise ValueError(f"ppo.reference = {s.reference!r}: expected 'host' or 'model'")
        self.s = s
        self.maker = maker
        self.rollout_buffer = rollout_buffer
        mbs = s.mini_batch_size or rollout_buffer
        if mbs < 1 or rollout_buffer % mbs:
            raise ValueError(f"ppo.mini_batch_size = {mbs} must divide the rollout buffer of {rollout_buffer}"
                             " responses (trainer.global_batch_size x ppo.samples_per_prompt)")
        self.mini_batch_size = mbs
        self.optimizer_steps_per_step = s.ppo_epochs * (rollout_buffer // mbs)

    def sample_tokens(self, sample: dict) -> int:
        return int(sample["prompt_tokens"].numel())

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
        token_rewards, _ = ppo_token_rewards(scores.float(), exp.old_logps, ref, mask, s.kl_coef, s.kl_estimator)
        values = exp.values * mask
        adv, returns = gae_advantages(token_rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            moments = context.all_reduce_dp(masked_moments(adv, loss_mask))
            if float(moments[0]) > 0:
                adv = masked_whiten(adv, loss_mask, moments)
        return {"advantages": adv * loss_mask, "returns": returns, "loss_mask": loss_mask,
                "token_rewards": token_rewards, "scores": scores}

    # ---------------------------------------------------------------- micro-batches
    @staticmethod
    def _microbatches(exp: Experience, extra: Dict[str, torch.Tensor], rows: List[int], mbs: int) -> List[dict]:
        """Micro-batches of ``mbs`` rows; the last is filled with rows that count for nothing
        (and no rows at all give one such micro-batch)."""
        out = []
        for start in range(0, max(len(rows), 1), mbs):
            chunk = rows[start:start + mbs]
            idx = torch.tensor(chunk + [chunk[0] if chunk else 0] * (mbs - len(chunk)))
            batch = {"tokens": exp.tokens[idx], "position_ids": None, "attention_mask": None,
                     "old_logps": exp.old_logps[idx], "old_values": exp.values[idx]}
            for k in ("advantages", "returns", "loss_mask"):
                batch[k] = extra[k][idx].float()
            batch["loss_mask"][len(chunk):] = 0.0
            out.append(batch)
        return out

    @staticmethod
    def _forward(model, batch):
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    def _policy_loss(self, batch, logits):
        s = self.s
        lp = shifted_logprobs(logits, batch["tokens"])
        mask = batch["loss_mask"]
        entropy = F.pad(token_entropy(logits[:, :-1]), (1, 0))
        loss, stats = ppo_policy_loss(lp, batch["old_logps"], batch["advantages"], mask, clip_eps=s.clip_eps,
                                      entropy=entropy, entropy_coef=s.entropy_coef, clip_eps_low=s.clip_eps_low,
                                      clip_eps_high=s.clip_eps_high, dual_clip=s.dual_clip)
        count = mask.sum()
        metrics = {f"policy/{k}" if not k.startswith("loss") else k: metric(v * count, count)
                   for k, v in stats.items() if k != "loss"}
        return loss * count, count.round().long(), metrics

    def _value_loss(self, batch, values):
        from aligner.algorithms.experience import critic_values

        v = critic_values(batch, values).float()
        mask = batch["loss_mask"]
        loss, stats = ppo_value_loss(v, batch["old_values"], batch["returns"], mask, clip=self.s.value_clip)
        count = mask.sum()
        metrics = {"loss/value": metric(loss.detach() * count, count),
                   "value/clipfrac": metric(stats["clipfrac"] * count, count)}
        return loss * count, count.round().long(), metrics

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

    def update(self, context: StepContext, exp: Experience, extra: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """``ppo_epochs`` x mini-batches of policy and critic updates; their metrics."""
        policy, critic = context.roles["policy"], context.roles["critic"]
        store_p, store_v, norms_p, norms_v = [], [], [], []
        stopped_early = 0.0
        updates = 0
        for epoch in range(self.s.ppo_epochs):
            for rows in self.minibatch_rows(context, len(exp), epoch):
                micro = self._microbatches(exp, extra, rows, context.micro_batch_size)
                policy.train()
                policy.zero_grad()
                out_p = context.run_schedule(policy.chunks, micro, self._forward, self._policy_loss,
                                             forward_only=False)
                _, norm_p = policy.step()
                critic.train()
                critic.zero_grad()
                out_v = context.run_schedule(critic.chunks, micro, self._forward, self._value_loss,
                                             forward_only=False)
                _, norm_v = critic.step()
                updates += 1
                store_p += out_p
                store_v += out_v
                norms_p.append(float(norm_p) if norm_p is not None else float("nan"))
                norms_v.append(float(norm_v) if norm_v is not None else float("nan"))
                if self.s.target_kl is not None:
                    kl = reduce_metric_store(out_p, context).get("policy/approx_kl", 0.0)
                    if kl > self.s.target_kl:
                        stopped_early = 1.0
                        break
            if stopped_early:
                break
        metrics = reduce_metric_store(store_p + store_v, context)
        metrics.update({
            "grad_norm/policy": sum(norms_p) / len(norms_p), "grad_norm/critic": sum(norms_v) / len(norms_v),
            "grad_norm/policy_first": norms_p[0], "grad_norm/critic_first": norms_v[0],
            "updates": float(updates), "early_stop": stopped_early, "lr": policy.lr, "lr/critic": critic.lr,
        })
        return metrics

    # ---------------------------------------------------------------- metrics
    @staticmethod
    def _global_moments(context, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return context.all_reduce_dp(masked_moments(values, mask))

    def experience_metrics(self, context: StepContext, exp: Experience, extra) -> Dict[str, float]:
        mask = exp.response_mask
        ones = torch.ones(len(exp))
        out: Dict[str, float] = {}

        def mean_std(name, values, m):
            mom = self._global_moments(context, values, m)
            count = float(mom[0])
            mean = float(mom[1]) / max(count, 1.0)
            out[f"{name}/mean"] = mean
            out[f"{name}/std"] = math.sqrt(max(0.0, float(mom[2]) / max(count, 1.0) - mean * mean))
            return mom

        mean_std("reward", exp.rewards.double(), ones)
        mean_std("response_length", exp.response_lengths.double(), ones)
        out["eos_rate"] = float(self._global_moments(context, (~exp.truncated).double(), ones)[1]) / \
            float(self._global_moments(context, ones.double(), ones)[0])
        ref = exp.ref_logps if exp.ref_logps is not None else exp.old_logps
        k1 = (exp.old_logps - ref).double()
        kl_tok = self._global_moments(context, k1, mask)
        out["kl_ref"] = float(kl_tok[1]) / max(float(kl_tok[0]), 1.0)  # mean per token, k1
        kl_seq = (k1 * mask).sum(-1)
        out["kl_ref/sequence"] = float(self._global_moments(context, kl_seq, ones)[1]) / \
            float(self._global_moments(context, ones.double(), ones)[0])
        est = kl_penalty(exp.old_logps, ref, self.s.kl_estimator).double()
        mom = self._global_moments(context, est, mask)
        out["kl_penalty"] = float(mom[1]) / max(float(mom[0]), 1.0)
        diff = (exp.old_logps - exp.rollout_logps).double()
        mismatch = self._global_moments(context, (diff.exp() - 1).abs(), mask)
        out["logprob_mismatch"] = float(mismatch[1]) / max(float(mismatch[0]), 1.0)
        maxdiff = context.all_reduce_dp(torch.tensor([float((diff.abs() * mask).max()) if len(exp) else 0.0]),
                                        op="max")
        out["logprob_mismatch/max_abs"] = float(maxdiff[0])
        # explained variance of the returns by the values over the loss tokens
        lm = extra["loss_mask"]
        r = self._global_moments(context, extra["returns"].double(), lm)
        e = self._global_moments(context, (extra["returns"] - exp.values).double(), lm)
        if float(r[0]) > 0:
            var_r = float(r[2]) / float(r[0]) - (float(r[1]) / float(r[0])) ** 2
            var_e = float(e[2]) / float(e[0]) - (float(e[1]) / float(e[0])) ** 2
            out["explained_variance"] = 1.0 - var_e / var_r if var_r > 0 else float("nan")
        out["truncated_share"] = 1.0 - out["eos_rate"]
        if exp.attribute_scores is not None and self.maker.reward.attributes:
            for j, name in enumerate(self.maker.reward.attributes):
                out[f"reward/{name}"] = float(self._global_moments(
                    context, exp.attribute_scores[:, j].double(), ones)[1]) / float(
                    self._global_moments(context, ones.double(), ones)[0])
        return out

    # ---------------------------------------------------------------- the step
    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        reward = self.maker.reward
        critic = context.roles["critic"]
        if self.s.offload:
            critic.offload()
        exp = self.maker.generate(context)
        if self.s.offload:
            reward.offload()
            critic.onload()
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


# ------------------------------------------------------------------------------ trainer
@register_trainer("ppo")
class PPOTrainer(_BaseTrainer):
    """``aligner train ppo``: roles built from the config, then the shared loop."""

    schema = PPOConfig
    data_kind = "prompts"

    @classmethod
    def check(cls, cfg):
        from aligner.training.config import ConfigError

        s = cfg.ppo
        r = s.reward
        if r.kind == RewardKind.model and not r.path:
            raise ConfigError("ppo.reward.path is not set: ppo.reward.kind = model needs an HF reward-model folder",
                              hint="set ppo.reward.path=DIR, or ppo.reward.kind=world / function")
        if r.kind == RewardKind.function and not r.function:
            raise ConfigError("ppo.reward.function is not set: ppo.reward.kind = function needs package.module:function")
        if r.kind == RewardKind.model and r.attribute_weights is None and r.reward_attribute not in list(r.attributes):
            raise ConfigError(f"ppo.reward.reward_attribute = {r.reward_attribute!r} is not one of"
                              f" ppo.reward.attributes {list(r.attributes)}")
        if r.attribute_weights is not None and len(r.attribute_weights) != len(r.attributes):
            raise ConfigError(f"ppo.reward.attribute_weights has {len(r.attribute_weights)} entries;"
                              f" ppo.reward.attributes has {len(r.attributes)}")
        for key in ("samples_per_prompt", "ppo_epochs"):
            if s[key] < 1:
                raise ConfigError(f"ppo.{key} = {s[key]}: expected >= 1")
        if not 0 < s.clip_eps < 1:
            raise ConfigError(f"ppo.clip_eps = {s.clip_eps}: expected in (0, 1)")
        if s.dual_clip is not None and s.dual_clip <= 1:
            raise ConfigError(f"ppo.dual_clip = {s.dual_clip}: expected > 1 (or null)")
        rollout = cfg.trainer.global_batch_size * s.samples_per_prompt
        if s.mini_batch_size is not None and (s.mini_batch_size < 1 or rollout % s.mini_batch_size):
            raise ConfigError(f"ppo.mini_batch_size = {s.mini_batch_size}: must divide the rollout buffer"
                              f" (trainer.global_batch_size x ppo.samples_per_prompt = {rollout})")

    def prepare(self):
        train = self.load_data(self.cfg.data.train)
        policy_models = self.build_models()
        roles, algo = self.build_roles(policy_models, len(train))
        return algo, policy_models, train, None, {"roles": roles}

    def build_roles(self, policy_models, n_prompts: int):
        """Reference, reward, critic (before any training or resume: the reference is the
        initial policy) and the algorithm."""
        from aligner.rewards import build_reward
        from aligner.rollout import GenerationConfig
        from aligner.training.roles import ReferencePolicy, RoleSet, build_trainable_role

        s, t = self.cfg.ppo, self.cfg.trainer
        dtype = torch.bfloat16 if self.cfg.init.dtype == "bf16" else torch.float32
        roles = RoleSet()
        if s.reference == "host":
            reference = ReferencePolicy(policy_models, "host")
        else:
            reference = ReferencePolicy(policy_models, "model", reference_chunks=self.build_models())
            roles.add(reference.role)
        roles.reference = reference
        r = s.reward
        reward = build_reward(r.kind, path=r.path, function=r.function, tokenizer=self.tokenizer(),
                              attributes=list(r.attributes) if r.attributes else None,
                              attribute_weights=list(r.attribute_weights) if r.attribute_weights is not None
                              else None, reward_attribute=r.reward_attribute, micro_batch_size=r.micro_batch_size)
        if getattr(reward, "role", None) is not None:
            roles.add(reward.role)
        rollout_buffer = t.global_batch_size * s.samples_per_prompt
        mbs = s.mini_batch_size or rollout_buffer
        max_steps = t.max_steps if t.max_epochs is None else min(
            t.max_steps if t.max_steps >= 0 else 10**9, t.max_epochs * (n_prompts // t.global_batch_size))
        critic_models, critic_cfg = self.build_critic(reward, dtype)
        critic = build_trainable_role("critic", critic_models, s.critic_optim,
                                      max_steps * s.ppo_epochs * (rollout_buffer // mbs), export_head="value",
                                      model_cfg=critic_cfg)
        roles.add(critic)
        g = s.generation
        gen = GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                               top_p=g.top_p, seed=t.seed if g.seed is None else g.seed,
                               stop_token_ids=[self.tokenizer().eos_id])
        maker = ExperienceMaker(gen, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                reference=reference, critic=critic, max_batch=g.max_batch)
        return roles, PPOAlgorithm(s, maker, rollout_buffer)

    def load_data(self, path):
        data = super().load_data(path)
        if data is not None:
            limit = self.model_config().max_position_embeddings
            for s in data:
                n = int(s["prompt_tokens"].numel())
                if n >= limit:
                    raise ValueError(f"{path}: row {s['index'] + 1} has a prompt of {n} tokens; prompt + response"
                                     f" must fit model.max_position_embeddings = {limit} tokens")
        return data

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

