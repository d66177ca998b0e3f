"""The SteerLM 2.0 objective on the shared loop (docs/steerlm.md, "SteerLM 2.0 objective").

:class:`SteerLM2Algorithm` trains on groups of scored responses (a pre-scored file: the
loop runs its step); :class:`IterativeSteerLM2Algorithm` owns its step and, at the first
step of each iteration, samples and scores the iteration's groups from the current model
(:class:`aligner.algorithms.steerlm.sampler.SteerLM2Sampler`), writes them to the run
folder and reads them back on resume. The loss is
:func:`aligner.algorithms.losses.steerlm.steerlm2_loss` over the global batch.
"""
from __future__ import annotations

import torch

from aligner.algorithms.base import TokenAlgorithm
from aligner.algorithms.iterative import IterativeAlgorithm
from aligner.algorithms.losses.steerlm import steerlm2_loss
from aligner.training.batching import per_item_sum, shifted_logprobs
from aligner.training.metrics import metric


class SteerLM2Algorithm(TokenAlgorithm):
    """The SteerLM 2.0 objective over groups of scored responses: a sample is one group
    ``{"responses": [(tokens, loss_mask)], "log_p_attr", "log_p_sft", "log_q_prime": [n]}``
    (all of a group's responses share a micro-batch, so the within-group softmaxes are
    exact under every layout)."""

    name = "steerlm2"

    # ---------------------------------------------------------------- batches and loss
    def groups(self, sample):
        return list(sample["responses"])

    def attach(self, batch, samples):
        sizes = torch.tensor([len(s["responses"]) for s in samples])
        batch["group_ids"] = torch.repeat_interleave(torch.arange(len(samples)), sizes)
        for key in ("log_p_attr", "log_p_sft", "log_q_prime"):
            batch[key] = torch.cat([s[key] for s in samples])
        return batch

    def loss(self, batch, logits):
        if batch.get("filler"):  # a zero-weight micro-batch (interleaved pipelining)
            return logits.reshape(-1)[:1].sum() * 0.0, 0, {}
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        policy_logps = per_item_sum(lp * mask, batch)
        num_tokens = per_item_sum(mask, batch)
        dev = policy_logps.device
        # Σ n_g (w' − b') NLL over the response tokens: megatron-core divides by the step's global
        # token count, which makes it (1/G) Σ (w' − b') NLL / T̄ (steerlm2_loss)
        total, count, sums = steerlm2_loss(policy_logps, num_tokens, batch["log_p_attr"].to(dev),
                                           batch["log_p_sft"].to(dev), batch["log_q_prime"].to(dev),
                                           batch["group_ids"].to(dev))
        g = sums["groups"]
        metrics = {
            "loss": metric(total, count),
            "kl_w_b": metric(sums["kl_w_b"], g),
            "weight_max": metric(sums["weight_max"], g),
            "response_tokens": metric(count, num_tokens.numel()),
        }
        return total, count.round().long(), metrics


class IterativeSteerLM2Algorithm(IterativeAlgorithm, SteerLM2Algorithm):
    """SteerLM 2.0 with sampling inside the run (:class:`aligner.algorithms.iterative.IterativeAlgorithm`):
    ``steps_per_iteration`` steps per iteration, the iteration's groups sampled and scored at
    its first step (or read back from ``samples_dir`` on resume); the loop's prompt groups
    stand for their scored groups."""

    title = "SteerLM 2.0"
