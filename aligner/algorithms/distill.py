"""Knowledge distillation (docs/distill.md): a student trained to match a frozen teacher's
next-token distributions on the target tokens of SFT rows; ``aligner train distill``.

Per target token: a divergence between the student's and the teacher's distributions
(:mod:`aligner.algorithms.losses.distill`: forward KL, reverse KL, generalised JSD with its
β; the full vocabulary or the teacher's top-k tokens), optionally plus the SFT NLL:
``L = (kd_weight · Σ mask·D + sft_weight · Σ mask·NLL) / Σ mask`` over the global batch.

The teacher is any supported HF model with the student's vocabulary, built at the
student's TP / PP layout as a frozen role: each micro-batch is put through the teacher
first (a forward-only schedule over the same micro-batches), and its output — this rank's
vocabulary slice of the logits ``[b, s, v/p]``, or the top-k logits and ids ``[b, s, k]`` —
travels with the micro-batch to the student's loss on the same last-stage rank. The
divergences are computed on the TP-sharded logits without gathering them.

On-policy distillation (GKD, Agarwal et al. 2024, arXiv 2306.13649): with probability
``lmbda`` a step trains on the student's own responses to the rows' prompts (sampled with
the rollout engine through the online core's experience maker, seeded per sample), scored
token by token by the teacher; otherwise on the rows' responses. The draw is a function
of (seed, step), so a resumed run and every layout take the same steps on-policy.

Sequence-level distillation (Kim & Rush 2016, arXiv 1606.07947; ``responses = teacher``):
before the first step the teacher answers every training row's prompt once with the
rollout engine (at the student's layout, sample ``i`` seeded by the row's index ``i``, so
every layout gives the same answers); the answers are written to
``<out_dir>/teacher_responses.jsonl`` with the recorded-samples machinery of
:mod:`aligner.algorithms.iterative` (the checkpoint records the file's SHA-256; a resumed
run reads it back), and the steps that would train on a row's response train on
(the row's prompt, the teacher's response) instead: the NLL of the teacher's tokens
(``kd_weight 0``: pure sequence-level KD, the teacher then not run again) and/or the
token-level divergence on them.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import MISSING

from aligner.algorithms.base import RunConfig, TokenAlgorithm, Trainer, policy_update, register_trainer
from aligner.algorithms.iterative import check_row_indices, gather_rows, read_recorded_rows, record_rows
from aligner.algorithms.losses.distill import (
    DISTILL_DIVERGENCES,
    VocabShard,
    distill_loss,
    shard_topk,
    token_divergence,
    topk_tail_logmass,
    topk_token_divergence,
)
from aligner.algorithms.online import ExperienceMaker, GenerationSection, generation_config
from aligner.config import Choice, ConfigError
from aligner.files import atomic_write_bytes
from aligner.models.config import ModelConfig
from aligner.parallel.seeds import on_policy_generator
from aligner.runtime import UserError, get_logger
from aligner.training.algorithm import StepContext
from aligner.training.batching import schedule_microbatches, shifted_logprobs
from aligner.training.forward import forward
from aligner.training.metrics import metric

Divergence = Choice("Divergence", [(name, name) for name in DISTILL_DIVERGENCES], module=__name__)
Responses = Choice("Responses", [("rows", "rows"), ("teacher", "teacher")], module=__name__)
TEACHER_RESPONSES = "teacher_responses.jsonl"  # in trainer.out_dir


# ------------------------------------------------------------------------------ config
@dataclass
class DistillSection:
    """``distill``: knowledge distillation (docs/distill.md)."""

    teacher: str = MISSING  # HF folder of the teacher (the student's vocabulary)
    divergence: Divergence = Divergence.forward_kl  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # jsd's β in [0, 1] (0: forward KL, 1: reverse KL)
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    top_k: Optional[int] = None  # the teacher's top-k tokens instead of the full vocabulary
    # top-k: the mass outside the teacher's k tokens compared as one more category (k + 1 outcomes, not renormalised)
    top_k_tail: bool = False
    # top-k: computed once before training into <out_dir>/teacher_topk.pt (read back on resume), the teacher offloaded
    precompute: bool = False
    kd_weight: float = 1.0  # weight of the divergence
    sft_weight: float = 0.0  # weight of the NLL of the rows' responses
    lmbda: float = 0.0  # GKD: the share of steps on the student's own samples (on-policy)
    # the student's samples of on-policy steps (GKD samples at temperature 1)
    generation: GenerationSection = field(default_factory=GenerationSection)
    # the responses trained on: rows | teacher (the teacher's own responses to the rows' prompts, generated once
    # before training into <out_dir>/teacher_responses.jsonl: sequence-level distillation)
    responses: Responses = Responses.rows
    # responses = teacher: the teacher's sampling (temperature 0: greedy)
    teacher_generation: GenerationSection = field(default_factory=GenerationSection)


@dataclass
class DistillConfig(RunConfig):
    """Knowledge distillation from ``distill.teacher`` into a student: ``init.hf``, or the
    ``model`` section's architecture from a random initialisation (a smaller student)."""

    algorithm: str = "distill"
    distill: DistillSection = field(default_factory=DistillSection)


def check_distill_section(s, key: str = "distill") -> None:
    """The ``distill`` section's values (ConfigError naming the key)."""
    if not 0 <= s.beta <= 1:
        raise ConfigError(f"{key}.beta = {s.beta}: expected in [0, 1]")
    if s.beta != DistillSection.beta and s.divergence != Divergence.jsd:
        raise ConfigError(f"{key}.beta = {s.beta} has no effect with {key}.divergence = {str(s.divergence)!r}",
                          hint=f"remove the override, or set {key}.divergence=jsd")
    if not s.temperature > 0:
        raise ConfigError(f"{key}.temperature = {s.temperature}: expected > 0")
    if s.top_k is not None and s.top_k < 1:
        raise ConfigError(f"{key}.top_k = {s.top_k}: expected >= 1 (or null: the full vocabulary)")
    if s.top_k_tail and s.top_k is None:
        raise ConfigError(f"{key}.top_k_tail = true: it is the mass outside the teacher's top-k; it needs {key}.top_k")
    if s.precompute and (s.top_k is None or s.lmbda > 0):
        raise ConfigError(f"{key}.precompute = true: it stores the teacher's top-k of the rows' responses; it needs"
                          f" {key}.top_k and {key}.lmbda = 0 (on-policy responses are new at every step)")
    for name in ("kd_weight", "sft_weight"):
        if s[name] < 0:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected >= 0")
    if s.kd_weight == 0 and s.sft_weight == 0:
        raise ConfigError(f"{key}.kd_weight and {key}.sft_weight are both 0: nothing would be trained")
    if not 0 <= s.lmbda <= 1:
        raise ConfigError(f"{key}.lmbda = {s.lmbda}: expected in [0, 1]")
    if s.generation.max_new_tokens < 1:
        raise ConfigError(f"{key}.generation.max_new_tokens = {s.generation.max_new_tokens}: expected >= 1")
    if s.responses == Responses.teacher:
        if s.precompute:
            raise ConfigError(f"{key}.precompute = true stores the teacher's top-k of the rows' responses; with"
                              f" {key}.responses = teacher the student trains on the teacher's own responses",
                              hint=f"remove {key}.precompute (or set {key}.responses=rows)")
        if s.teacher_generation.max_new_tokens < 1:
            raise ConfigError(f"{key}.teacher_generation.max_new_tokens = {s.teacher_generation.max_new_tokens}:"
                              " expected >= 1")
        if not s.teacher_generation.temperature >= 0:
            raise ConfigError(f"{key}.teacher_generation.temperature = {s.teacher_generation.temperature}: expected"
                              " >= 0 (0: greedy)")
    else:
        default = GenerationSection()
        changed = [f.name for f in dataclasses.fields(GenerationSection)
                   if s.teacher_generation[f.name] != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"{key}.teacher_generation.{changed[0]} = {s.teacher_generation[changed[0]]} has no"
                              f" effect with {key}.responses = {str(s.responses)!r}",
                              hint=f"remove the override, or set {key}.responses=teacher")


def check_same_vocabulary(student: ModelConfig, teacher: ModelConfig, teacher_path: str) -> None:
    """Distillation compares distributions over one vocabulary: a one-line error otherwise."""
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(f"distill.teacher = {teacher_path!r}: its vocabulary has {teacher.vocab_size} tokens, the"
                          f" student's {student.vocab_size}; distillation needs one vocabulary")


# ------------------------------------------------------------------------------ vocab-parallel
def tensor_parallel_shard(local_vocab: int) -> VocabShard:
    """This rank's :class:`VocabShard` of a ``[b, s, local_vocab]`` logits slice."""
    # megatron-core's parallel state and mappings: loaded when a loss is computed, not at config checks
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return VocabShard()
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()

    def tp_max(t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t

    def tp_gather(t):
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    return VocabShard(start=ps.get_tensor_model_parallel_rank() * local_vocab,
                      sum=reduce_from_tensor_model_parallel_region, max=tp_max, gather=tp_gather)


# ------------------------------------------------------------------------------ the teacher's responses
def row_prompt(sample: dict) -> torch.Tensor:
    """A row's prompt: its tokens before the first target token (all of them without one)."""
    targets = sample["loss_mask"][1:]
    first = int(torch.nonzero(targets)[0]) + 1 if bool(targets.any()) else len(sample["tokens"])
    return sample["tokens"][:first]


def teacher_sample(prompt_tokens, response_tokens) -> dict:
    """(a row's prompt, the teacher's response) as an SFT sample: ``tokens`` ``[P + R]`` and
    ``loss_mask`` ``[P + R]``, 1 on the response's R tokens (its EOS included when the
    teacher stopped) and 0 on the prompt."""
    prompt = torch.as_tensor(prompt_tokens, dtype=torch.long)
    response = torch.as_tensor(response_tokens, dtype=torch.long)
    return {"tokens": torch.cat([prompt, response]),
            "loss_mask": torch.cat([torch.zeros(len(prompt)), torch.ones(len(response))])}


def check_teacher_rows(rows: List[dict], indices, eos_id: int, path) -> None:
    """A teacher-responses file read back: a row for every training row's index, each with a
    non-empty ``response_tokens`` list that ends with EOS unless ``truncated``."""
    for line, r in enumerate(rows, start=1):
        tokens = r.get("response_tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError(f"{path}: line {line}: response_tokens: expected a non-empty list of token ids")
        if not isinstance(r.get("truncated"), bool):
            raise ValueError(f"{path}: line {line}: truncated: expected true or false")
        if not r["truncated"] and tokens[-1] != eos_id:
            raise ValueError(f"{path}: line {line}: response_tokens: a response that is not truncated ends with"
                             f" EOS ({eos_id}), this one with {tokens[-1]}")
    check_row_indices(rows, indices, path, "the teacher's responses of rows")


# ------------------------------------------------------------------------------ algorithm
class DistillAlgorithm(TokenAlgorithm):
    """The distillation objective on SFT samples ``{"tokens", "loss_mask"}`` (module docstring).

    teacher: the teacher's frozen role (set by the trainer); maker: the experience maker of
    on-policy steps (None when ``lmbda`` = 0). With ``responses = "teacher"`` (sequence-level
    distillation) the trainer also sets ``teacher_maker`` (the teacher's sampling) and
    ``responses_file``. Owns its step so that a step may train on fresh samples; validation
    runs through the loop's schedule on the rows' responses (same micro-batches, same loss).
    """

    name = "distill"
    owns_step = True

    def __init__(self, pad_id: int, *, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_k_tail: bool = False, kd_weight: float = 1.0,
                 sft_weight: float = 0.0, lmbda: float = 0.0, teacher=None, maker: Optional[ExperienceMaker] = None,
                 responses: str = "rows", packing: bool = False, capacity: Optional[int] = None):
        super().__init__(pad_id, packing, capacity)
        self.divergence = str(divergence)
        self.beta = beta
        self.temperature = temperature
        self.top_k = top_k
        self.top_k_tail = top_k_tail
        self.kd_weight = kd_weight
        self.sft_weight = sft_weight
        self.lmbda = lmbda
        self.teacher = teacher
        self.maker = maker
        self.interleaved = False  # set from the policy's chunks at setup
        self.topk_file: Optional[Path] = None  # precomputed top-k: the run's table file
        self._table: Optional[Dict[int, tuple]] = None  # sample index -> (values [L, k], ids [L, k][, tail [L]])
        self.responses = str(responses)
        # pure sequence-level KD needs no teacher distributions: the teacher only answers, once
        self.teacher_scores = not (self.responses == "teacher" and kd_weight == 0)
        self.teacher_maker: Optional[ExperienceMaker] = None  # the teacher's sampling (responses = teacher)
        self.responses_file: Optional[Path] = None
        self._prompts: List[dict] = []  # every training row's prompt, by index
        self._responses: Optional[Dict[int, dict]] = None  # row index -> (prompt, teacher's response) sample
        self._responses_digest: Optional[str] = None
        self._resume_digest: Optional[str] = None  # the teacher's responses a checkpoint recorded
        self._response_metrics: Dict[str, float] = {}

    def groups(self, sample):
        return [(sample["tokens"], sample["loss_mask"])]

    def attach(self, batch, samples):
        batch["index"] = [int(s.get("index", -1)) for s in samples]  # the rows' (a student sample has none)
        return batch

    def setup(self, loop) -> None:
        super().setup(loop)
        self.interleaved = len(loop.models) > 1
        if self.responses == "teacher":
            self._prompts = [{"index": int(s.get("index", i)), "prompt_tokens": row_prompt(s), "prompt": "", "meta": {}}
                             for i, s in enumerate(loop.train_data)]
        if self.topk_file is not None:
            self._table = self.precomputed_topk(loop)
            self.teacher.offload()  # training reads the table: the teacher's weights leave the device

    def state_dict(self) -> dict:
        return {"teacher_responses_sha256": self._responses_digest} if self._responses_digest else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume_digest = state.get("teacher_responses_sha256")

    # ---------------------------------------------------------------- the teacher's responses
    def teacher_responses(self, context: StepContext) -> None:
        """Every training row's (prompt, teacher's response) sample in memory: generated and
        recorded at a run's first step, read back (and checked against the checkpoint's
        digest) by a resumed run."""
        if self._responses is not None:
            return
        t0 = time.perf_counter()
        path = self.responses_file
        if self._resume_digest is not None or context.step > 0:
            rows = read_recorded_rows(path, self._resume_digest,
                                      f"the run resumes at step {context.step} with distill.responses = teacher, but"
                                      " the checkpoint does not record the teacher's responses or the file is missing"
                                      " from the run folder",
                                      "differs from the teacher's responses this run was trained on (their digest is"
                                      " recorded in the checkpoint)")
            check_teacher_rows(rows, [p["index"] for p in self._prompts], self.teacher_maker.tokenizer.eos_id, path)
            digest = self._resume_digest
            what = f"read back from {path}"
        else:
            get_logger(__name__).info(f"the teacher answers the {len(self._prompts)} training prompts (distill.responses"
                                      " = teacher)")
            rows, digest = record_rows(path, self.generate_teacher_responses(context))
            what = f"written to {path}"
            self.teacher_maker.engine = None  # its KV cache is not needed again
        prompts = {p["index"]: p["prompt_tokens"] for p in self._prompts}
        self._responses = {int(r["index"]): teacher_sample(prompts[int(r["index"])], r["response_tokens"])
                           for r in rows}
        self._responses_digest = digest
        n = max(1, len(rows))
        self._response_metrics = {"teacher/response_tokens": sum(len(r["response_tokens"]) for r in rows) / n,
                                  "teacher/truncated": float(sum(r["truncated"] for r in rows)),
                                  "time/teacher_responses": time.perf_counter() - t0}
        length, truncated = self._response_metrics["teacher/response_tokens"], sum(r["truncated"] for r in rows)
        get_logger(__name__).info(f"the teacher's {len(rows)} responses {what}: {length:.1f} tokens on average,"
                                  f" {truncated} truncated (no EOS within distill.teacher_generation.max_new_tokens;"
                                  " kept)")
        if not self.teacher_scores:
            self.teacher.offload()  # pure sequence-level KD: the teacher is not run again

    def generate_teacher_responses(self, context: StepContext) -> List[dict]:
        """The teacher's response to every training row's prompt (global order, identical on
        every rank): each data-parallel rank samples its contiguous share, the prompt of row
        position ``j`` seeded by ``j`` (:meth:`ExperienceMaker.generate` at step 0)."""
        share = math.ceil(len(self._prompts) / context.dp_size)
        local = self._prompts[context.dp_rank * share:(context.dp_rank + 1) * share]
        # the rollout engine generates with roles["policy"]'s modules: here the teacher's (frozen, unwrapped)
        ctx = StepContext(roles={"policy": SimpleNamespace(modules=self.teacher.chunks)}, step=0,
                          samples=self._prompts, local_samples=local, micro_batch_size=context.micro_batch_size,
                          seed=context.seed)
        exp = self.teacher_maker.generate(ctx)
        rows = []
        for i, p in enumerate(local):
            start = int(exp.prompt_lengths[i])
            response = exp.tokens[i, start:start + int(exp.response_lengths[i])]
            rows.append({"index": p["index"], "response_tokens": response.tolist(), "response": exp.texts[i],
                         "truncated": bool(exp.truncated[i])})
        return gather_rows(context, rows)

    # ---------------------------------------------------------------- precomputed top-k
    def precomputed_topk(self, loop) -> Dict[int, tuple]:
        """The teacher's top-k of every training and validation sample (index -> values, ids
        ``[L, k]``, and with ``top_k_tail`` the tail log-mass ``[L]`` at the run's temperature):
        read from :attr:`topk_file`, else computed in global batches (each rank its share,
        gathered over data-parallel ranks from the last pipeline stage) and written by rank 0
        atomically."""
        from megatron.core import parallel_state as ps  # megatron-core loads when training runs, not at config checks

        if self.topk_file.is_file():
            table = torch.load(self.topk_file, weights_only=True)
            if table["k"] != self.top_k:
                raise UserError(f"{self.topk_file}: holds the teacher's top-{table['k']}, distill.top_k = {self.top_k}")
            if not self.top_k_tail:
                return {int(i): (v, t) for i, v, t in zip(table["index"], table["values"], table["ids"])}
            if table.get("temperature") != self.temperature:
                held = "no tail masses" if "tail" not in table else f"tail masses at temperature {table['temperature']}"
                raise UserError(f"{self.topk_file}: holds {held}; distill.top_k_tail = true at distill.temperature ="
                                 f" {self.temperature} needs them at that temperature (use another trainer.out_dir)")
            return {int(i): (v, t, m) for i, v, t, m in zip(table["index"], table["values"], table["ids"],
                                                           table["tail"])}
        n_train = len(loop.train_data)
        val = loop.val_data or []
        samples = [dict(loop.train_data[i], index=i) for i in range(n_train)] + \
                  [dict(val[i], index=n_train + i) for i in range(len(val))]
        gbs = loop.cfg.global_batch_size
        mine: Dict[int, tuple] = {}
        for start in range(0, len(samples), gbs):
            chunk = samples[start:start + gbs]
            for batch in self.microbatches(loop.local_share(chunk), loop.cfg.micro_batch_size, loop.seq_length(chunk)):
                if "teacher_topk" not in batch:  # not the last pipeline stage
                    continue
                topk = batch["teacher_topk"]
                for row, index in enumerate(batch.get("index", [])):
                    length = int((batch["item_of_token"][row] >= 0).sum())
                    mine[index] = (topk[0][row, :length].float().cpu(), topk[1][row, :length].int().cpu()) + \
                        ((topk[2][row, :length].float().cpu(),) if self.top_k_tail else ())
        parts = [mine]
        if ps.get_data_parallel_world_size() > 1:
            parts = [None] * ps.get_data_parallel_world_size()
            dist.all_gather_object(parts, mine, group=ps.get_data_parallel_group())
        table = StepContext.from_last_stage({i: v for part in parts for i, v in part.items()})
        if dist.get_rank() == 0:
            order = sorted(table)
            buffer = io.BytesIO()
            saved = {"k": self.top_k, "index": order, "values": [table[i][0] for i in order],
                     "ids": [table[i][1] for i in order]}
            if self.top_k_tail:
                saved.update(tail=[table[i][2] for i in order], temperature=self.temperature)
            torch.save(saved, buffer)
            atomic_write_bytes(self.topk_file, buffer.getvalue())
        return table

    def _from_table(self, batch) -> tuple:
        """The micro-batch's ``[R, S, k]`` top-k from the table (zero where no item is; there
        the tail log-mass is log ½, a finite value that the mask drops)."""
        rows, width = batch["tokens"].shape
        values = torch.zeros(rows, width, self.top_k)
        ids = torch.zeros(rows, width, self.top_k, dtype=torch.long)
        tail = torch.full((rows, width), -math.log(2.0))
        for row, index in enumerate(batch.get("index", [])):
            v, t, *m = self._table[index]
            values[row, :len(v)], ids[row, :len(t)] = v, t.long()
            if m:
                tail[row, :len(m[0])] = m[0]
        return (values, ids, tail) if self.top_k_tail else (values, ids)

    # ---------------------------------------------------------------- the teacher's pass
    def microbatches(self, samples, micro_batch_size, seq_length):
        """The micro-batches of one schedule call (filled to one shape), each carrying the
        teacher's output for it (``teacher_logits``, or ``teacher_topk`` values and ids)."""
        micro = schedule_microbatches(super().microbatches(samples, micro_batch_size, seq_length),
                                      interleaved=self.interleaved)
        if not self.teacher_scores:
            return micro
        if self._table is not None:
            for batch in micro:
                batch["teacher_topk"] = self._from_table(batch)
            return micro
        for i, batch in enumerate(micro):
            batch["micro_id"] = i
        outputs: Dict[int, object] = {}

        def keep(batch, logits):
            if self.top_k is None:
                outputs[batch["micro_id"]] = logits.detach()
                return logits.reshape(-1)[:1].sum() * 0.0, 1, {}
            shard = tensor_parallel_shard(logits.shape[-1])
            topk = shard_topk(logits, self.top_k, shard)
            if self.top_k_tail:
                topk += (topk_tail_logmass(logits.detach(), topk[1], self.temperature, shard),)
            outputs[batch["micro_id"]] = topk
            return logits.reshape(-1)[:1].sum() * 0.0, 1, {}

        with torch.no_grad():
            # the schedule runs on the micro-batches' own tensors; the outputs exist on the last stage only
            StepContext.run_schedule(self.teacher.chunks, micro, forward, keep, forward_only=True)
        for i, batch in enumerate(micro):
            if i in outputs:
                batch["teacher_topk" if self.top_k else "teacher_logits"] = outputs[i]
        return micro

    # ---------------------------------------------------------------- loss
    def loss(self, batch, logits):
        shard = tensor_parallel_shard(logits.shape[-1])
        student = logits[:, :-1]  # position t predicts token t + 1: aligned with loss_mask[:, 1:]
        if not self.teacher_scores:  # kd_weight 0 on the teacher's responses: the NLL alone
            div = torch.zeros_like(student[..., 0], dtype=torch.float32)
        elif self.top_k is None:
            div = token_divergence(student, batch["teacher_logits"][:, :-1], self.divergence, beta=self.beta,
                                   temperature=self.temperature, shard=shard)
        else:
            values, ids, *tail = batch["teacher_topk"]
            div = topk_token_divergence(student, values[:, :-1], ids[:, :-1], self.divergence, beta=self.beta,
                                        temperature=self.temperature, shard=shard,
                                        teacher_tail=tail[0][:, :-1] if tail else None)
        div = F.pad(div, (1, 0))
        mask = batch["loss_mask"]
        nll = -shifted_logprobs(logits, batch["tokens"])
        total, count, parts = distill_loss(div, mask, nll, kd_weight=self.kd_weight, sft_weight=self.sft_weight)
        metrics = {"loss": metric(total, count), "loss/sft": metric(parts["sft"], count)}
        if self.teacher_scores:
            metrics["loss/kd"] = metric(parts["kd"], count)
        return total, count.round().long(), metrics

    # ---------------------------------------------------------------- the step
    def on_policy(self, context: StepContext) -> bool:
        """Whether step ``context.step`` trains on the student's samples (probability lmbda)."""
        if self.lmbda <= 0:
            return False
        return bool(torch.rand(1, generator=on_policy_generator(context.seed, context.step)) < self.lmbda)

    def student_samples(self, context: StepContext) -> List[dict]:
        """The student's responses to this rank's rows' prompts (the tokens before each
        row's first target token), as SFT samples whose targets are the response."""
        prompts = [{"prompt_tokens": row_prompt(s), "prompt": "", "meta": {}, "index": int(s.get("index", -1))}
                   for s in context.local_samples]
        ctx = StepContext(roles=context.roles, step=context.step, samples=context.samples, local_samples=prompts,
                          micro_batch_size=context.micro_batch_size, seed=context.seed)
        exp = self.maker.generate(ctx)
        out = []
        for i in range(len(exp)):
            end = int(exp.prompt_lengths[i] + exp.response_lengths[i])
            out.append({"tokens": exp.tokens[i, :end].clone(), "loss_mask": exp.response_mask[i, :end].clone()})
        return out

    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        if self.responses == "teacher":
            self.teacher_responses(context)
        on_policy = self.on_policy(context)
        samples = None
        if on_policy:
            local = self.student_samples(context)
        elif self._responses is not None:  # the rows' prompts with the teacher's responses
            local = [self._responses[int(s["index"])] for s in context.local_samples]
            samples = [self._responses[int(s["index"])] for s in context.samples]
        else:
            local = list(context.local_samples)
        metrics = policy_update(context, self, local, samples)
        metrics.update(self._response_metrics)
        metrics.update(on_policy=float(on_policy), step_time=time.perf_counter() - t0)
        self._response_metrics = {k: v for k, v in self._response_metrics.items() if not k.startswith("time/")}
        return metrics


# ------------------------------------------------------------------------------ trainer
@register_trainer("distill")
class DistillTrainer(Trainer):
    """``aligner train distill`` (and ``gkd``: ``conf/gkd.yaml`` sets ``distill.lmbda``)."""

    schema = DistillConfig
    data_kind = "sft"

    @classmethod
    def check(cls, cfg):
        check_distill_section(cfg.distill)
        if cfg.distill.precompute and cfg.data.packing:
            raise ConfigError("distill.precompute = true stores the top-k of padded rows", hint="set data.packing=false")

    def teacher_config(self) -> ModelConfig:
        path = self.cfg.distill.teacher
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"distill.teacher = {path!r}: not an HF model folder (no config.json)")
        try:
            return ModelConfig.from_hf(path)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"distill.teacher = {path!r}: {exc}") from None

    def preflight(self) -> bool:
        resuming = super().preflight()
        check_same_vocabulary(self.model_config(), self.teacher_config(), self.cfg.distill.teacher)
        return resuming

    def algorithm(self) -> DistillAlgorithm:
        s, d = self.cfg.distill, self.cfg.data
        return DistillAlgorithm(self.tokenizer().pad_id, divergence=str(s.divergence), beta=s.beta,
                                temperature=s.temperature, top_k=s.top_k, top_k_tail=s.top_k_tail,
                                kd_weight=s.kd_weight, sft_weight=s.sft_weight, lmbda=s.lmbda,
                                responses=str(s.responses), packing=d.packing, capacity=d.max_length)

    def prepare(self):
        # the roles are megatron-core: loaded when a run starts, not at config checks
        from aligner.training.roles import FrozenRole, RoleSet

        algo, policy, train, val, _ = super().prepare()
        tc = self.teacher_config()
        mc = self.model_config()
        # kernels, and the padded vocabulary: the student's, so that both give [b, s, v/p] logits alike
        tc.layer_spec, tc.make_vocab_size_divisible_by = mc.layer_spec, mc.make_vocab_size_divisible_by
        roles = RoleSet()
        algo.teacher = FrozenRole("teacher", self.build_models(model_cfg=tc, hf=self.cfg.distill.teacher))
        if self.cfg.distill.precompute:
            algo.topk_file = Path(self.cfg.trainer.out_dir) / "teacher_topk.pt"
        roles.add(algo.teacher)
        if self.cfg.distill.responses == Responses.teacher:
            s = self.cfg.distill
            gen = generation_config(s.teacher_generation, self.cfg.trainer.seed, [self.tokenizer().eos_id])
            # prompt + response within data.max_length, as the rows are
            algo.teacher_maker = ExperienceMaker(gen, None, self.tokenizer(),
                                                 max_seq_len=min(self.cfg.data.max_length, tc.max_position_embeddings),
                                                 max_batch=s.teacher_generation.max_batch,
                                                 continuous_batching=s.teacher_generation.continuous_batching)
            algo.responses_file = Path(self.cfg.trainer.out_dir) / TEACHER_RESPONSES
        if self.cfg.distill.lmbda > 0:
            s = self.cfg.distill
            gen = generation_config(s.generation, self.cfg.trainer.seed, [self.tokenizer().eos_id])
            algo.maker = ExperienceMaker(gen, None, self.tokenizer(), max_batch=s.generation.max_batch,
                                         continuous_batching=s.generation.continuous_batching)
        return algo, policy, train, val, {"roles": roles}
