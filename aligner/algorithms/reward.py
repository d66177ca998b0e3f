"""Reward models: multi-attribute regression and Bradley-Terry (regular / margin / scaled).

The model is the policy backbone with a ``reward`` head of ``N`` outputs read at each
sequence's last token (aligner.models). Formulas: docs/reward_models.md as implemented in
:mod:`aligner.algorithms.losses`.

- ``mode="regression"``: samples ``{"tokens", "labels" [N], "label_mask" [N]}``; loss
  masked MSE ``Σ mask (ŷ - y)² / Σ mask`` over the global batch. Validation also reports
  per-attribute MSE and Pearson correlation.
- ``mode="bt"``: samples are pairs ``{"chosen", "rejected", "strength", ...}``; the scalar
  reward is output ``reward_index`` of the head (the helpfulness output when the head
  comes from a multi-attribute regression model), or ``w · ŷ`` when ``attribute_weights``
  are given; loss ``bt_kind`` (regular ``-logσ(Δ)``, margin ``-logσ(Δ - m)``, scaled
  ``-m logσ(Δ)``) averaged over pairs; ``m`` is the pair's ``margin`` for the margin loss
  (:func:`aligner.algorithms.sft.pair_margin`: else its strength) and its ``strength`` for
  the scaled loss. Validation reports accuracy overall and per ``subset`` (RewardBench
  rows carry one).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from aligner.algorithms.losses import bradley_terry_loss, masked_mse_loss
from aligner.algorithms.sft import TokenAlgorithm, pair_margin
from aligner.training.algorithm import metric

from aligner.data.formats import HELPSTEER2_ATTRIBUTES  # noqa: E402  the one attribute list


class RewardAlgorithm(TokenAlgorithm):
    head = "reward"

    def __init__(
        self,
        pad_id: int,
        *,
        mode: str = "regression",
        attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
        bt_kind: str = "regular",
        reward_index: int = 0,
        attribute_weights: Optional[Sequence[float]] = None,
        packing: bool = False,
        capacity: Optional[int] = None,
    ):
        super().__init__(pad_id, packing, capacity)
        if mode not in ("regression", "bt"):
            raise ValueError(f"rm.mode must be 'regression' or 'bt', got {mode!r}")
        self.mode = mode
        self.name = f"rm-{mode}"
        self.attributes = list(attributes)
        self.num_outputs = len(self.attributes)
        self.rows_per_sample = 1 if mode == "regression" else 2
        self.bt_kind = bt_kind
        if not 0 <= reward_index < self.num_outputs:
            raise ValueError(f"rm.reward_index = {reward_index} outside the head's {self.num_outputs} outputs")
        self.reward_index = reward_index
        if attribute_weights is not None and len(attribute_weights) != self.num_outputs:
            raise ValueError(
                f"rm.attribute_weights has {len(attribute_weights)} entries; the head has {self.num_outputs} outputs"
            )
        self.weights = None if attribute_weights is None else torch.tensor(list(attribute_weights), dtype=torch.float32)

    # ------------------------------------------------------------------ data
    def groups(self, sample):
        if self.mode == "regression":
            tok = sample["tokens"]
            return [(tok, torch.zeros(tok.numel()))]
        return [
            (sample["chosen"], torch.zeros(sample["chosen"].numel())),
            (sample["rejected"], torch.zeros(sample["rejected"].numel())),
        ]

    def attach(self, batch, samples):
        if self.mode == "regression":
            batch["labels"] = torch.stack([torch.as_tensor(s["labels"], dtype=torch.float32) for s in samples])
            batch["label_mask"] = torch.stack([torch.as_tensor(s["label_mask"], dtype=torch.float32) for s in samples])
        else:
            batch["strength"] = torch.tensor([abs(float(s.get("strength", 0.0))) for s in samples])
            batch["margin"] = torch.tensor([pair_margin(s) for s in samples])
            batch["subset"] = [s.get("subset", "") or "" for s in samples]
        return batch

    # ------------------------------------------------------------------ scores
    def scalar(self, values: torch.Tensor) -> torch.Tensor:
        """[n, N] head outputs -> [n] scalar reward."""
        if self.weights is not None:
            return values.float() @ self.weights.to(values.device)
        return values[:, self.reward_index].float()

    def scores(self, batch, values) -> torch.Tensor:
        return values[batch["last_row"], batch["last_col"]].float()  # [n_items, N]

    def loss(self, batch, values):
        scores = self.scores(batch, values)
        if self.mode == "regression":
            labels, mask = batch["labels"], batch["label_mask"]
            loss, _ = masked_mse_loss(scores, labels, mask)
            count = mask.sum()
            total = loss * count
            metrics = {"loss": metric(total, count)}
            with torch.no_grad():
                for j, name in enumerate(self.attributes):
                    m = mask[:, j]
                    x, y = scores[:, j], labels[:, j]
                    metrics[f"mse/{name}"] = metric(((x - y) ** 2 * m).sum(), m.sum())
                    for key, v in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
                        metrics[f"_mom/{name}/{key}"] = metric((v * m).sum(), m.sum())
            return total, count.round().long(), metrics
        r = self.scalar(scores)
        r_c, r_r = r[0::2], r[1::2]  # items alternate chosen, rejected per pair
        n = r_c.numel()
        loss, _ = bradley_terry_loss(r_c, r_r, kind=self.bt_kind, strength=batch["strength"], margin=batch["margin"])
        total = loss * n
        correct = (r_c > r_r).double()
        metrics = {
            "loss": metric(total, n),
            "accuracy": metric(correct.sum(), n),
            "reward_chosen": metric(r_c.sum(), n),
            "reward_rejected": metric(r_r.sum(), n),
        }
        for subset in sorted(set(batch["subset"]) - {""}):
            sel = torch.tensor([s == subset for s in batch["subset"]], device=correct.device)
            metrics[f"accuracy/{subset}"] = metric(correct[sel].sum(), sel.sum())
        return total, torch.tensor(n), metrics

    def finalize_metrics(self, means, sums):
        out = {k: v for k, v in means.items() if not k.startswith("_mom/")}
        for name in self.attributes:
            key = f"_mom/{name}/"
            if key + "x" not in sums:
                continue
            if sums[key + "x"][1] >= 2:
                out[f"pearson/{name}"] = pearson_from_moments(sums, key)
        return out


def pearson_from_moments(sums: Dict[str, tuple], prefix: str) -> float:
    """Pearson of one attribute from the loop's reduced ``[sum, count]`` moment metrics."""
    from aligner.algorithms.regression_metrics import pearson_from_sums

    n = sums[prefix + "x"][1]
    return pearson_from_sums(n, *(sums[prefix + k][0] for k in ("x", "y", "xx", "yy", "xy")))
