"""The gold-vs-proxy monitor: reward over-optimisation made visible while training
(docs/monitor.md).

:class:`GoldProxyMonitor` is a :class:`aligner.training.algorithm.StepHook`: the trainers
attach it when ``monitor.enabled`` (any algorithm on the shared loop: PPO, the REINFORCE
family, the DPO family, SteerLM 2.0); the loop never imports it. Before the first step,
every ``monitor.interval`` steps and after the last step it:

1. samples N responses for each of P fixed held-out prompts from the live policy with the
   rollout engine (temperature 1, seeds a function of (monitor.seed, prompt, sample): the
   same draws at every evaluation, so differences are the policy's);
2. scores them with the proxy (the training reward, or the configured reward models; an
   ensemble combined by mean / min / mean − λ·var, its variance logged) and the gold reward
   (the world's scorer, a ``module:function`` or another reward model);
3. estimates ``KL(π || π_init)`` by the mean over samples of
   ``Σ_t log π(y_t) − log π_init(y_t)`` (policy and initial-model log-probs on the training
   forward path; the initial model through the online core's reference role), and
   ``d = sqrt(max(KL, 0))``;
4. logs ``proxy``, ``gold`` (and their gains over the first evaluation), ``kl``, ``d``,
   ``response_length``, ``proxy_length_corr``, ``ensemble_var``, the least-squares fits of
   both of Gao et al.'s forms to the gold gains so far
   (:mod:`aligner.evaluation.overoptimization`) and ``overoptimized`` as metrics.jsonl rows of
   split ``monitor`` (TensorBoard / W&B: ``monitor/<name>``);
5. detects over-optimisation: gold ``warn_drop`` or more below its best, by more than two
   standard errors of the paired per-sample drop (noise does not explain it), while the
   proxy is above its value at the gold's best — a warning in the log, and with
   ``monitor.early_stop`` the end of training;
6. keeps the policy with the best gold so far as an HF folder in ``<out_dir>/best_gold/``
   (with ``monitor.json``: step, gold, proxy, d), apart from keep-last-k checkpoints. It
   is written under a temporary name and swapped in by renames, so ``best_gold/`` is always
   a complete export (one of the last two bests if a crash hits the swap).

Data parallelism: each data-parallel rank samples a contiguous share of the prompts; the
per-sample values are gathered, so every rank computes the same metrics.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.data.datasets import resolve_template
from aligner.data.loading import load_dataset
from aligner.evaluation.overoptimization import combine_ensemble, fit_form, gold_drop, is_overoptimized, mean_and_se, pearson
from aligner.evaluation.sampling import build_reward_source, response_logps, sample_responses, score
from aligner.rollout import RolloutEngine
from aligner.runtime import get_logger, is_rank0
from aligner.training.algorithm import StepContext, StepHook
from aligner.training.roles import ReferencePolicy

log = get_logger(__name__)


class GoldProxyMonitor(StepHook):
    """The monitor (module docstring). section: a ``monitor`` config section (dict-like:
    aligner.evaluation.config.MonitorSection); tokenizer: the policy's; template: the
    data-layer template the policy's prompts are rendered with; model_cfg: the policy's
    architecture."""

    name = "monitor"

    def __init__(self, section, tokenizer, template: str, model_cfg):
        self.s = section
        self.tokenizer = tokenizer
        self.template = template
        self.model_cfg = model_cfg
        self.history: List[Dict[str, float]] = []
        self.best: Optional[Dict[str, float]] = None
        self.best_samples: Dict[str, List[float]] = {}  # per-sample gold and proxy of the best evaluation
        self.warned_step: Optional[int] = None
        self.engine = None

    # ---------------------------------------------------------------- setup
    def setup(self, loop) -> None:
        """Prompts, reward sources and the initial model (the loop's models hold the initial
        weights now: before any resume)."""
        s = self.s
        prompts = load_dataset(s.prompts, kind="prompts", tokenizer=self.tokenizer, template=self.template,
                               max_length=self.model_cfg.max_position_embeddings, overlong="error")
        self.prompts = prompts[: s.num_prompts]
        for i, p in enumerate(self.prompts):
            if int(p["prompt_tokens"].numel()) + s.max_new_tokens > self.model_cfg.max_position_embeddings:
                raise ValueError(f"monitor.prompts = {s.prompts}: row {i + 1} has {int(p['prompt_tokens'].numel())}"
                                 f" prompt tokens; with monitor.max_new_tokens = {s.max_new_tokens} it does not fit"
                                 f" the model's {self.model_cfg.max_position_embeddings} positions")
        mbs = s.micro_batch_size
        if len(s.proxy):
            self.proxies = [build_reward_source(spec, self.tokenizer, mbs, where=f"monitor.proxy[{i}]")
                            for i, spec in enumerate(s.proxy)]
        else:
            own = loop.algorithm.reward_source
            if own is None:
                raise ValueError(f"monitor.proxy is empty and the {loop.algorithm.name} algorithm has no training"
                                 " reward to use as proxy: set monitor.proxy (e.g. [{kind: model, path: RM}])")
            self.proxies = [own]
        self.gold = build_reward_source(s.gold, self.tokenizer, mbs, where="monitor.gold")
        reference = loop.roles.reference
        self.reference = reference if reference is not None else ReferencePolicy(loop.policy.chunks, "host")
        self.out = Path(loop.out_dir) / "best_gold"
        if is_rank0():
            recover_best_gold(self.out)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "best_samples": self.best_samples,
                "warned_step": self.warned_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        self.best_samples = dict(state.get("best_samples") or {})
        self.warned_step = state.get("warned_step")

    # ---------------------------------------------------------------- measurement
    def _local_prompts(self):
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        share = math.ceil(len(self.prompts) / dp)
        return rank * share, self.prompts[rank * share:(rank + 1) * share]

    def measure(self, loop) -> Dict[str, List[float]]:
        """Per-sample values of the policy now (gathered over data-parallel ranks): proxy
        (combined), each proxy member, gold, log-ratio to the initial model, length."""
        s = self.s
        policy = loop.policy
        if self.engine is None:
            self.engine = RolloutEngine(policy.modules, self.model_cfg, tokenizer=self.tokenizer, max_batch=64)
        first, local = self._local_prompts()
        values: Dict[str, List[float]] = {}
        if local:
            # seeds by global prompt position: the same draws at any data-parallel size
            samples = sample_responses(self.engine, local, s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                                       seed=s.seed, stop_token_ids=[self.tokenizer.eos_id],
                                       first_index=first)
            members = torch.stack([score(p, samples, loop.step) for p in self.proxies])
            proxy, var = combine_ensemble(members, str(s.ensemble), s.ensemble_lambda)
            gold = score(self.gold, samples, loop.step)
            mbs = loop.cfg.micro_batch_size
            logp = response_logps(StepContext.run_schedule, policy.chunks, samples, mbs, StepContext.from_last_stage)
            with self.reference.active() as chunks:
                ref = response_logps(StepContext.run_schedule, chunks, samples, mbs, StepContext.from_last_stage)
            values = {"proxy": proxy.tolist(), "ensemble_var": var.tolist(), "gold": gold.tolist(),
                      "log_ratio": (logp - ref).tolist(), "length": samples.response_lengths.double().tolist()}
            for k in range(members.shape[0]):
                values[f"proxy_{k}"] = members[k].tolist()
        return _gather_dp(values)

    def after_step(self, loop) -> Optional[Dict[str, float]]:
        s = self.s
        step = loop.step
        if not (step == 0 or step % s.interval == 0 or step == loop.max_steps or loop.stop_reason is not None):
            return None
        t0 = time.perf_counter()
        v = self.measure(loop)
        t = {k: torch.tensor(x, dtype=torch.float64) for k, x in v.items()}
        proxy, proxy_se = mean_and_se(t["proxy"])
        gold, gold_se = mean_and_se(t["gold"])
        kl, kl_se = mean_and_se(t["log_ratio"])
        d = math.sqrt(max(kl, 0.0))
        m: Dict[str, float] = {
            "proxy": proxy, "proxy_se": proxy_se, "gold": gold, "gold_se": gold_se, "kl": kl, "kl_se": kl_se,
            "d": d, "response_length": float(t["length"].mean()),
            "proxy_length_corr": pearson(t["proxy"], t["length"]),
            "ensemble_var": float(t["ensemble_var"].mean()), "samples": float(t["gold"].numel()),
        }
        if len(self.proxies) > 1:
            for k in range(len(self.proxies)):
                m[f"proxy_{k}"] = float(t[f"proxy_{k}"].mean())
        base = self.history[0] if self.history else {"proxy": proxy, "gold": gold}
        m["proxy_gain"], m["gold_gain"] = proxy - base["proxy"], gold - base["gold"]
        self.history.append({"step": step, "proxy": proxy, "gold": gold, "kl": kl, "d": d})
        for form in ("rl", "bon"):
            fit = fit_form([h["d"] for h in self.history], [h["gold"] - self.history[0]["gold"] for h in self.history],
                           form)
            if fit is not None and fit.points >= 3:  # two points fit exactly: no information yet
                m[f"fit_{form}/alpha"], m[f"fit_{form}/beta"], m[f"fit_{form}/rmse"] = fit.alpha, fit.beta, fit.rmse
                if fit.d_peak is not None:
                    m[f"fit_{form}/d_peak"] = fit.d_peak
        if self.best is None or gold > self.best["gold"]:
            self.best = {"step": step, "gold": gold, "proxy": proxy, "d": d}
            self.best_samples = {"gold": list(v["gold"]), "proxy": list(v["proxy"])}
            if s.keep_best_gold:
                self.save_best(loop)
        m["best_gold"], m["best_gold_step"] = self.best["gold"], float(self.best["step"])
        # the same prompts and seeds at every evaluation: the drop is a paired difference
        drop, drop_se = gold_drop(self.best_samples.get("gold", [self.best["gold"]]), v["gold"])
        m["gold_drop"], m["gold_drop_se"] = drop, drop_se
        overoptimized = is_overoptimized(drop, drop_se, proxy - self.best["proxy"], s.warn_drop)
        m["overoptimized"] = float(overoptimized)
        if overoptimized:
            if self.warned_step is None:
                self.warned_step = step
            log.warning(f"monitor: reward over-optimisation at step {step}: gold {gold:.4f} is {drop:.4f}"
                        f" ± {drop_se:.4f} below its best {self.best['gold']:.4f} (step {self.best['step']}) while the proxy rose from"
                        f" {self.best['proxy']:.4f} to {proxy:.4f} (d = {d:.3f}); the best-gold policy is in"
                        f" {self.out}")
            if s.early_stop and loop.stop_reason is None:
                loop.request_stop(f"monitor: gold fell {drop:.4f} below its best while the proxy rose")
        m["seconds"] = time.perf_counter() - t0
        return m

    # ---------------------------------------------------------------- best gold
    def save_best(self, loop) -> None:
        """Export the policy to ``best_gold/`` atomically (module docstring, point 6)."""
        tmp = self.out.with_name(f"best_gold.tmp-{loop.step}")
        if is_rank0() and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        loop.export(tmp, policy_only=True)
        if is_rank0():
            (tmp / "monitor.json").write_text(json.dumps(self.best, indent=2))
            swap_in(tmp, self.out)
        _barrier()


def swap_in(new: Path, final: Path) -> None:
    """Replace the folder ``final`` by the complete folder ``new`` with renames only: the old
    one moves to ``<final>.old`` first, the new one takes its name, then the old is deleted.
    :func:`recover_best_gold` undoes a crash between the two renames."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def recover_best_gold(final: Path) -> None:
    """After a crash: bring back ``<final>.old`` when ``final`` is missing; drop temporary folders."""
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():
        os.replace(old, final)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_dp(values: Dict[str, List[float]]) -> Dict[str, List[float]]:
    """Concatenate every data-parallel rank's per-sample lists (in rank order)."""
    if ps.get_data_parallel_world_size() == 1:
        return values
    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, values, group=ps.get_data_parallel_group())
    keys = sorted({k for p in parts for k in p})
    return {k: [x for p in parts for x in p.get(k, [])] for k in keys}


def build_monitor(cfg, tokenizer, model_cfg) -> Optional[GoldProxyMonitor]:
    """The monitor of a composed run config (``cfg.monitor``), or None when it is off."""
    section = cfg.monitor
    if not section.enabled:
        return None
    return GoldProxyMonitor(section, tokenizer, resolve_template(tokenizer, str(cfg.data.template)), model_cfg)


__all__ = ["GoldProxyMonitor", "build_monitor", "recover_best_gold", "swap_in"]
