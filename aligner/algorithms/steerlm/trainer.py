"""SteerLM 2.0's config section and trainer, ``aligner train steerlm2`` (docs/steerlm.md):
a pre-scored ``steerlm2`` file trains as it is (:func:`load_steerlm2`,
:class:`~aligner.algorithms.steerlm.algorithm.SteerLM2Algorithm`); a prompt file is sampled
and scored iteration after iteration in one run
(:class:`~aligner.algorithms.steerlm.algorithm.IterativeSteerLM2Algorithm`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from aligner.algorithms.base import RunConfig, Trainer, init_from_hf
from aligner.algorithms.iterative import derive_iteration_epochs
from aligner.algorithms.online import ExperienceMaker, GenerationSection, ReferenceMode, generation_config
from aligner.algorithms.registry import register_trainer
from aligner.algorithms.steerlm.algorithm import IterativeSteerLM2Algorithm, SteerLM2Algorithm
from aligner.algorithms.steerlm.sampler import SteerLM2Sampler
from aligner.config import ConfigError
from aligner.data.datasets import render_extra_id
from aligner.data.loading import check_dataset, load_dataset, source_format
from aligner.data.formats import STEERLM_DEFAULT_LABEL, parse_attribute_label
from aligner.models.config import ModelConfig
from aligner.rewards.sources import RewardModel
from aligner.training.config import InitSection, Template
from aligner.training.roles import ReferencePolicy, RoleSet


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
        ``steerlm2.targets`` entry; prompt tokens with and without the attribute turn."""
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
                    raise ConfigError(f"{rows.where(line)}: the row has a prompt of {len(tokens)} tokens; prompt +"
                                      f" response must fit the model's max_position_embeddings = {limit} tokens",
                                      hint="shorten the prompt or leave the row out")
                groups.append({"index": len(groups), "prompt_tokens": tokens, "label": label,
                               "sft_prompt_tokens": torch.tensor(render_extra_id(tok, conv)[0], dtype=torch.long),
                               "prompt": row["prompt"], "conversation": conv,
                               "meta": dict(row["meta"], label=label)})
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
                                max_batch=s.generation.max_batch)
        sampler = SteerLM2Sampler(prompts, maker, sft, names, epochs=s.epochs, concentration=s.concentration)
        self.check_train_size(len(prompts), "(prompt, attribute string) groups")
        steps_per_epoch = len(prompts) // t.global_batch_size
        algo = IterativeSteerLM2Algorithm(self.tokenizer().pad_id, sampler=sampler,
                                          steps_per_iteration=steps_per_epoch * s.epochs,
                                          samples_dir=Path(t.out_dir) / "steerlm2_samples")
        return roles, algo
