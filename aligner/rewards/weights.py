"""How a reward head's attribute outputs make one scalar reward, ``r = w · ŷ``
(docs/reward_models.md): the published weight sets and :func:`combine_attributes`.
Shared by the reward sources, ``aligner rm`` / ``aligner eval`` and the critic's
initialisation."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from aligner.data.formats import HELPSTEER2_ATTRIBUTES  # noqa: F401  the one attribute list, importable from here

# r = w · ŷ (docs/reward_models.md). RewardBench weights of the HelpSteer2 regression RMs:
REWARDBENCH_WEIGHTS_70B = {
    "helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55, "verbosity": -0.4,
}
REWARDBENCH_WEIGHTS_340B = {
    "helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33,
}
# Reward for PPO / iterative DPO, standardised afterwards (aligner.algorithms.losses.RunningMoments):
GOODNESS_WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45}


def combine_attributes(
    values: torch.Tensor,
    weights: Union[Sequence[float], torch.Tensor, Mapping[str, float]],
    attributes: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Scalar reward from attribute predictions: ``r = w · ŷ`` (docs/reward_models.md).

    values: [b, N]. weights: N numbers, or a name -> weight mapping together with
    ``attributes`` (the head's N output names in order); attributes missing from the
    mapping get weight 0, a mapping key that is not an attribute is an error.
    Returns [b].
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [b, N], got shape {tuple(values.shape)}")
    n = values.shape[1]
    if isinstance(weights, Mapping):
        if attributes is None:
            raise ValueError("weights given by name need `attributes` (the head's output names in order)")
        if len(attributes) != n:
            raise ValueError(f"{len(attributes)} attribute names for a head of {n} outputs")
        unknown = sorted(set(weights) - set(attributes))
        if unknown:
            raise ValueError(f"attribute weights name {unknown}, not among the head's attributes {list(attributes)}")
        w = torch.tensor([float(weights.get(a, 0.0)) for a in attributes])
    else:
        w = torch.as_tensor(weights).flatten()
        if w.numel() != n:
            raise ValueError(f"{w.numel()} attribute weights for a head of {n} outputs")
    return values @ w.to(device=values.device, dtype=values.dtype)
