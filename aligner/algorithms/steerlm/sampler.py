"""SteerLM 2.0's sampling (docs/steerlm.md): each (prompt, attribute string) group sampled
``n`` times from the current model with the rollout engine, scored by the regression
reward model (``log P(a|x,y)``, the Beta model), the SFT model (``log P(y|x)``) and the
model itself (``log Q'(y|a,x)``); the rows of the iteration's samples file (itself a
pre-scored ``steerlm2`` file).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from aligner.algorithms.iterative import check_row_indices, gather_rows
from aligner.algorithms.losses.steerlm import attribute_log_likelihood
from aligner.data.formats import parse_attribute_label
from aligner.parallel import padded_length
from aligner.training.algorithm import StepContext
from aligner.training.forward import collect_token_outputs, policy_logps


class SteerLM2Sampler:
    """Samples and scores one iteration's groups (docs/steerlm.md, "sampling").

    prompts: the (prompt, attribute string) groups, each ``{"index", "prompt_tokens"
    (rendered with the attribute turn), "sft_prompt_tokens" (without it), "prompt",
    "meta", "conversation", "label"}``. maker: an
    :class:`aligner.algorithms.online.ExperienceMaker` with ``samples_per_prompt = n``
    and the regression reward model as its reward source (attribute scores per response).
    sft: a :class:`aligner.training.roles.ReferencePolicy` holding the SFT model.
    """

    def __init__(self, prompts: Sequence[dict], maker, sft, attributes: Sequence[str], *, epochs: int,
                 concentration: float = 24.0, max_value: float = 4.0):
        self.prompts = list(prompts)
        self.by_index = {int(p["index"]): p for p in self.prompts}
        self.maker = maker
        self.sft = sft
        self.attributes = list(attributes)
        self.epochs = epochs
        self.concentration = concentration
        self.max_value = max_value
        self.targets = {}
        for p in self.prompts:
            levels = parse_attribute_label(p["label"])
            unknown = sorted(set(levels) - set(self.attributes))
            if unknown:
                raise ValueError(f"prompt group {p['index']} (label {p['label']!r}): the attributes {unknown} are not"
                                 f" outputs of the reward model ({self.attributes})")
            self.targets[int(p["index"])] = (
                [float(levels.get(a, 0)) for a in self.attributes], [float(a in levels) for a in self.attributes])

    @property
    def n(self) -> int:
        return self.maker.samples_per_prompt

    def sample(self, context: StepContext, iteration: int) -> List[dict]:
        """Every group sampled ``n`` times on the current policy and scored; the rows of the
        iteration's file (global order, identical on every rank)."""
        share = math.ceil(len(self.prompts) / context.dp_size)
        local = self.prompts[context.dp_rank * share:(context.dp_rank + 1) * share]
        # the iteration stands in for the step: sample k of group j draws from the seed of the
        # global index (iteration · P + j) · n + k, the same at any layout and on resume
        ctx = StepContext(roles=context.roles, step=iteration, samples=self.prompts, local_samples=local,
                          micro_batch_size=context.micro_batch_size, seed=context.seed)
        exp = self.maker.generate(ctx)
        policy = context.roles["policy"]
        run, last, mbs = context.run_schedule, context.from_last_stage, context.micro_batch_size
        q_prime = (collect_token_outputs(run, policy.chunks, exp.tokens, mbs, policy_logps, last).double()
                   * exp.response_mask).sum(-1)
        policy.train()
        n, G = len(exp), self.n
        responses = [exp.tokens[i, int(exp.prompt_lengths[i]):int(exp.prompt_lengths[i] + exp.response_lengths[i])]
                     for i in range(n)]
        sft_rows = [torch.cat([local[i // G]["sft_prompt_tokens"], responses[i]]) for i in range(n)]
        width = padded_length(max(len(r) for r in sft_rows) if n else 0)
        sft_tokens = torch.full((n, width), self.maker.tokenizer.pad_id, dtype=torch.long)
        sft_mask = torch.zeros(n, width, dtype=torch.float64)
        for i, r in enumerate(sft_rows):
            sft_tokens[i, :len(r)] = r
            sft_mask[i, len(r) - len(responses[i]):len(r)] = 1.0
        with self.sft.active() as chunks:
            log_p_sft = (collect_token_outputs(run, chunks, sft_tokens, mbs, policy_logps, last).double()
                         * sft_mask).sum(-1) if n else torch.zeros(0, dtype=torch.float64)
        policy.train()
        if exp.attribute_scores is None:
            raise ValueError(f"the reward source {self.maker.reward.name} gives no attribute scores: SteerLM 2.0"
                             " needs a regression reward model with one output per attribute")
        targets = torch.tensor([self.targets[int(local[i // G]["index"])][0] for i in range(n)], dtype=torch.float64)
        masks = torch.tensor([self.targets[int(local[i // G]["index"])][1] for i in range(n)], dtype=torch.float64)
        log_p_attr = attribute_log_likelihood(exp.attribute_scores.double(), targets.round().long(), masks,
                                              concentration=self.concentration, max_value=self.max_value)
        rows = []
        for j, p in enumerate(local):
            conv = p["conversation"]
            group = []
            for i in range(j * G, (j + 1) * G):
                group.append({
                    "value": exp.texts[i], "tokens": responses[i].tolist(), "truncated": bool(exp.truncated[i]),
                    "attributes": dict(zip(self.attributes, exp.attribute_scores[i].double().tolist())),
                    "log(P(a|x,y))": float(log_p_attr[i]), "log(P(y|x))": float(log_p_sft[i]),
                    "log(Q(y|a,x))": float(q_prime[i]),
                })
            row = {"index": int(p["index"]), "iteration": iteration, "label": p["label"],
                   "prompt_turns": [{"from": "User" if t.role == "user" else "Assistant", "value": t.content}
                                    for t in conv.turns], "responses": group}
            if conv.system is not None:
                row["system"] = conv.system
            rows.append(row)
        return gather_rows(context, rows)

    def check_rows(self, rows: List[dict], path) -> None:
        """A samples file read back must hold every group of this run, n responses each."""
        check_row_indices(rows, self.by_index, path, "groups")
        for r in rows:
            if len(r["responses"]) != self.n:
                raise ValueError(f"{path}: group {r['index']} has {len(r['responses'])} responses; expected {self.n}")

    def to_sample(self, row: dict) -> dict:
        """A file row -> a training sample (:func:`load_steerlm2`'s layout, the sampled token ids)."""
        prompt = self.by_index[int(row["index"])]["prompt_tokens"]
        items = []
        for r in row["responses"]:
            resp = torch.tensor(r["tokens"], dtype=torch.long)
            items.append((torch.cat([prompt, resp]), torch.cat([torch.zeros(len(prompt)), torch.ones(len(resp))])))
        column = lambda key: torch.tensor([r[key] for r in row["responses"]], dtype=torch.float64)  # noqa: E731
        return {"responses": items, "log_p_attr": column("log(P(a|x,y))"), "log_p_sft": column("log(P(y|x))"),
                "log_q_prime": column("log(Q(y|a,x))"), "index": int(row["index"])}

    def metrics(self, rows: List[dict]) -> Dict[str, float]:
        """What the iteration's samples look like: response length, truncation, the reward
        model's attributes and the adherence ``|round(ŷ) − a|`` over the requested ones."""
        resp = [r for row in rows for r in row["responses"]]
        out = {"sampling/response_tokens": sum(len(r["tokens"]) for r in resp) / len(resp),
               "sampling/truncated": sum(r["truncated"] for r in resp) / len(resp),
               "sampling/log_p_attr": sum(r["log(P(a|x,y))"] for r in resp) / len(resp)}
        for a in self.attributes:
            out[f"sampling/{a}"] = sum(r["attributes"][a] for r in resp) / len(resp)
        errors = []
        for row in rows:
            target, mask = self.targets[int(row["index"])]
            for r in row["responses"]:
                errors += [abs(min(self.max_value, max(0.0, math.floor(r["attributes"][a] + 0.5))) - t)
                           for a, t, m in zip(self.attributes, target, mask) if m]
        out["sampling/attribute_error"] = sum(errors) / max(1, len(errors))
        return out
