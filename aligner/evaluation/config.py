"""The ``monitor`` config section: the gold-vs-proxy over-optimisation monitor (docs/monitor.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from aligner.config import Choice, ConfigError, fail, section_check
from aligner.rewards.config import RewardSpec


class EnsembleMode(Choice):
    """How several proxy reward models combine (docs/monitor.md)."""

    mean = "mean"
    min = "min"
    mean_minus_var = "mean_minus_var"


@dataclass
class MonitorSection:
    """``monitor``: every ``interval`` steps (and before the first and after the last) the
    live policy samples responses for held-out prompts, scored by the proxy and the gold
    reward, with the sampled KL to the initial model (docs/monitor.md)."""

    enabled: bool = False
    interval: int = 10
    prompts: Optional[str] = None  # a held-out prompt file
    num_prompts: int = 64  # the first N prompts of the file
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    seed: int = 0  # the samples' seeds (temperature 1): the same draws at every evaluation
    proxy: List[RewardSpec] = field(default_factory=list)  # empty: the algorithm's own training reward
    ensemble: EnsembleMode = EnsembleMode.mean  # how several proxies combine
    ensemble_lambda: float = 1.0  # mean_minus_var: mean − λ·var
    gold: RewardSpec = field(default_factory=lambda: RewardSpec(kind="world", reward_attribute="helpfulness"))
    # warn once gold is this far below its best (beyond 2 SE of the paired drop) while the proxy rises
    warn_drop: float = 0.1
    keep_best_gold: bool = True  # the policy with the best gold in <out_dir>/best_gold/
    early_stop: bool = False  # stop training when the warning fires
    micro_batch_size: int = 8


@section_check(MonitorSection)
def _check_monitor(m, key: str, cfg) -> None:
    for name in ("interval", "num_prompts", "samples_per_prompt", "max_new_tokens", "micro_batch_size"):
        if m[name] < 1:
            fail(f"{key}.{name}", m[name], "expected >= 1")
    if m.warn_drop < 0:
        fail(f"{key}.warn_drop", m.warn_drop, "expected >= 0")
    if m.enabled and not m.prompts:
        raise ConfigError(f"{key}.enabled = true needs {key}.prompts (a held-out prompt file)",
                          hint=f"set {key}.prompts=FILE, e.g. the world's prompts_heldout.jsonl")


def check_monitor_sources(m) -> None:
    """Before a run starts (its preflight): every proxy and the gold reward source of an
    enabled monitor can be built (:func:`aligner.rewards.check_reward_source`: a model folder
    with a trained reward head, a function that imports, prompts the world's scorer can
    judge); a ScoringError naming ``monitor.proxy[i]`` / ``monitor.gold`` otherwise."""
    # the reward checks read model folders with torch: loaded when a run is checked, not at config checks
    from aligner.rewards.sources import check_reward_source

    if not m.enabled:
        return
    for i, spec in enumerate(list(m.proxy) + [m.gold]):
        name = f"monitor.proxy[{i}]" if i < len(m.proxy) else "monitor.gold"
        check_reward_source(name, str(spec.kind), path=spec.path, function=spec.function,
                            attribute_weights=spec.attribute_weights, reward_attribute=spec.reward_attribute,
                            prompts=m.prompts)
