"""SteerLM 2.0 (docs/steerlm.md; Wang et al., HelpSteer2, arXiv 2406.08673), ``aligner train
steerlm2``: its config section, the objective as an algorithm and its trainer.

A pre-scored ``steerlm2`` file trains as it is (:func:`load_steerlm2`,
:class:`SteerLM2Algorithm`: the loop runs its step); a prompt file is sampled and scored
iteration after iteration in one run (:class:`IterativeSteerLM2Algorithm` owns its step
and, at the first step of each iteration, samples and scores the iteration's groups from
the current model with :class:`SteerLM2Sampler`, writes them to the run folder and reads
them back on resume). The loss is :func:`aligner.algorithms.losses.steerlm.steerlm2_loss`
over the global batch.

The sampling (docs/steerlm.md, "sampling"): each (prompt, attribute string) group sampled
``n`` times from the current model with the rollout engine, scored by the regression
reward model (``log P(a|x,y)``, the Beta model), the SFT model (``log P(y|x)``) and the
model itself (``log Q'(y|a,x)``); the rows of the iteration's samples file (itself a
pre-scored ``steerlm2`` file).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from aligner.algorithms.base import RunConfig, TokenAlgorithm, Trainer, init_from_hf, register_trainer
from aligner.algorithms.iterative import IterativeAlgorithm, check_row_indices, derive_iteration_epochs, gather_rows
from aligner.algorithms.losses.steerlm import attribute_log_likelihood, steerlm2_loss
from aligner.algorithms.online import ExperienceMaker, GenerationSection, ReferenceMode, generation_config
from aligner.config import ConfigError
from aligner.data.datasets import NO_BOUND, fit_prompt, print_report, render_extra_id
from aligner.data.formats import STEERLM_DEFAULT_LABEL, parse_attribute_label
from aligner.data.loading import check_dataset, load_dataset, source_format
from aligner.models.config import ModelConfig
from aligner.parallel import padded_length
from aligner.rewards.sources import RewardModel
from aligner.training.algorithm import StepContext
from aligner.training.batching import per_item_sum, shifted_logprobs
from aligner.training.config import InitSection, Template
from aligner.training.forward import collect_token_outputs, policy_logps
from aligner.training.metrics import metric
from aligner.training.roles import ReferencePolicy, RoleSet


# ------------------------------------------------------------------------------ config and data
def load_steerlm2(path, tokenizer, max_length: int = 4096, overlong: str = "truncate_left",
                  skip_invalid: bool = False) -> Sequence[dict]:
    """Pre-scored SteerLM 2.0 rows -> samples ``{"responses": [(tokens, loss_mask)],
    "log_p_attr", "log_p_sft", "log_q_prime": [n] float64, "line", "index"}`` (the data
    layer's ``steerlm2`` kind, mapped from prepared files).

    A response that does not fit ``max_length`` after the over-length policy drops its whole
    group (the group's softmaxes need every member); drops are counted and printed.
    """
    return load_dataset(path, "steerlm2", tokenizer, template="extra_id", max_length=max_length, overlong=overlong,
                        skip_invalid=skip_invalid)


@dataclass
class SteerLM2Section:
    """``steerlm2``: SteerLM 2.0 (docs/steerlm.md)."""

    iterations: int = 2  # sample-then-train rounds, each from the newest model (1 with a pre-scored file)
    epochs: int = 2  # passes over an iteration's groups
    samples_per_prompt: int = 10  # n responses per (prompt, attribute string)
    # the attribute strings a prompt row without a label is sampled for (one group each)
    targets: List[str] = field(default_factory=lambda: [STEERLM_DEFAULT_LABEL])
    sft_model: Optional[str] = None  # HF folder of the SFT model P(y|x), the architecture of init.hf
    sft_mode: ReferenceMode = ReferenceMode.host  # host (its weights swapped in) | model (a second model)
    reward_model: Optional[str] = None  # HF folder of the regression reward model for P(a|x,y)
    reward_micro_batch_size: int = 8
    concentration: float = 24.0  # the Beta model's α + β
    # the paper samples Q' at temperature 0.7, top-p 0.9
    generation: GenerationSection = field(default_factory=lambda: GenerationSection(temperature=0.7, top_p=0.9))


@dataclass
class SteerLM2Config(RunConfig):
    """SteerLM 2.0, from a SteerLM model (``init.hf`` required)."""

    algorithm: str = "steerlm2"
    init: InitSection = field(default_factory=init_from_hf)
    steerlm2: SteerLM2Section = field(default_factory=SteerLM2Section)


def check_steerlm2_section(s, data, key: str = "steerlm2") -> None:
    """The ``steerlm2`` section with the data template (ConfigError naming the key)."""
    for name in ("iterations", "epochs", "samples_per_prompt"):
        if s[name] < 1:
            raise ConfigError(f"{key}.{name} = {s[name]}: expected >= 1")
    if s.samples_per_prompt < 2:
        raise ConfigError(f"{key}.samples_per_prompt = {s.samples_per_prompt}: the weights are a softmax"
                          " within a group, which needs at least 2 responses")
    if data.template not in (Template.auto, Template.extra_id):
        raise ConfigError(f"data.template = {str(data.template)!r}: SteerLM attribute strings render only in"
                          " the extra_id template", hint="set data.template=extra_id")
    if s.reward_micro_batch_size < 1:
        raise ConfigError(f"{key}.reward_micro_batch_size = {s.reward_micro_batch_size}: expected >= 1")
    if not s.concentration > 0:
        raise ConfigError(f"{key}.concentration = {s.concentration}: expected > 0")
    for i, label in enumerate(s.targets):
        try:
            levels = parse_attribute_label(label)
        except ValueError:
            levels = None
        if not levels or any(not name or not 0 <= v <= 4 for name, v in levels.items()):
            raise ConfigError(f"{key}.targets[{i}] = {label!r}: expected name:value pairs with values 0..4,"
                              f" such as {STEERLM_DEFAULT_LABEL!r}")


# ------------------------------------------------------------------------------ algorithm
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

    def loss_count(self, batch):
        return int(per_item_sum(batch["loss_mask"], batch).sum().round())  # response tokens

    def loss(self, batch, logits):
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


# ------------------------------------------------------------------------------ sampling
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


# ------------------------------------------------------------------------------ trainer
@register_trainer("steerlm2")
class SteerLM2Trainer(Trainer):
    """``aligner train steerlm2``: pre-scored groups, or sampling iterations (module docstring)."""

    schema = SteerLM2Config
    data_kind = "prompts"
    PROMPT_FORMATS = ("steerlm2", "prompt", "sft", "openai", "steerlm", "helpsteer2", "helpsteer2_preference",
                      "pairwise", "rewardbench")

    @classmethod
    def check(cls, cfg):
        check_steerlm2_section(cfg.steerlm2, cfg.data)

    @classmethod
    def derive(cls, cfg):
        """The run's length is steerlm2.iterations x steerlm2.epochs epochs (trainer.max_steps,
        if set >= 0, can only cut it short): trainer.max_epochs is derived, before validation."""
        return derive_iteration_epochs(cfg, "steerlm2", SteerLM2Section, "SteerLM 2.0")

    def train_format(self) -> str:
        d = self.cfg.data
        fmt = source_format(d.train, d.format, self.PROMPT_FORMATS)
        if fmt is None:
            raise ConfigError(f"data.train = {d.train!r}: no rows")
        return fmt

    @property
    def sampling(self) -> bool:
        return self.train_format() != "steerlm2"

    def check_data_rows(self) -> None:
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
            self.check_targets()
        elif s.iterations != 1:
            raise ConfigError(f"steerlm2.iterations = {s.iterations}: data.train is a pre-scored steerlm2 file, which"
                              " is one iteration (the next would sample from the trained model)",
                              hint="set steerlm2.iterations=1, or give data.train a prompt file")

    def check_targets(self) -> None:
        """Every attribute a ``steerlm2.targets`` string names is an output of the reward
        model (which measures it): a ConfigError naming the entry and the outputs."""
        # the export's records are read by the models layer (megatron-core): loaded at preflight
        from aligner.models.hf import read_export_metadata

        s = self.cfg.steerlm2
        names = read_export_metadata(s.reward_model).get("labels") or []
        for i, label in enumerate(s.targets):
            unknown = [name for name in parse_attribute_label(label) if name not in names]
            if names and unknown:
                raise ConfigError(f"steerlm2.targets[{i}] = {label!r}: {', '.join(unknown)} is not an output of"
                                  f" steerlm2.reward_model ({', '.join(names)})")

    def load_validation(self):
        d = self.cfg.data
        if d.validation is None:
            return None
        return load_steerlm2(d.validation, self.tokenizer(), d.max_length, d.overlong, d.skip_invalid)

    def prepare(self):
        d = self.cfg.data
        if not self.sampling:
            train = load_steerlm2(d.train, self.tokenizer(), d.max_length, d.overlong, d.skip_invalid)
            self.check_train_size(len(train), "groups")
            algo = SteerLM2Algorithm(self.tokenizer().pad_id)
            return algo, self.build_models(), train, self.load_validation(), {}
        prompts = self.prompt_groups()
        policy = self.build_models()
        roles, algo = self.build_sampling(policy, prompts)
        return algo, policy, prompts, self.load_validation(), {"roles": roles}

    def prompt_groups(self) -> List[dict]:
        """The (prompt, attribute string) groups: a row's own ``label``, else one group per
        ``steerlm2.targets`` entry; prompt tokens with and without the attribute turn.

        A prompt with its attribute turn longer than ``data.max_length`` follows
        ``data.overlong`` as a prompt file's prompts do (docs/data_formats.md, "Length"):
        truncated from the left (the prompt without the attribute turn loses the same
        tokens), dropped, or refused naming the row; the groups dropped or cut are counted
        and reported on one line. The rows are read whole (fitted here, once rendered)."""
        d, s = self.cfg.data, self.cfg.steerlm2
        tok = self.tokenizer()
        rows = load_dataset(d.train, kind="prompts", tokenizer=tok, fmt=d.format, template="extra_id",
                            max_length=NO_BOUND, overlong="error", skip_invalid=d.skip_invalid)
        limit = self.model_config().max_position_embeddings
        groups, counts = [], Counter()
        for line, row in enumerate(rows):
            for label in ([row["label"]] if row.get("label") else list(s.targets)):
                conv = row["conversation"]
                full = render_extra_id(tok, conv, label=label)[0]
                tokens = fit_prompt(full, d.max_length, str(d.overlong), counts, rows.where(line))
                if tokens is None:
                    continue
                if len(tokens) >= limit:
                    raise ConfigError(f"{rows.where(line)}: the row has a prompt of {len(tokens)} tokens; prompt +"
                                      f" response must fit the model's max_position_embeddings = {limit} tokens",
                                      hint=f"shorten the prompt, or set data.max_length below {limit} so that"
                                           f" data.overlong applies")
                cut = len(full) - len(tokens)  # the same tokens off the prompt without the attribute turn
                groups.append({"index": len(groups), "prompt_tokens": torch.tensor(tokens, dtype=torch.long),
                               "label": label,
                               "sft_prompt_tokens": torch.tensor(render_extra_id(tok, conv)[0][cut:], dtype=torch.long),
                               "prompt": row["prompt"], "conversation": conv,
                               "meta": dict(row["meta"], label=label)})
        print_report(d.train, len(groups), counts, unit="prompt groups")
        if not groups:
            raise ConfigError(f"data.train = {d.train!r}: no prompt group fits data.max_length = {d.max_length}"
                              f" ({dict(counts)})")
        return groups

    def build_sampling(self, policy_models, prompts):
        """The SFT reference (before any training or resume), the reward model, the sampler."""
        # the models (megatron-core) load when a run starts, not at config checks
        from aligner.models.hf import load_hf_weights, read_export_metadata

        s, t = self.cfg.steerlm2, self.cfg.trainer
        mc = self.model_config()
        sft_cfg = ModelConfig.from_hf(s.sft_model)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "vocab_size"):
            if getattr(sft_cfg, key) != getattr(mc, key):
                raise ConfigError(f"steerlm2.sft_model = {s.sft_model!r}: {key} = {getattr(sft_cfg, key)} differs"
                                  f" from init.hf's {getattr(mc, key)}; the SFT model must share the architecture")
        roles = RoleSet()
        if s.sft_mode == ReferenceMode.host:
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
        gen = generation_config(s.generation, t.seed, [self.tokenizer().eos_id])
        maker = ExperienceMaker(gen, reward, self.tokenizer(), samples_per_prompt=s.samples_per_prompt,
                                max_batch=s.generation.max_batch,
                                continuous_batching=s.generation.continuous_batching)
        sampler = SteerLM2Sampler(prompts, maker, sft, names, epochs=s.epochs, concentration=s.concentration)
        self.check_train_size(len(prompts), "(prompt, attribute string) groups")
        steps_per_epoch = len(prompts) // t.global_batch_size
        algo = IterativeSteerLM2Algorithm(self.tokenizer().pad_id, sampler=sampler,
                                          steps_per_iteration=steps_per_epoch * s.epochs,
                                          samples_dir=Path(t.out_dir) / "steerlm2_samples")
        return roles, algo
