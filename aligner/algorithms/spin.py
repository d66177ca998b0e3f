"""Self-play fine-tuning, SPIN (Chen et al. 2024, arXiv 2401.01335; docs/spin.md): ``aligner train spin``.

From an SFT model and its SFT data alone (no preference data): each of ``spin.iterations``
iterations generates, from the current model π_t and with the rollout engine, one response
``y'`` to every SFT prompt ``x``, then trains ``spin.epochs`` epochs on the pairs
(chosen = the SFT response ``y``, rejected = ``y'``) with a preference loss of the DPO
family against the reference π_t (the previous iteration's model; the initial model in
iteration 0):

    L = mean_pairs ℓ(β [(log π(y|x) − log π_t(y|x)) − (log π(y'|x) − log π_t(y'|x))])

with ℓ the registered preference loss ``spin.loss_type`` (``dpo``: ℓ(u) = −log σ(u), the
paper's logistic loss; any loss that reads only the log-probs), plus, with
``spin.sft_weight`` w > 0, ``w · mean_pairs(−(1/|y|) log π(y|x))``, the SFT response's NLL
per token (the DPO family's SFT term; 0 by default, the paper's objective). The reference log-probs
are computed when the iteration's generations are, with the same weights, and written with
them to ``spin_samples/iteration_<t>.jsonl`` (atomically; the checkpoint records the file's
digest), so that a resumed run reads them back (:mod:`aligner.algorithms.iterative`).

With ``spin.keep_previous`` k > 0, iteration t also trains on the pairs of iterations
t − k .. t − 1 (their SFT response and generation), every pair against π_t: the log-probs of
the earlier generations are computed again under π_t with the iteration's own, and the
earlier pairs are written with them to the iteration's file (the paper's released recipe
trains its iteration 1 on iterations 0 and 1's generations: k = 1).

A row's prompt is its tokens before the first target token; its SFT response the first run
of target tokens (a multi-turn row contributes its first assistant turn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from aligner.algorithms.base import RunConfig, Trainer, init_from_hf, pair_count, pair_logps, register_trainer
from aligner.algorithms.iterative import IterativeAlgorithm, check_row_indices, derive_iteration_epochs, gather_rows
from aligner.algorithms.losses.preference import PREFERENCE_LOSSES, preference_loss
from aligner.algorithms.online import ExperienceMaker, GenerationSection, generation_config
from aligner.config import ConfigError, registered
from aligner.parallel import padded_length
from aligner.training.algorithm import StepContext
from aligner.training.config import InitSection
from aligner.training.forward import collect_token_outputs, policy_logps
from aligner.training.metrics import metric


def spin_losses() -> List[str]:
    """The registered preference losses SPIN can run: those that read only the log-probs and β."""
    return [name for name, loss in PREFERENCE_LOSSES.items() if not loss.inputs]


# ------------------------------------------------------------------------------ config
@dataclass
class SPINSection:
    """``spin``: self-play fine-tuning (docs/spin.md)."""

    iterations: int = 2  # generate-then-train rounds, each from the newest model
    epochs: int = 1  # passes over an iteration's pairs
    loss_type: str = registered(spin_losses, "dpo")  # a preference loss reading only the log-probs
    beta: float = 0.1  # the paper's λ: the scale of the log-ratio margin (> 0)
    sft_weight: float = 0.0  # weight of the SFT response's NLL per token (0: the paper's objective)
    keep_previous: int = 0  # earlier iterations whose generations an iteration also trains on (>= 0)
    generation: GenerationSection = field(default_factory=GenerationSection)  # the synthetic responses


@dataclass
class SPINConfig(RunConfig):
    """SPIN from an SFT model (``init.hf`` required) on its SFT data."""

    algorithm: str = "spin"
    init: InitSection = field(default_factory=init_from_hf)
    spin: SPINSection = field(default_factory=SPINSection)


# ------------------------------------------------------------------------------ sampling
def first_response(tokens: torch.Tensor, loss_mask: torch.Tensor):
    """``(prompt_length, end)`` of a row's first run of target tokens: the prompt is
    ``tokens[:prompt_length]``, the SFT response ``tokens[prompt_length:end]``."""
    targets = torch.nonzero(loss_mask[1:] > 0)[:, 0] + 1
    if targets.numel() == 0:
        raise ValueError("an SFT row without target tokens")
    start = int(targets[0])
    after = torch.nonzero(loss_mask[start:] == 0)[:, 0]
    return start, start + int(after[0]) if after.numel() else len(tokens)


class SPINSampler:
    """One iteration's pairs: a response to every prompt from the current model (the
    experience maker, one sample per prompt, seeded by the global index ``iteration·P + j``)
    and the current model's log-probs of both responses (the iteration's reference); with a
    window (``keep_previous`` > 0), also the current model's log-probs of the earlier
    iterations' generations it is given.

    data: the SFT samples ``{"index", "tokens", "loss_mask"}``; maker: an
    :class:`aligner.algorithms.online.ExperienceMaker` without a reward source.
    """

    def __init__(self, data: Sequence[dict], maker: ExperienceMaker, *, epochs: int, keep_previous: int = 0):
        self.maker = maker
        self.epochs = epochs
        self.keep_previous = keep_previous
        self.prompts = []
        for s in data:
            start, end = first_response(s["tokens"], s["loss_mask"])
            self.prompts.append({"index": int(s["index"]), "prompt_tokens": s["tokens"][:start],
                                 "chosen": s["tokens"][:end], "prompt": "", "meta": {}})
        self.by_index = {p["index"]: p for p in self.prompts}

    def sample(self, context: StepContext, iteration: int, previous: Sequence[dict] = ()) -> List[dict]:
        """The iteration's rows (global order, identical on every rank): its own generations,
        then ``previous`` (earlier iterations' rows, newest iteration first) with the current
        model's log-probs."""
        share = math.ceil(len(self.prompts) / context.dp_size)
        local = self.prompts[context.dp_rank * share:(context.dp_rank + 1) * share]
        ctx = StepContext(roles=context.roles, step=iteration, samples=self.prompts, local_samples=local,
                          micro_batch_size=context.micro_batch_size, seed=context.seed)
        exp = self.maker.generate(ctx)
        n = len(exp)
        rejected = [exp.tokens[i, :int(exp.prompt_lengths[i] + exp.response_lengths[i])] for i in range(n)]
        earlier = {(int(r["iteration"]), int(r["index"])): r for r in previous}
        sources = sorted({t for t, _ in earlier}, reverse=True)
        old = [earlier[t, p["index"]] for t in sources for p in local]  # this rank's prompts, per iteration
        items = [(p["chosen"], len(p["prompt_tokens"])) for p in local] + \
                [(r, len(p["prompt_tokens"])) for r, p in zip(rejected, local)] + \
                [(torch.cat([p["prompt_tokens"], torch.tensor(r["rejected_tokens"], dtype=torch.long)]),
                  len(p["prompt_tokens"])) for r, p in zip(old, [p for _ in sources for p in local])]
        width = padded_length(max(len(t) for t, _ in items))
        tokens = torch.full((len(items), width), self.maker.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.float64)
        for i, (t, start) in enumerate(items):
            tokens[i, :len(t)] = t
            mask[i, start:len(t)] = 1.0
        policy = context.roles["policy"]
        ref = (collect_token_outputs(context.run_schedule, policy.chunks, tokens, context.micro_batch_size,
                                     policy_logps, context.from_last_stage).double() * mask).sum(-1)
        policy.train()
        rows = []
        for i, p in enumerate(local):
            response = rejected[i][len(p["prompt_tokens"]):]
            rows.append({"index": p["index"], "iteration": iteration, "rejected_tokens": response.tolist(),
                         "rejected": exp.texts[i], "truncated": bool(exp.truncated[i]),
                         "ref_chosen": float(ref[i]), "ref_rejected": float(ref[n + i])})
        rows = gather_rows(context, rows)
        for k in range(len(sources)):  # each earlier iteration's pairs in global order, as its own
            part = [dict(r, ref_chosen=float(ref[i % n]), ref_rejected=float(ref[2 * n + i]))
                    for i, r in enumerate(old[k * n:(k + 1) * n], start=k * n)]
            rows += gather_rows(context, part)
        return rows

    def check_rows(self, rows: List[dict], path) -> None:
        """A file read back must hold a pair for every prompt of this run, of the file's own
        iteration and of each earlier one of its window."""
        by_source: Dict[int, List[dict]] = {}
        for r in rows:
            by_source.setdefault(int(r["iteration"]), []).append(r)
        newest = max(by_source, default=0)
        want = list(range(newest, newest - min(newest, self.keep_previous) - 1, -1))
        if sorted(by_source, reverse=True) != want:
            raise ValueError(f"{path}: holds the pairs of iterations {sorted(by_source)}; with spin.keep_previous ="
                             f" {self.keep_previous} iteration {newest} trains on those of {sorted(want)}")
        for t in want:
            check_row_indices(by_source[t], self.by_index, path, f"iteration {t}'s pairs of rows")

    def to_sample(self, row: dict) -> dict:
        """A file row -> a pair ``{"chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask",
        "ref": (log π_t(y|x), log π_t(y'|x)), "index"}``."""
        p = self.by_index[int(row["index"])]
        prompt = p["prompt_tokens"]
        response = torch.tensor(row["rejected_tokens"], dtype=torch.long)

        def mask(length):
            return torch.cat([torch.zeros(len(prompt)), torch.ones(length - len(prompt))])

        rejected = torch.cat([prompt, response])
        return {"chosen": p["chosen"], "chosen_loss_mask": mask(len(p["chosen"])), "rejected": rejected,
                "rejected_loss_mask": mask(len(rejected)), "ref": (row["ref_chosen"], row["ref_rejected"]),
                "index": int(row["index"])}

    def metrics(self, rows: List[dict]) -> Dict[str, float]:
        """The generations: length, truncation, and the share equal to the SFT response."""
        same = 0
        for r in rows:
            p = self.by_index[int(r["index"])]
            same += p["chosen"][len(p["prompt_tokens"]):].tolist() == r["rejected_tokens"]
        n = max(1, len(rows))
        return {"sampling/response_tokens": sum(len(r["rejected_tokens"]) for r in rows) / n,
                "sampling/truncated": sum(r["truncated"] for r in rows) / n,
                "sampling/same_as_sft": same / n}


# ------------------------------------------------------------------------------ algorithm
class SPINAlgorithm(IterativeAlgorithm):
    """The SPIN objective on an iteration's pairs (module docstring)."""

    name = "spin"
    title = "SPIN"

    def __init__(self, pad_id: int, *, sampler: SPINSampler, steps_per_iteration: int, samples_dir,
                 loss_type: str = "dpo", beta: float = 0.1, sft_weight: float = 0.0, keep_previous: int = 0):
        super().__init__(pad_id, sampler=sampler, steps_per_iteration=steps_per_iteration, samples_dir=samples_dir,
                         keep_previous=keep_previous)
        self.loss_type = loss_type
        self.beta = beta
        self.sft_weight = sft_weight

    def groups(self, sample):
        return [(sample["chosen"], sample["chosen_loss_mask"]), (sample["rejected"], sample["rejected_loss_mask"])]

    def attach(self, batch, samples):
        batch["ref"] = torch.tensor([s["ref"] for s in samples], dtype=torch.float64).reshape(-1, 2)
        return batch

    def loss_count(self, batch):
        return pair_count(batch)  # pairs

    def loss(self, batch, logits):
        lc, lr, cc, _ = pair_logps(batch, logits)
        ref = batch["ref"].to(lc.device, lc.dtype)
        loss, stats = preference_loss(self.loss_type, lc, lr, ref[:, 0], ref[:, 1], beta=self.beta,
                                      chosen_nll=-lc / cc.clamp(min=1), sft_weight=self.sft_weight)
        n = lc.numel()
        metrics = {"loss": metric(loss.detach() * n, n)}
        for key, value in stats.items():
            if torch.is_tensor(value) and value.numel() == 1 and key != "loss":
                metrics[key] = metric(value.detach().double() * n, n)
        return loss * n, n, metrics


# ------------------------------------------------------------------------------ trainer
@register_trainer("spin")
class SPINTrainer(Trainer):
    """``aligner train spin``."""

    schema = SPINConfig
    data_kind = "sft"

    @classmethod
    def derive(cls, cfg):
        return derive_iteration_epochs(cfg, "spin", SPINSection, "SPIN")

    @classmethod
    def check(cls, cfg):
        s = cfg.spin
        if not s.beta > 0:
            raise ConfigError(f"spin.beta = {s.beta!r}: expected > 0")
        if not s.sft_weight >= 0:
            raise ConfigError(f"spin.sft_weight = {s.sft_weight!r}: expected >= 0")
        if s.keep_previous < 0:
            raise ConfigError(f"spin.keep_previous = {s.keep_previous}: expected >= 0")
        if s.generation.max_new_tokens < 1:
            raise ConfigError(f"spin.generation.max_new_tokens = {s.generation.max_new_tokens}: expected >= 1")
        if cfg.data.validation is not None:
            raise ConfigError(f"data.validation = {cfg.data.validation!r}: SPIN has no validation split (each"
                              " iteration's pairs are generated by the model being trained)",
                              hint="remove data.validation")
        if cfg.data.packing:
            raise ConfigError("data.packing = true: SPIN trains on padded pairs", hint="set data.packing=false")

    def prepare(self):
        s, t = self.cfg.spin, self.cfg.trainer
        train = self.load_data(self.cfg.data.train)
        steps_per_epoch = len(train) // t.global_batch_size
        if steps_per_epoch < 1:
            raise ConfigError(f"data.train has {len(train)} rows, fewer than trainer.global_batch_size ="
                              f" {t.global_batch_size}")
        gen = generation_config(s.generation, t.seed, [self.tokenizer().eos_id])
        maker = ExperienceMaker(gen, None, self.tokenizer(), max_batch=s.generation.max_batch,
                                continuous_batching=s.generation.continuous_batching)
        sampler = SPINSampler(train, maker, epochs=s.epochs, keep_previous=s.keep_previous)
        algo = SPINAlgorithm(self.tokenizer().pad_id, sampler=sampler, steps_per_iteration=steps_per_epoch * s.epochs,
                             samples_dir=Path(t.out_dir) / "spin_samples", loss_type=s.loss_type, beta=s.beta,
                             sft_weight=s.sft_weight, keep_previous=s.keep_previous)
        return algo, self.build_models(), train, None, {}
