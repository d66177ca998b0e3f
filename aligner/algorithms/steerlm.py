"""SteerLM 2.0 on the shared loop (docs/steerlm.md; Wang et al., HelpSteer2 / SteerLM 2.0,
arXiv 2406.08673).

A sample is one prompt ``x`` with its attribute string ``a`` and a group of ``n`` responses
``y_i`` sampled from the SteerLM model Q', each carrying three sequence log-probs:
``log P(a|x,y_i)`` (the regression reward model through the Beta model,
:func:`aligner.algorithms.losses.steerlm.attribute_log_likelihood`), ``log P(y_i|x)`` (the
SFT model, the prompt rendered without the attribute turn) and ``log Q'(y_i|a,x)`` (Q').
The model being trained, Q_θ, starts from Q'.

Per group, with ``w'_i = softmax(log P(a|x,y_i) + log P(y_i|x) − log Q'(y_i|a,x))`` and the
baseline ``b'_i = softmax(log Q_θ(y_i|a,x) − log Q'(y_i|a,x))`` recomputed at every step
without gradient, the loss is

    ``L = (1/G) Σ_groups Σ_i (w'_i − b'_i) · (−log Q_θ(y_i|a,x)) / T̄``

with ``G`` the groups and ``T̄`` the mean number of response tokens of the GLOBAL batch.
It is computed as ``Σ_groups n_g Σ_i (w'_i − b'_i)(−log Q_θ(y_i|a,x))`` per micro-batch
with the micro-batch's response-token count as the loss count: megatron-core divides
the gradients by the count summed over micro-batches and data-parallel ranks (the loop's
per-token normalisation), i.e. by the step's global token count ``G·n·T̄``, so micro-batch
size, gradient accumulation and the layout never change the objective (equal to the
formula above when every group has n responses; groups of unequal size weigh by their
size). All responses of a group share a micro-batch (they are one sample), so the
within-group softmaxes are exact under every layout. Logged: ``kl_w_b`` =
``Σ_i w'_i log(w'_i / b'_i)`` per group (the distance of the current model's weighting
from the target's), ``weight_max``.

Two ways to train (``aligner train steerlm2``, :class:`SteerLM2Trainer`):

- **pre-scored** (``data.train`` in the predecessor's ``steerlm2`` format: ``system``,
  ``prompt_turns``, ``label``, ``responses[]`` each with ``value``, ``log(P(a|x,y))``,
  ``log(P(y|x))``, ``log(Q(y|a,x))``): the groups train as they are (:func:`load_steerlm2`),
  ``steerlm2.epochs`` epochs, no sampling;
- **sampling** (``data.train`` a prompt file): ``steerlm2.iterations`` iterations of
  ``steerlm2.epochs`` epochs, all in one run. At the first step of an iteration every
  (prompt, attribute string) group is sampled ``n`` times from the current model (the
  newest Q') with the rollout engine, the responses are scored by the regression reward
  model (``log P(a|x,y)``), the SFT model (``log P(y|x)``) and Q' itself
  (``log Q'(y|a,x)``, the training path's forward), and written to the run folder
  (``steerlm2_samples/iteration_<k>.jsonl``, atomically; the file is itself a pre-scored
  ``steerlm2`` file). A resumed run reads the iteration's file back (its digest is in the
  checkpoint), so it continues in the same iteration with the same samples.

Responses are rendered with the SteerLM template (the attribute string after the
assistant header, ``<extra_id_2>{a}``), loss on response tokens; the sequence log-prob of a
response is the sum over its target tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import MISSING

from aligner.algorithms.online import GenerationSection, ReferenceMode
from aligner.algorithms.losses.steerlm import attribute_log_likelihood, steerlm2_weights
from aligner.algorithms.sft import TokenAlgorithm
from aligner.algorithms.trainers import _BaseTrainer, register_trainer
from aligner.data.formats import STEERLM_DEFAULT_LABEL
from aligner.training.algorithm import StepContext, metric
from aligner.training.batching import fill_rows, filler_microbatch, per_item_sum, shifted_logprobs
from aligner.training.config import ConfigError, InitSection, RunConfig, Template


def load_steerlm2(path, tokenizer, max_length: int = 4096, overlong: str = "truncate_left",
                  skip_invalid: bool = False) -> Sequence[dict]:
    """Pre-scored SteerLM 2.0 rows -> samples ``{"responses": [(tokens, loss_mask)],
    "log_p_attr", "log_p_sft", "log_q_prime": [n] float64, "line", "index"}`` (the data
    layer's ``steerlm2`` kind, mapped from prepared files).

    A response that does not fit ``max_length`` after the over-length policy drops its whole
    group (the group's softmaxes need every member); drops are counted and printed.
    """
    from aligner.data import load_dataset

    return load_dataset(path, "steerlm2", tokenizer, template="extra_id", max_length=max_length, overlong=overlong,
                        skip_invalid=skip_invalid)


class SteerLM2Algorithm(TokenAlgorithm):
    """The SteerLM 2.0 objective over groups of scored responses (module docstring).

    Without ``sampler`` the loop runs its own step over pre-scored groups. With a
    :class:`SteerLM2Sampler` the algorithm owns its step: ``steps_per_iteration`` steps per
    iteration, the iteration's groups sampled and scored at its first step (or read back
    from ``samples_dir`` on resume).
    """

    name = "steerlm2"

    def __init__(self, pad_id: int, *, packing: bool = False, capacity: Optional[int] = None,
                 sampler: Optional["SteerLM2Sampler"] = None, steps_per_iteration: Optional[int] = None,
                 samples_dir=None):
        super().__init__(pad_id, packing, capacity)
        self.sampler = sampler
        self.owns_step = sampler is not None
        self.steps_per_iteration = steps_per_iteration
        self.samples_dir = Path(samples_dir) if samples_dir is not None else None
        self._iteration: Optional[int] = None  # the iteration whose groups are in memory
        self._groups: Dict[int, dict] = {}
        self._sampling_metrics: Dict[str, float] = {}
        self._digest: Optional[str] = None
        self._resume_digests: Dict[int, str] = {}  # iteration -> digest of its samples (from a checkpoint)

    # ---------------------------------------------------------------- batches and loss
    def groups(self, sample):
        return list(sample["responses"])

    def attach(self, batch, samples):
        sizes = torch.tensor([len(s["responses"]) for s in samples])
        batch["group_ids"] = torch.repeat_interleave(torch.arange(len(samples)), sizes)
        batch["group_sizes"] = torch.repeat_interleave(sizes, sizes).double()
        for key in ("log_p_attr", "log_p_sft", "log_q_prime"):
            batch[key] = torch.cat([s[key] for s in samples])
        batch["num_groups"] = len(samples)
        return batch

    def loss(self, batch, logits):
        if batch.get("filler"):  # a zero-weight micro-batch (interleaved pipelining)
            return logits.reshape(-1)[:1].sum() * 0.0, 0, {}
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        policy_logps = per_item_sum(lp * mask, batch)
        num_tokens = per_item_sum(mask, batch)
        dev = policy_logps.device
        ids = batch["group_ids"].to(dev)
        g = int(batch["num_groups"])
        w, b = steerlm2_weights(batch["log_p_attr"].to(dev), batch["log_p_sft"].to(dev),
                                batch["log_q_prime"].to(dev), policy_logps, ids)
        # n_g (w' − b') NLL summed; the count is the response tokens, so megatron-core's division
        # by the step's global token count makes it (1/G) Σ (w' − b') NLL / T̄ (module docstring)
        sizes = batch["group_sizes"].to(dev).to(policy_logps.dtype)
        total = ((w - b).to(policy_logps.dtype) * sizes * -policy_logps).sum()
        count = num_tokens.sum()
        with torch.no_grad():
            wd, bd = w.double(), b.double()
            terms = torch.where(wd > 0, wd * (wd.log() - bd.log()), torch.zeros_like(wd))
            kl = torch.zeros(g, dtype=torch.float64, device=wd.device).index_add(0, ids, terms)
            w_max = torch.zeros(g, dtype=torch.float64, device=wd.device).scatter_reduce(
                0, ids, wd, reduce="amax", include_self=False)
        metrics = {
            "loss": metric(total, count),
            "kl_w_b": metric(kl.sum(), g),
            "weight_max": metric(w_max.sum(), g),
            "response_tokens": metric(count, num_tokens.numel()),
        }
        return total, count.round().long(), metrics

    # ---------------------------------------------------------------- the sampling step
    def state_dict(self) -> dict:
        if self._iteration is None or self._digest is None:
            return {}
        return {"iteration": self._iteration, "samples_sha256": self._digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("samples_sha256"):
            self._resume_digests[int(state["iteration"])] = state["samples_sha256"]

    def samples_path(self, iteration: int) -> Path:
        return self.samples_dir / f"iteration_{iteration}.jsonl"

    def iteration_groups(self, context: StepContext, iteration: int) -> None:
        """The iteration's scored groups in memory: read back on resume, else sampled and saved."""
        import torch.distributed as dist

        if self._iteration == iteration:
            return
        t0 = time.perf_counter()
        path = self.samples_path(iteration)
        expected = self._resume_digests.pop(iteration, None)
        if expected is not None:  # a resumed run: the very samples this iteration started with
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint continues SteerLM 2.0 iteration {iteration}, but its"
                                        " samples are missing from the run folder")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"{path}: differs from the samples SteerLM 2.0 iteration {iteration} was trained on"
                                 " (its digest is recorded in the checkpoint)")
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            self.sampler.check_rows(rows, path)
            digest = expected
        else:
            rows = self.sampler.sample(context, iteration)
            data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
            digest = hashlib.sha256(data).hexdigest()
            if dist.get_rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            # the rows as the file holds them (floats round-trip exactly through JSON), so a
            # fresh and a resumed run train on bit-identical values
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        self._groups = {int(r["index"]): self.sampler.to_sample(r) for r in rows}
        self._sampling_metrics = self.sampler.metrics(rows)
        self._sampling_metrics["time/sampling"] = time.perf_counter() - t0
        self._iteration, self._digest = iteration, digest

    def train_step(self, context: StepContext) -> Dict[str, float]:
        from megatron.core import parallel_state as ps

        from aligner.algorithms.experience import reduce_metric_store

        t0 = time.perf_counter()
        iteration, within = divmod(context.step, self.steps_per_iteration)
        self.iteration_groups(context, iteration)
        samples = [self._groups[int(s["index"])] for s in context.samples]
        local = [self._groups[int(s["index"])] for s in context.local_samples]
        multiple = 8 * ps.get_tensor_model_parallel_world_size()
        seq_length = int(math.ceil(max(self.sample_length(s) for s in samples) / multiple) * multiple)
        micro = self.microbatches(local, context.micro_batch_size, seq_length)
        rows = max(b["tokens"].shape[0] for b in micro)
        micro = [fill_rows(b, rows) for b in micro]
        policy = context.roles["policy"]
        if len(policy.chunks) > 1:  # the interleaved schedule takes a multiple of the pipeline size
            micro += [filler_microbatch(micro[-1]) for _ in range(-len(micro) % ps.get_pipeline_model_parallel_world_size())]
        policy.train()
        policy.zero_grad()
        lr = policy.lr
        store = context.run_schedule(policy.chunks, micro, self.forward, self.loss, forward_only=False)
        ok, grad_norm = policy.step()
        metrics = reduce_metric_store(store, context)
        metrics.update(self._sampling_metrics)
        metrics.update(iteration=float(iteration), epoch=float(within // (self.steps_per_iteration
                                                                          // self.sampler.epochs)),
                       lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       skipped=0.0 if ok else 1.0, step_time=time.perf_counter() - t0)
        self._sampling_metrics = {k: v for k, v in self._sampling_metrics.items() if not k.startswith("time/")}
        return metrics


class SteerLM2Sampler:
    """Samples and scores one iteration's groups (module docstring, "sampling").

    prompts: the (prompt, attribute string) groups, each ``{"index", "prompt_tokens"
    (rendered with the attribute turn), "sft_prompt_tokens" (without it), "prompt",
    "meta", "conversation", "label"}``. maker: an
    :class:`aligner.algorithms.experience.ExperienceMaker` with ``samples_per_prompt = n``
    and the regression reward model as its reward source (attribute scores per response).
    sft: a :class:`aligner.training.roles.ReferencePolicy` holding the SFT model.
    """

    def __init__(self, prompts: Sequence[dict], maker, sft, attributes: Sequence[str], *, epochs: int,
                 concentration: float = 24.0, max_value: float = 4.0):
        from aligner.data.formats import parse_attribute_label

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
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from aligner.algorithms.experience import collect_token_outputs, policy_logps

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
        multiple = 8 * ps.get_tensor_model_parallel_world_size()
        width = int(math.ceil(max(len(r) for r in sft_rows) / multiple) * multiple) if n else multiple
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
        if context.dp_size > 1:
            gathered = [None] * context.dp_size
            dist.all_gather_object(gathered, rows, group=ps.get_data_parallel_group())
            rows = [r for part in gathered for r in part]
        return rows

    def check_rows(self, rows: List[dict], path) -> None:
        """A samples file read back must hold every group of this run, n responses each."""
        got = sorted(int(r["index"]) for r in rows)
        if got != sorted(self.by_index):
            raise ValueError(f"{path}: holds groups {got[:5]}... ({len(got)}); this run has {len(self.by_index)}")
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


# ------------------------------------------------------------------------------ config
def _register_epochs_resolver() -> None:
    """``${steerlm2_epochs:${steerlm2.iterations},${steerlm2.epochs}}`` in conf/steerlm2.yaml:
    the run's epochs follow the iterations and epochs per iteration a user overrides."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("steerlm2_epochs", lambda iterations, epochs: int(iterations) * int(epochs),
                                    replace=True)


_register_epochs_resolver()


@dataclass
class SteerLM2Section:
    """``steerlm2``: SteerLM 2.0 (docs/steerlm.md).

    iterations: sample-then-train rounds (each samples from the newest model; 1 with a
    pre-scored file). epochs: passes over an iteration's groups. samples_per_prompt: n
    responses per (prompt, attribute string). targets: the attribute strings a prompt row
    without a ``label`` is sampled for (one group each). sft_model: HF folder of the SFT
    model P(y|x); sft_mode: ``host`` (its weights in host memory, swapped into the policy's
    modules for its forward) or ``model`` (a second model); same architecture as init.hf.
    reward_model: HF folder of the regression reward model for P(a|x,y); concentration:
    the Beta model's α + β (24).
    """

    iterations: int = 2
    epochs: int = 2
    samples_per_prompt: int = 10
    targets: List[str] = field(default_factory=lambda: [STEERLM_DEFAULT_LABEL])
    sft_model: Optional[str] = None
    sft_mode: ReferenceMode = ReferenceMode.host
    reward_model: Optional[str] = None
    reward_micro_batch_size: int = 8
    concentration: float = 24.0
    # the paper samples Q' at temperature 0.7, top-p 0.9
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(temperature=0.7, top_p=0.9))


@dataclass
class SteerLM2Config(RunConfig):
    """SteerLM 2.0, from a SteerLM model (``init.hf`` required)."""

    algorithm: str = "steerlm2"
    init: InitSection = field(default_factory=lambda: InitSection(hf=MISSING))
    steerlm2: SteerLM2Section = field(default_factory=SteerLM2Section)


# ------------------------------------------------------------------------------ trainer
@register_trainer("steerlm2")
class SteerLM2Trainer(_BaseTrainer):
    """``aligner train steerlm2``: pre-scored groups, or sampling iterations (module docstring)."""

    schema = SteerLM2Config
    data_kind = "prompts"
    PROMPT_FORMATS = ("steerlm2", "prompt", "sft", "openai", "steerlm", "helpsteer2", "helpsteer2_preference",
                      "pairwise", "rewardbench")

    def __init__(self, cfg):
        from omegaconf import DictConfig, OmegaConf

        # the run's length is steerlm2.iterations x steerlm2.epochs epochs (trainer.max_steps,
        # if set >= 0, can only cut it short): trainer.max_epochs is derived, before validation
        if not isinstance(cfg, (DictConfig, dict)):
            cfg = OmegaConf.structured(cfg)
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
        section = OmegaConf.select(cfg, "steerlm2") or {}
        try:
            counts = {key: int(section.get(key, getattr(SteerLM2Section, key))) for key in ("iterations", "epochs")}
        except (TypeError, ValueError):
            counts = None  # a wrong type: validation names the key
        for key, value in (counts or {}).items():
            if value < 1:
                raise ConfigError(f"steerlm2.{key} = {value}: expected >= 1")
        if counts is not None:
            total = counts["iterations"] * counts["epochs"]
            given = OmegaConf.select(cfg, "trainer.max_epochs")
            if given is not None and given != total:
                raise ConfigError(f"trainer.max_epochs = {given}: SteerLM 2.0 runs steerlm2.iterations x"
                                  f" steerlm2.epochs = {total} epochs", hint="remove the override")
            OmegaConf.update(cfg, "trainer.max_epochs", total, force_add=True)
        super().__init__(cfg)

    @classmethod
    def check(cls, cfg):
        s = cfg.steerlm2
        for key in ("iterations", "epochs", "samples_per_prompt"):
            if s[key] < 1:
                raise ConfigError(f"steerlm2.{key} = {s[key]}: expected >= 1")
        if s.samples_per_prompt < 2:
            raise ConfigError(f"steerlm2.samples_per_prompt = {s.samples_per_prompt}: the weights are a softmax"
                              " within a group, which needs at least 2 responses")
        if cfg.data.template not in (Template.auto, Template.extra_id):
            raise ConfigError(f"data.template = {str(cfg.data.template)!r}: SteerLM attribute strings render only in"
                              " the extra_id template", hint="set data.template=extra_id")
        if not s.concentration > 0:
            raise ConfigError(f"steerlm2.concentration = {s.concentration}: expected > 0")
        from aligner.data.formats import parse_attribute_label

        for i, label in enumerate(s.targets):
            try:
                levels = parse_attribute_label(label)
            except ValueError:
                levels = None
            if not levels or any(not name or not 0 <= v <= 4 for name, v in levels.items()):
                raise ConfigError(f"steerlm2.targets[{i}] = {label!r}: expected name:value pairs with values 0..4,"
                                  f" such as {STEERLM_DEFAULT_LABEL!r}")

    def train_format(self) -> str:
        from aligner.data.loading import source_format

        d = self.cfg.data
        fmt = source_format(d.train, d.format, self.PROMPT_FORMATS)
        if fmt is None:
            raise ConfigError(f"data.train = {d.train!r}: no rows")
        return fmt

    @property
    def sampling(self) -> bool:
        return self.train_format() != "steerlm2"

    def check_data_rows(self) -> None:
        from aligner.data.loading import check_dataset

        d, s = self.cfg.data, self.cfg.steerlm2
        check_dataset(d.train, "prompts" if self.sampling else "steerlm2", d.format, d.skip_invalid)
        if d.validation is not None:
            check_dataset(d.validation, "steerlm2", "auto", d.skip_invalid)
        if self.sampling:
            for key in ("sft_model", "reward_model"):
                path = s[key]
                if not path:
                    raise ConfigError(f"steerlm2.{key} is not set: sampling (data.train is a prompt file) needs it",
                                      hint="an HF folder; or give data.train a pre-scored steerlm2 file")
                if not (Path(path) / "config.json").is_file():
                    raise ConfigError(f"steerlm2.{key} = {path!r}: not an HF model folder (no config.json)")
        elif s.iterations != 1:
            raise ConfigError(f"steerlm2.iterations = {s.iterations}: data.train is a pre-scored steerlm2 file, which"
                              " is one iteration (the next would sample from the trained model)",
                              hint="set steerlm2.iterations=1, or give data.train a prompt file")

    def load_validation(self):
        d = self.cfg.data
        if d.validation is None:
            return None
        return load_steerlm2(d.validation, self.tokenizer(), d.max_length, d.overlong, d.skip_invalid)

    def prepare(self):
        d = self.cfg.data
        if not self.sampling:
            train = load_steerlm2(d.train, self.tokenizer(), d.max_length, d.overlong, d.skip_invalid)
            algo = SteerLM2Algorithm(self.tokenizer().pad_id)
            return algo, self.build_models(), train, self.load_validation(), {}
        prompts = self.prompt_groups()
        policy = self.build_models()
        roles, algo = self.build_sampling(policy, prompts)
        return algo, policy, prompts, self.load_validation(), {"roles": roles}

    def prompt_groups(self) -> List[dict]:
        """The (prompt, attribute string) groups: a row's own ``label``, else one group per
        ``steerlm2.targets`` entry; prompt tokens with and without the attribute turn."""
        from aligner.data import load_dataset
        from aligner.data.datasets import render_extra_id

        d, s = self.cfg.data, self.cfg.steerlm2
        tok = self.tokenizer()
        rows = load_dataset(d.train, kind="prompts", tokenizer=tok, fmt=d.format, template="extra_id",
                            skip_invalid=d.skip_invalid)
        limit = self.model_config().max_position_embeddings
        groups = []
        for line, row in enumerate(rows):
            for label in ([row["label"]] if row.get("label") else list(s.targets)):
                conv = row["conversation"]
                tokens = torch.tensor(render_extra_id(tok, conv, label=label)[0], dtype=torch.long)
                if len(tokens) >= limit:
                    raise ValueError(f"{d.train}: row {line + 1} has a prompt of {len(tokens)} tokens; prompt +"
                                     f" response must fit model.max_position_embeddings = {limit} tokens")
                groups.append({"index": len(groups), "prompt_tokens": tokens, "label": label,
                               "sft_prompt_tokens": torch.tensor(render_extra_id(tok, conv)[0], dtype=torch.long),
                               "prompt": row["prompt"], "conversation": conv,
                               "meta": dict(row["meta"], label=label)})
        return groups

    def build_sampling(self, policy_models, prompts):
        """The SFT reference (before any training or resume), the reward model, the sampler."""
        from aligner.algorithms.experience import ExperienceMaker
        from aligner.models import ModelConfig, load_hf_weights
        from aligner.models.hf import read_export_metadata
        from aligner.rewards import RewardModel
        from aligner.rollout import GenerationConfig
        from aligner.training.roles import ReferencePolicy, RoleSet

        s, t = self.cfg.steerlm2, self.cfg.trainer
        mc = self.model_config()
        sft_cfg = ModelConfig.from_hf(s.sft_model)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "vocab_size"):
            if getattr(sft_cfg, key) != getattr(mc, key):
                raise ConfigError(f"steerlm2.sft_model = {s.sft_model!r}: {key} = {getattr(sft_cfg, key)} differs"
                                  f" from init.hf's {getattr(mc, key)}; the SFT model must share the architecture")
        roles = RoleSet()
        if s.sft_mode == "host":
            # the SFT weights, snapshot in host memory, then the SteerLM weights back in the policy
            load_hf_weights(policy_models, s.sft_model, mc)
            sft = ReferencePolicy(policy_models, "host")
            load_hf_weights(policy_models, self.cfg.init.hf, mc)
        else:
            sft_models = self.build_models()
            load_hf_weights(sft_models, s.sft_model, mc)
            sft = ReferencePolicy(policy_models, "model", reference_chunks=sft_models)
            roles.add(sft.role)
        roles.reference = sft
        names = read_export_metadata(s.reward_model).get("labels")
        if not names:
            raise ConfigError(f"steerlm2.reward_model = {s.reward_model!r}: its head's outputs have no attribute names"
                              " (config.json id2label); SteerLM 2.0 matches them to the attribute strings")
        reward = RewardModel(s.reward_model, self.tokenizer(), attributes=names, reward_attribute=names[0],
                             micro_batch_size=s.reward_micro_batch_size)
        roles.add(reward.role)
        g = s.generation
        gen = GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                               top_p=g.top_p, seed=t.seed if g.seed is None else g.seed,
                               stop_token_ids=[self.tokenizer().eos_id])
        maker = ExperienceMaker(gen, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                max_batch=g.max_batch)
        sampler = SteerLM2Sampler(prompts, maker, sft, names, epochs=s.epochs, concentration=s.concentration)
        steps_per_epoch = len(prompts) // t.global_batch_size
        if steps_per_epoch < 1:
            raise ConfigError(f"data.train gives {len(prompts)} (prompt, attribute string) groups, fewer than"
                              f" trainer.global_batch_size = {t.global_batch_size}")
        algo = SteerLM2Algorithm(self.tokenizer().pad_id, sampler=sampler,
                                 steps_per_iteration=steps_per_epoch * s.epochs,
                                 samples_dir=Path(t.out_dir) / "steerlm2_samples")
        return roles, algo
