"""Reward models (docs/reward_models.md): multi-attribute regression and Bradley-Terry
(regular / margin / scaled), ``aligner train rm_regression`` / ``rm_bt``.

The model is the policy backbone with a ``reward`` head of ``N`` outputs read at each
sequence's last token. ``rm.mode=regression``: HelpSteer2 rows, masked MSE over the global
batch, validation per-attribute MSE and Pearson. ``rm.mode=bt``: pairs, the scalar reward
the head output ``reward_attribute`` (or ``w · ŷ`` with ``attribute_weights``), loss
``bt_kind`` averaged over pairs; validation accuracy overall and per ``subset``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from aligner.algorithms.base import RunConfig, TokenAlgorithm, Trainer, init_from_hf, pair_margin, register_trainer
from aligner.algorithms.losses.reward import BT_KINDS, bradley_terry_loss, masked_mse_loss
from aligner.config import Choice, ConfigError
from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.evaluation.regression_metrics import pearson_from_sums
from aligner.rewards.config import check_attribute_weights
from aligner.training.config import InitSection, Template
from aligner.training.metrics import metric


# ------------------------------------------------------------------------------ config
class RMMode(Choice):
    regression = "regression"  # HelpSteer2 multi-attribute rows, masked MSE (extra_id template)
    bt = "bt"  # Bradley-Terry on preference pairs


BTKind = Choice("BTKind", [(name, name) for name in BT_KINDS], module=__name__)


@dataclass
class RMSection:
    """``rm``: the reward-model objective (docs/reward_models.md)."""

    mode: RMMode = RMMode.regression
    attributes: List[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))  # the head's outputs
    bt_kind: BTKind = BTKind.regular  # bt: regular | margin | scaled
    reward_attribute: str = "helpfulness"  # bt: the head output the loss compares
    # one weight per attribute, r = w · ŷ: in bt mode the reward the loss compares (instead of
    # reward_attribute); in both modes recorded with the HF export as the model's reward
    attribute_weights: Optional[List[float]] = None


@dataclass
class RMConfig(RunConfig):
    """Reward model, from an HF model (``init.hf`` required)."""

    algorithm: str = "rm"
    init: InitSection = field(default_factory=init_from_hf)
    rm: RMSection = field(default_factory=RMSection)


def check_rm_section(rm, data, key: str = "rm") -> None:
    """The ``rm`` section with the data template (ConfigError naming the key)."""
    check_attribute_weights(key, list(rm.attributes), rm.attribute_weights, rm.reward_attribute, distinct=True)
    if rm.mode == RMMode.regression:
        if data.template not in (Template.auto, Template.extra_id):
            raise ConfigError(f"data.template = {str(data.template)!r} does not apply to {key}.mode = regression:"
                              " HelpSteer2 rows are rendered with the extra_id template",
                              hint="set data.template=extra_id (or auto)")
        if rm.bt_kind != BTKind.regular:
            raise ConfigError(f"{key}.bt_kind = {str(rm.bt_kind)!r} has no effect in {key}.mode = regression"
                              f" (it selects the Bradley-Terry loss of {key}.mode = bt)",
                              hint=f"remove the override, or set {key}.mode=bt")


# ------------------------------------------------------------------------------ algorithm
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

    def loss_count(self, batch):
        if self.mode == "regression":
            return int(batch["label_mask"].sum().round())  # labelled attributes
        return (len(batch["last_row"]) + 1) // 2  # pairs

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
    n = sums[prefix + "x"][1]
    return pearson_from_sums(n, *(sums[prefix + k][0] for k in ("x", "y", "xx", "yy", "xy")))


# ------------------------------------------------------------------------------ trainer
@register_trainer("rm")
class RewardModelTrainer(Trainer):
    """``aligner train rm_regression`` / ``rm_bt``."""

    schema = RMConfig

    @classmethod
    def check(cls, cfg):
        check_rm_section(cfg.rm, cfg.data)

    @property
    def data_kind(self):
        return "regression" if self.cfg.rm.mode == RMMode.regression else "pairs"

    def data_options(self):
        rm = self.cfg.rm
        return {"attributes": list(rm.attributes)} if rm.mode == RMMode.regression else {"reward_model": True}

    def export_metadata(self, algo) -> dict:
        """Also the head's output names and, where training defined one, the scalar reward's
        weights: ``rm.attribute_weights``, or for BT the ``rm.reward_attribute`` output it trained."""
        meta = super().export_metadata(algo)
        rm = self.cfg.rm
        attributes = list(rm.attributes)
        meta["labels"] = attributes
        if rm.attribute_weights is not None:
            meta["attribute_weights"] = dict(zip(attributes, (float(w) for w in rm.attribute_weights)))
        elif rm.mode == RMMode.bt:
            meta["attribute_weights"] = {a: float(a == rm.reward_attribute) for a in attributes}
        return meta

    def algorithm(self):
        rm, d = self.cfg.rm, self.cfg.data
        attributes = list(rm.attributes)
        return RewardAlgorithm(
            self.tokenizer().pad_id,
            mode=str(rm.mode),
            attributes=attributes,
            bt_kind=str(rm.bt_kind),
            reward_index=attributes.index(rm.reward_attribute),
            attribute_weights=list(rm.attribute_weights) if rm.attribute_weights is not None else None,
            packing=d.packing,
            capacity=d.max_length,
        )
