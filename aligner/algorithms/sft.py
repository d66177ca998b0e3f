"""Supervised fine-tuning: next-token NLL on target (assistant) tokens.

Loss: ``-Σ mask · log p(y_t | y_<t) / Σ mask`` over the global batch (token-level mean,
independent of layout and packing). Samples: ``{"tokens", "loss_mask"}`` (data layer).
"""
from __future__ import annotations

from typing import List, Sequence

from aligner.data.datasets import token_counts
from aligner.training.algorithm import Algorithm, metric
from aligner.training.batching import packed_microbatches, padded_microbatch, shifted_logprobs


def pair_margin(sample: dict) -> float:
    """The margin ``m`` of a pair for the margin losses (margin BT, margin DPO): the row's
    ``margin`` when it has one, else ``|strength|`` (HelpSteer2-Preference: both are
    |preference_strength|; docs/data_formats.md)."""
    margin = sample.get("margin")
    return float(margin) if margin is not None else abs(float(sample.get("strength", 0.0)))


class TokenAlgorithm(Algorithm):
    """Shared micro-batching for algorithms whose units are sequences or groups of them."""

    def __init__(self, pad_id: int, packing: bool = False, capacity: int | None = None):
        if packing and not capacity:
            raise ValueError("packing needs a bin capacity (data.max_length)")
        self.pad_id = pad_id
        self.packing = packing
        self.capacity = capacity

    def groups(self, sample: dict) -> List[tuple]:
        """The (tokens, loss_mask) items of one sample, kept together in one micro-batch."""
        raise NotImplementedError

    def attach(self, batch: dict, samples: Sequence[dict]) -> dict:
        """Add per-sample tensors (labels, strengths, ...) for the samples of a micro-batch, in order."""
        return batch

    def sample_tokens(self, sample: dict) -> int:
        """Every token the sample puts through the model (both responses of a pair)."""
        return sum(t.numel() for t, _ in self.groups(sample))

    def sample_length(self, sample: dict) -> int:
        """The sample's longest sequence (a padded row holds one sequence)."""
        return max(t.numel() for t, _ in self.groups(sample))

    def setup(self, trainer) -> None:
        """Before training: with packing, every sample (a pair: chosen + rejected) must fit one bin."""
        if self.packing:
            self.check_fits_bin(trainer.train_data, "training")
            self.check_fits_bin(trainer.val_data or [], "validation")

    def check_fits_bin(self, samples: Sequence[dict], split: str) -> None:
        """Refuse samples whose groups exceed ``capacity`` tokens, naming the max_length they need.

        A group (e.g. a pair) always shares one packing bin; the data layer sizes pairs
        as pairs (``load_dataset(..., packing=True)``), so this fires on data built by
        hand or loaded without that option.
        """
        lengths = token_counts(samples).tolist()  # prepared data: from the mapped index files
        over = [i for i, n in enumerate(lengths) if n > self.capacity]
        if not over:
            return
        first = samples[over[0]]
        where = f"line {first['line']}" if "line" in first else f"sample {over[0]}"
        sizes = " + ".join(str(t.numel()) for t, _ in self.groups(first))
        raise ValueError(
            f"data.packing: {len(over)} {split} sample(s) do not fit a packing bin of data.max_length ="
            f" {self.capacity} tokens; the first ({where}) has {lengths[over[0]]} tokens ({sizes}), and the"
            f" longest needs data.max_length >= {max(lengths)} (a pair's chosen and rejected share one bin)"
        )

    def microbatches(self, samples, micro_batch_size, seq_length):
        if not samples:
            return []
        if self.packing:
            groups = [self.groups(s) for s in samples]
            micro, members = packed_microbatches(groups, self.capacity, micro_batch_size, self.pad_id)
            return [self.attach(b, [samples[i] for i in held]) for b, held in zip(micro, members)]
        out = []
        for start in range(0, len(samples), micro_batch_size):
            chunk = samples[start : start + micro_batch_size]
            items = [item for s in chunk for item in self.groups(s)]
            out.append(self.attach(padded_microbatch(items, seq_length, self.pad_id), chunk))
        return out

    def forward(self, model, batch):
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])


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
