"""Supervised fine-tuning (docs/sft.md): next-token NLL on target (assistant) tokens,
``−Σ mask · log p(y_t | y_<t) / Σ mask`` over the global batch (a token-level mean,
independent of layout and packing). ``aligner train sft``; samples ``{"tokens", "loss_mask"}``.
"""
from __future__ import annotations

from dataclasses import dataclass

from aligner.algorithms.base import RunConfig, TokenAlgorithm, Trainer, register_trainer
from aligner.training.batching import shifted_logprobs
from aligner.training.metrics import metric


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning: the shared sections only (docs/sft.md)."""

    algorithm: str = "sft"


class SFTAlgorithm(TokenAlgorithm):
    name = "sft"

    def groups(self, sample):
        return [(sample["tokens"], sample["loss_mask"])]

    def loss(self, batch, logits):
        lp = shifted_logprobs(logits, batch["tokens"])
        mask = batch["loss_mask"]
        nll = -(lp * mask).sum()
        count = mask.sum()
        return nll, count.round().long(), {"loss": metric(nll, count)}


@register_trainer("sft")
class SFTTrainer(Trainer):
    """``aligner train sft``."""

    schema = SFTConfig
    data_kind = "sft"

    def algorithm(self):
        d = self.cfg.data
        return SFTAlgorithm(self.tokenizer().pad_id, packing=d.packing, capacity=d.max_length)
