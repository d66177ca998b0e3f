"""SteerLM 2.0 on the shared loop (docs/steerlm.md; Wang et al., HelpSteer2 / SteerLM 2.0,
arXiv 2406.08673).

A sample is one prompt with its attribute string ``a`` and a group of ``n`` responses
``y_i`` sampled from the SteerLM model Q', each carrying three precomputed sequence
log-probs: ``log P(a|x,y_i)`` (the regression reward model through the Beta model,
:func:`aligner.algorithms.losses.steerlm.attribute_log_likelihood`), ``log P(y_i|x)`` (the
SFT model) and ``log Q'(y_i|a,x)`` (Q'). The model being trained, Q_θ, starts from Q'.

Per group, with ``w'_i = softmax(log P(a|x,y_i) + log P(y_i|x) − log Q'(y_i|a,x))`` and the
baseline ``b'_i = softmax(log Q_θ(y_i|a,x) − log Q'(y_i|a,x))`` recomputed each step
without gradient, the loss is

    ``L = (1/G) Σ_groups Σ_i (w'_i − b'_i) · (−log Q_θ(y_i|a,x)) / T̄``

with ``T̄`` the mean number of response tokens over the GLOBAL batch and ``G`` the number
of groups in it (the loop divides the summed loss by the summed group count over all
micro-batches and data-parallel ranks; validation passes use each micro-batch's own mean
response length for ``T̄``). All responses of a group share a micro-batch (they
are one sample), so the within-group softmaxes are exact under every layout. Logged:
``kl_w_b`` = ``Σ_i w'_i log(w'_i / b'_i)`` per group, ``weight_max``.

Responses are rendered with the SteerLM template (the attribute string after the
assistant header, ``<extra_id_2>{a}``), loss on response tokens; the sequence log-prob of a
response is the sum over its target tokens.

Data: rows in the predecessor's pre-scored format (``system``, ``prompt_turns``,
``label``, ``responses[]`` each with ``value``, ``log(P(a|x,y))``, ``log(P(y|x))``,
``log(Q(y|a,x))``) train unchanged (:func:`load_steerlm2`).
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence

import torch

from aligner.algorithms.losses.steerlm import steerlm2_weights
from aligner.algorithms.sft import TokenAlgorithm
from aligner.training.algorithm import metric
from aligner.training.batching import per_item_sum, shifted_logprobs


def load_steerlm2(path, tokenizer, max_length: int = 4096, overlong: str = "truncate_left",
                  skip_invalid: bool = False) -> List[dict]:
    """Pre-scored SteerLM 2.0 rows -> samples ``{"responses": [(tokens, loss_mask)],
    "log_p_attr", "log_p_sft", "log_q_prime": [n] float64, "line"}``.

    A response that does not fit ``max_length`` after the over-length policy drops its whole
    group (the group's softmaxes need every member); drops are counted and printed.
    """
    from aligner.data.datasets import _fit, finish_loading, read_jsonl, render_extra_id
    from aligner.data.formats import parse_row

    counts: Counter = Counter()
    out: List[dict] = []
    for lineno, row, fmt in read_jsonl(path, "steerlm2", ("steerlm2",), skip_invalid, counts):
        rec = parse_row(row, fmt)
        items = []
        for resp in rec.responses:
            tokens, mask = render_extra_id(tokenizer, rec.prompt, resp.value, end="eos", label=rec.label)
            fitted = _fit(tokens, mask, max_length, overlong, counts)
            if fitted is None:
                break
            items.append((torch.tensor(fitted[0], dtype=torch.long), torch.tensor(fitted[1], dtype=torch.float32)))
        if len(items) < len(rec.responses):
            counts["dropped_group_overlong"] += 1
            continue
        out.append({
            "responses": items,
            "log_p_attr": torch.tensor([r.log_p_attributes for r in rec.responses], dtype=torch.float64),
            "log_p_sft": torch.tensor([r.log_p_sft for r in rec.responses], dtype=torch.float64),
            "log_q_prime": torch.tensor([r.log_q for r in rec.responses], dtype=torch.float64),
            "line": lineno,
        })
    return finish_loading(path, "steerlm2", out, counts, unit="SteerLM 2.0 groups")


class SteerLM2Algorithm(TokenAlgorithm):
    """The SteerLM 2.0 objective over groups of scored responses (module docstring)."""

    name = "steerlm2"

    def __init__(self, pad_id: int, *, packing: bool = False, capacity: Optional[int] = None):
        super().__init__(pad_id, packing, capacity)
        self._avg_tokens: Optional[float] = None

    def groups(self, sample):
        return list(sample["responses"])

    def attach(self, batch, samples):
        sizes = [len(s["responses"]) for s in samples]
        batch["group_ids"] = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(sizes))
        for key in ("log_p_attr", "log_p_sft", "log_q_prime"):
            batch[key] = torch.cat([s[key] for s in samples])
        batch["num_groups"] = len(samples)
        return batch

    @staticmethod
    def response_tokens(samples: Sequence[dict]) -> List[float]:
        """Target tokens of every response (what ``T̄`` averages)."""
        return [float(m[1:].sum()) for s in samples for _, m in s["responses"]]

    def before_step(self, trainer, local_samples, seq_length):
        # T̄ over the GLOBAL batch: the step's samples are known on every rank
        counts = self.response_tokens(trainer.global_batch(trainer.step))
        self._avg_tokens = sum(counts) / len(counts)

    def loss(self, batch, logits):
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        policy_logps = per_item_sum(lp * mask, batch)
        num_tokens = per_item_sum(mask, batch)
        ids = batch["group_ids"].to(policy_logps.device)
        g = int(batch["num_groups"])
        w, b = steerlm2_weights(batch["log_p_attr"].to(policy_logps.device), batch["log_p_sft"].to(policy_logps.device),
                                batch["log_q_prime"].to(policy_logps.device), policy_logps, ids)
        # training: the global batch's T̄ (set in before_step); forward-only passes (validation)
        # have no step: the mean over this micro-batch's responses
        training = torch.is_grad_enabled() and self._avg_tokens is not None
        t_bar = self._avg_tokens if training else float(num_tokens.double().mean().clamp(min=1))
        total = ((w - b).to(policy_logps.dtype) * -policy_logps).sum() / t_bar
        with torch.no_grad():
            wd, bd = w.double(), b.double()
            terms = torch.where(wd > 0, wd * (wd.log() - bd.log()), torch.zeros_like(wd))
            kl = torch.zeros(g, dtype=torch.float64, device=wd.device).index_add(0, ids, terms)
            w_max = torch.zeros(g, dtype=torch.float64, device=wd.device).scatter_reduce(
                0, ids, wd, reduce="amax", include_self=False)
        metrics = {
            "loss": metric(total, g),
            "kl_w_b": metric(kl.sum(), g),
            "weight_max": metric(w_max.sum(), g),
            "response_tokens": metric(num_tokens.sum(), num_tokens.numel()),
        }
        return total, torch.tensor(g), metrics
