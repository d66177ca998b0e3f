"""Trainers: one configured algorithm on the shared loop, usable with or without Hydra.

``SFTTrainer(cfg).fit()``, ``RewardModelTrainer(cfg).fit()``, ``DPOTrainer(cfg).fit()``
where ``cfg`` is the composed config (a dict, DictConfig or the dataclass schemas below):
the sections of :class:`aligner.training.config.RunConfig` plus the algorithm's own
(``rm``, ``dpo``). Constructing a trainer checks the config (types, choices, ranges,
combinations); ``fit()`` first checks what needs no process group (required values,
paths, the layout against the world size, the run folder), then initialises the
parallel layout (unless already initialised), loads the tokenizer and data, builds the
model (random init or ``init.hf``) and runs :class:`aligner.training.loop.TrainingLoop`.

A new algorithm registers its trainer with :func:`register_trainer`: its schema becomes
``<name>_schema`` in Hydra's ConfigStore, which its top-level configs in ``conf/`` list
first in their defaults. Config keys: docs/configuration.md. Online algorithms subclass
:class:`OnlineTrainer` (reference, reward source and experience maker built from their
section): ``PPOTrainer`` (aligner.algorithms.ppo) and ``PGTrainer`` (aligner.algorithms.pg).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

from omegaconf import MISSING, DictConfig, OmegaConf

from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.runtime import get_logger, is_rank0
from aligner.training.config import (
    Choice,
    ConfigError,
    InitSection,
    RunConfig,
    Template,
    check_attribute_weights,
    check_required,
    model_fields,
    plain,
    validate_config,
)

log = get_logger(__name__)


# ------------------------------------------------------------------------------ schemas
class RMMode(Choice):
    regression = "regression"
    bt = "bt"


class BTKind(Choice):
    """The kinds :func:`aligner.algorithms.losses.reward.bradley_terry_loss` accepts."""

    regular = "regular"
    margin = "margin"
    scaled = "scaled"


class LossType(Choice):
    """The keys of :data:`aligner.algorithms.losses.preference.PREFERENCE_LOSSES`."""

    dpo = "dpo"
    ipo = "ipo"
    rpo_sq = "rpo_sq"
    rpo_fwd_kl = "rpo_fwd_kl"
    rpo_bwd_kl = "rpo_bwd_kl"
    margin_dpo = "margin_dpo"
    scaled_dpo = "scaled_dpo"


class Reference(Choice):
    precompute = "precompute"
    resident = "resident"


def _init_from_hf() -> InitSection:
    return InitSection(hf=MISSING)


@dataclass
class RMSection:
    """``rm``: reward-model objective (docs/reward_models.md).

    mode: ``regression`` (HelpSteer2 multi-attribute rows, masked MSE; rows rendered with
    the extra_id template) or ``bt`` (Bradley-Terry on preference pairs).
    attributes: the head's outputs in order (regression labels by these names).
    bt_kind (bt only): ``regular`` | ``margin`` | ``scaled``.
    reward_attribute: the head output used as the scalar reward for BT (helpfulness in the
    HelpSteer2-Preference recipes). attribute_weights: one weight per attribute, ``r = w · ŷ``:
    in bt mode the reward the loss compares (instead of ``reward_attribute``); in both modes
    recorded with the HF export as the model's reward for scoring.
    """

    mode: RMMode = RMMode.regression
    attributes: List[str] = field(
        default_factory=lambda: list(HELPSTEER2_ATTRIBUTES)
    )
    bt_kind: BTKind = BTKind.regular
    reward_attribute: str = "helpfulness"
    attribute_weights: Optional[List[float]] = None


@dataclass
class DPOSection:
    """``dpo``: the DPO family (docs/dpo.md).

    loss_type: ``dpo`` | ``ipo`` | ``rpo_sq`` | ``rpo_fwd_kl`` | ``rpo_bwd_kl`` |
    ``margin_dpo`` | ``scaled_dpo``. beta: the KL strength (> 0). average_log_probs: per-token
    mean log-probs instead of sums. sft_weight / preference_weight: weights of the NLL on the
    chosen response and of the preference loss. eta: the RPO losses' reward-gap scale (rpo_*
    only). reference: ``precompute`` (reference log-probs computed once) or ``resident``
    (reference weights kept in host memory).
    """

    loss_type: LossType = LossType.dpo
    beta: float = 0.1
    average_log_probs: bool = False
    sft_weight: float = 0.0
    preference_weight: float = 1.0
    eta: float = 1.0
    reference: Reference = Reference.precompute


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning: the shared sections only (docs/sft.md)."""

    algorithm: str = "sft"


@dataclass
class RMConfig(RunConfig):
    """Reward model, from an HF model (``init.hf`` required)."""

    algorithm: str = "rm"
    init: InitSection = field(default_factory=_init_from_hf)
    rm: RMSection = field(default_factory=RMSection)


@dataclass
class DPOConfig(RunConfig):
    """DPO family, from an SFT model (``init.hf`` required)."""

    algorithm: str = "dpo"
    init: InitSection = field(default_factory=_init_from_hf)
    dpo: DPOSection = field(default_factory=DPOSection)


# ------------------------------------------------------------------------------ registry
TRAINERS: Dict[str, Type["_BaseTrainer"]] = {}


def register_trainer(name: str) -> Callable[[type], type]:
    """Class decorator: ``TRAINERS[name] = cls`` and ``cls.schema`` stored in Hydra's
    ConfigStore as ``<name>_schema`` (the first default of ``conf/<config>.yaml``)."""

    def add(cls):
        from hydra.core.config_store import ConfigStore

        if name in TRAINERS:
            raise ValueError(f"a trainer named {name!r} is already registered")
        cls.name = name
        TRAINERS[name] = cls
        ConfigStore.instance().store(name=f"{name}_schema", node=cls.schema)
        return cls

    return add


# ------------------------------------------------------------------------------ trainers
class _BaseTrainer:
    name = ""
    schema: type = RunConfig
    data_kind = "sft"

    def __init__(self, cfg: Any):
        if not isinstance(cfg, (DictConfig, dict)):
            cfg = OmegaConf.structured(cfg)
        self.typed_cfg = validate_config(cfg, self.schema)
        self.check(self.typed_cfg)
        self.cfg = OmegaConf.create(plain(self.typed_cfg))  # resolved; choices as strings

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Algorithm-specific checks of a composed config (raise ConfigError naming the key)."""

    # ---------------------------------------------------------------- before any process group
    def preflight(self) -> bool:
        """Everything that can be checked without a process group or a model; raises
        ConfigError naming the key. Returns whether the run folder's run will be resumed."""
        from aligner.parallel.state import LayoutError, ParallelConfig, read_dist_env, validate_layout
        from aligner.training.run_folder import check_resume

        check_required(self.typed_cfg, f"aligner train {self.name}")
        c = self.cfg
        self.check_layer_spec()
        if c.init.hf is not None:
            hf = Path(c.init.hf)
            if not hf.is_dir():
                raise ConfigError(f"init.hf = {c.init.hf!r}: no such folder",
                                  hint="init.hf names a Hugging Face model folder (config.json + *.safetensors)")
            if not (hf / "config.json").is_file():
                raise ConfigError(f"init.hf = {c.init.hf!r}: no config.json in that folder",
                                  hint="init.hf names a Hugging Face model folder (config.json + *.safetensors)")
        from aligner.data.loading import dataset_paths

        for key in ("train", "validation"):
            for path in dataset_paths(c.data[key]) if c.data[key] is not None else ():
                if not Path(path).exists():
                    raise ConfigError(f"data.{key} = {path!r}: no such file or folder")
        if c.monitor.enabled:
            if not Path(c.monitor.prompts).is_file():
                raise ConfigError(f"monitor.prompts = {c.monitor.prompts!r}: no such file")
            for i, spec in enumerate(list(c.monitor.proxy) + [c.monitor.gold]):
                name = f"monitor.proxy[{i}]" if i < len(c.monitor.proxy) else "monitor.gold"
                if spec.kind == "model" and not (Path(spec.path) / "config.json").is_file():
                    raise ConfigError(f"{name}.path = {spec.path!r}: not an HF reward-model folder")
        self.check_data_rows()
        if c.data.tokenizer is None and c.init.hf is None:
            raise ConfigError("data.tokenizer is not set and there is no init.hf to take the tokenizer from",
                              hint="set data.tokenizer to an HF tokenizer folder or a SentencePiece .model file")
        if c.data.tokenizer is not None and not Path(c.data.tokenizer).exists():
            raise ConfigError(f"data.tokenizer = {c.data.tokenizer!r}: no such file or folder")
        import torch

        if c.optim.distributed and not torch.cuda.is_available():
            raise ConfigError("optim.distributed = true needs GPUs: megatron-core's distributed optimizer has no"
                              " CPU path", hint="set optim.distributed=false")
        try:
            mc = self.model_config()
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as exc:  # an HF config aligner cannot represent
            raise ConfigError(f"init.hf = {c.init.hf!r}: {exc}") from None
        if c.data.max_length > mc.max_position_embeddings:
            raise ConfigError(f"data.max_length = {c.data.max_length} exceeds the model's max_position_embeddings"
                              f" = {mc.max_position_embeddings}")
        p = c.parallel
        try:
            world = read_dist_env().world_size
            validate_layout(
                ParallelConfig(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, backend=p.backend),
                world, num_layers=mc.num_layers, num_attention_heads=mc.num_attention_heads,
                num_query_groups=mc.num_query_groups, vocab_size=mc.vocab_size,
            )
        except LayoutError as exc:
            raise ConfigError(f"{exc} (world size {world})") from None
        except ValueError as exc:  # launcher variables that are not a job
            raise ConfigError(str(exc)) from None
        return check_resume(c.trainer.out_dir, self.recorded(), c.trainer.resume)

    def check_layer_spec(self) -> None:
        """The layer spec this install builds can run the layout (context / sequence
        parallelism need kernels some specs lack): a one-line ConfigError otherwise."""
        from aligner.models.layer_spec import check_parallel_support, resolve_layer_spec
        from aligner.parallel.state import LayoutError

        p = self.cfg.parallel
        try:
            spec = resolve_layer_spec(str(OmegaConf.select(self.cfg, "model.layer_spec") or "auto"))
            check_parallel_support(spec, sequence_parallel=bool(p.sequence_parallel and p.tp > 1),
                                   context_parallel=int(p.cp))
        except (LayoutError, ValueError) as exc:
            raise ConfigError(str(exc)) from None

    def check_data_rows(self) -> None:
        """Read every row of the data files once (no tokenizer; a prepared folder: its files and
        sources): a malformed row is reported with its file and line before any process group
        or model exists."""
        from aligner.data.loading import check_dataset

        d = self.cfg.data
        for path in (d.train, d.validation):
            if path is not None:
                check_dataset(path, self.data_kind, d.format, d.skip_invalid)

    def recorded(self) -> dict:
        """The config as recorded in the run folder (``config.yaml``)."""
        return OmegaConf.to_container(self.cfg)

    # ---------------------------------------------------------------- pieces
    def init_parallel(self):
        from aligner.parallel import ParallelConfig, initialize, is_initialized, set_seed

        if not is_initialized():
            from aligner.models.layer_spec import check_parallel_support, resolve_layer_spec

            p = self.cfg.parallel
            mc = self.model_config()
            spec = resolve_layer_spec(mc.layer_spec)
            check_parallel_support(spec, sequence_parallel=p.sequence_parallel and p.tp > 1)
            initialize(
                ParallelConfig(
                    tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, backend=p.backend,
                    seed=self.cfg.trainer.seed, timeout_minutes=p.timeout_minutes,
                ),
                num_layers=mc.num_layers,
                num_attention_heads=mc.num_attention_heads,
                num_query_groups=mc.num_query_groups,
                layer_spec=spec,
            )
        set_seed(self.cfg.trainer.seed)

    def model_config(self):
        from aligner.models import ModelConfig

        if getattr(self, "_model_cfg", None) is None:
            if self.cfg.init.hf:
                mc = ModelConfig.from_hf(self.cfg.init.hf)
                mc.layer_spec = str(OmegaConf.select(self.cfg, "model.layer_spec") or "auto")  # kernels, not architecture
            else:
                try:
                    mc = ModelConfig.from_dict(model_fields(self.cfg.model), "config group 'model'")
                except (TypeError, ValueError) as exc:
                    raise ConfigError(str(exc)) from None
            self._model_cfg = mc
        return self._model_cfg

    def tokenizer(self):
        from aligner.data import load_tokenizer

        path = self.cfg.data.tokenizer or self.cfg.init.hf
        if not path:
            raise ConfigError("data.tokenizer is not set (a tokenizer folder or SentencePiece .model file)")
        if getattr(self, "_tok", None) is None:
            try:
                self._tok = load_tokenizer(path)
            except FileNotFoundError as exc:
                key = "data.tokenizer" if self.cfg.data.tokenizer else "init.hf"
                raise ConfigError(f"{key} = {path!r}: {exc}") from None
        return self._tok

    def build_models(self, head=None, num_outputs=1):
        import torch

        from aligner.models import build_model, load_hf_weights

        mc = self.model_config()
        tok = self.tokenizer()
        if self.cfg.init.hf is None:
            if mc.vocab_size < tok.vocab_size:
                raise ConfigError(
                    f"model.vocab_size = {mc.vocab_size} is smaller than the tokenizer's {tok.vocab_size}"
                )
            mc.pad_token_id = tok.pad_id if mc.pad_token_id is None else mc.pad_token_id
            mc.eos_token_id = tok.eos_id if mc.eos_token_id is None else mc.eos_token_id
            mc.bos_token_id = tok.bos_id if mc.bos_token_id is None else mc.bos_token_id
        dtype = torch.bfloat16 if self.cfg.init.dtype == "bf16" else torch.float32
        vpp = self.cfg.parallel.vpp
        stages = [None] if not vpp else list(range(vpp))
        models = [
            build_model(mc, head=head, num_outputs=num_outputs, params_dtype=dtype, vp_stage=s,
                        sequence_parallel=self.cfg.parallel.sequence_parallel and self.cfg.parallel.tp > 1).to(
                _device()
            )
            for s in stages
        ]
        if self.cfg.init.hf:
            load_hf_weights(models, self.cfg.init.hf, mc, head=head)
        return models

    def load_data(self, path):
        from aligner.data import load_dataset

        if not path:
            return None
        d = self.cfg.data
        samples = load_dataset(
            path,
            kind=self.data_kind,
            tokenizer=self.tokenizer(),
            fmt=d.format,
            template=d.template,
            max_length=d.max_length,
            overlong=d.overlong,
            skip_invalid=d.skip_invalid,
            packing=d.packing,
            seed=self.cfg.trainer.seed,
            **self.data_options(),
        )
        return samples  # mapped, not held: each sample is read when a step takes it

    def data_options(self) -> dict:
        return {}

    def export_metadata(self, algo) -> dict:
        """What the HF export records about this run (aligner.models.hf.export_hf): the
        template its data was rendered with, resolved, so that scoring renders alike."""
        from aligner.data.datasets import resolve_template

        return {"template": resolve_template(self.tokenizer(), self.cfg.data.template, algo.head == "reward")}

    def algorithm(self):
        raise NotImplementedError

    def hooks(self, algo) -> list:
        """What runs beside training (aligner.training.algorithm.StepHook): the gold-vs-proxy
        monitor when ``monitor.enabled`` (docs/monitor.md)."""
        from aligner.evaluation.monitor import build_monitor

        monitor = build_monitor(self.cfg, self.tokenizer(), self.model_config())
        return [monitor] if monitor is not None else []

    # ---------------------------------------------------------------- run
    def prepare(self):
        """The algorithm, this rank's policy model chunks, the training and validation samples,
        and extra keyword arguments of :class:`~aligner.training.loop.TrainingLoop` (e.g. the
        roles of an online algorithm). Runs after the parallel layout exists."""
        algo = self.algorithm()
        train = self.load_data(self.cfg.data.train)
        val = self.load_data(self.cfg.data.validation)
        models = self.build_models(head=algo.head, num_outputs=algo.num_outputs)
        return algo, models, train, val, {}

    def fit(self) -> dict:
        resuming = self.preflight()  # before the heavy imports: a mistake is reported in seconds

        from aligner.training.loop import TrainingLoop
        from aligner.training.run_folder import start_fresh, write_config

        self.init_parallel()
        algo, models, train, val, loop_options = self.prepare()
        algo.export_metadata = self.export_metadata(algo)  # recorded beside the HF export
        out_dir = Path(self.cfg.trainer.out_dir)
        tok_dir = None
        if is_rank0():  # every check passed: the run folder is this run's from here on
            if not resuming:
                start_fresh(out_dir)
            write_config(out_dir, OmegaConf.to_yaml(self.cfg))
            tok_dir = out_dir / "tokenizer"
            self.tokenizer().save(tok_dir)
        self.trainer = TrainingLoop(
            algo,
            models,
            train,
            optim=self.cfg.optim,
            trainer=self.cfg.trainer,
            val_data=val,
            model_cfg=self.model_config(),
            tokenizer_dir=str(tok_dir) if tok_dir else None,
            run_config=self.recorded(),
            hooks=self.hooks(algo),
            **loop_options,
        )
        result = self.trainer.fit()
        if is_rank0():
            (out_dir / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        return result


def _device():
    from aligner.parallel import get_device

    return get_device()


@register_trainer("sft")
class SFTTrainer(_BaseTrainer):
    schema = SFTConfig
    data_kind = "sft"

    def algorithm(self):
        from aligner.algorithms.sft import SFTAlgorithm

        d = self.cfg.data
        return SFTAlgorithm(self.tokenizer().pad_id, packing=d.packing, capacity=d.max_length)


@register_trainer("rm")
class RewardModelTrainer(_BaseTrainer):
    schema = RMConfig

    @classmethod
    def check(cls, cfg):
        rm, d = cfg.rm, cfg.data
        check_attribute_weights("rm", list(rm.attributes), rm.attribute_weights, rm.reward_attribute, distinct=True)
        if rm.mode == RMMode.regression:
            if d.template not in (Template.auto, Template.extra_id):
                raise ConfigError(f"data.template = {str(d.template)!r} does not apply to rm.mode = regression:"
                                  " HelpSteer2 rows are rendered with the extra_id template",
                                  hint="set data.template=extra_id (or auto)")
            if rm.bt_kind != BTKind.regular:
                raise ConfigError(f"rm.bt_kind = {str(rm.bt_kind)!r} has no effect in rm.mode = regression"
                                  " (it selects the Bradley-Terry loss of rm.mode = bt)",
                                  hint="remove the override, or set rm.mode=bt")

    @property
    def data_kind(self):
        return "regression" if self.cfg.rm.mode == "regression" else "pairs"

    def data_options(self):
        return {"attributes": list(self.cfg.rm.attributes)} if self.cfg.rm.mode == "regression" else {"reward_model": True}

    def export_metadata(self, algo) -> dict:
        """Also the head's output names and, where training defined one, the scalar reward's
        weights: ``rm.attribute_weights``, or for BT the ``rm.reward_attribute`` output it trained."""
        meta = super().export_metadata(algo)
        rm = self.cfg.rm
        attributes = list(rm.attributes)
        meta["labels"] = attributes
        if rm.attribute_weights is not None:
            meta["attribute_weights"] = dict(zip(attributes, (float(w) for w in rm.attribute_weights)))
        elif rm.mode == "bt":
            meta["attribute_weights"] = {a: float(a == rm.reward_attribute) for a in attributes}
        return meta

    def algorithm(self):
        from aligner.algorithms.reward import RewardAlgorithm

        rm, d = self.cfg.rm, self.cfg.data
        attributes = list(rm.attributes)
        return RewardAlgorithm(
            self.tokenizer().pad_id,
            mode=rm.mode,
            attributes=attributes,
            bt_kind=rm.bt_kind,
            reward_index=attributes.index(rm.reward_attribute),
            attribute_weights=list(rm.attribute_weights) if rm.attribute_weights is not None else None,
            packing=d.packing,
            capacity=d.max_length,
        )


# the losses that read dpo.eta (the RPO family's reward-gap scale)
_ETA_LOSSES = (LossType.rpo_sq, LossType.rpo_fwd_kl, LossType.rpo_bwd_kl)


@register_trainer("dpo")
class DPOTrainer(_BaseTrainer):
    schema = DPOConfig
    data_kind = "pairs"

    @classmethod
    def check(cls, cfg):
        p = cfg.dpo
        if not p.beta > 0:
            raise ConfigError(f"dpo.beta = {p.beta!r}: expected > 0")
        for key in ("sft_weight", "preference_weight"):
            if p[key] < 0:
                raise ConfigError(f"dpo.{key} = {p[key]!r}: expected >= 0")
        if p.sft_weight == 0 and p.preference_weight == 0:
            raise ConfigError("dpo.sft_weight and dpo.preference_weight are both 0: nothing would be trained")
        if p.eta != DPOSection.eta and p.loss_type not in _ETA_LOSSES:
            raise ConfigError(f"dpo.eta = {p.eta} has no effect with dpo.loss_type = {str(p.loss_type)!r}"
                              f" (only the {', '.join(str(x) for x in _ETA_LOSSES)} losses scale the reward gap)",
                              hint="remove the override, or set dpo.loss_type to one of those")
        if not p.eta > 0:
            raise ConfigError(f"dpo.eta = {p.eta!r}: expected > 0")

    def algorithm(self):
        from aligner.algorithms.dpo import DPOAlgorithm

        p, d = self.cfg.dpo, self.cfg.data
        return DPOAlgorithm(
            self.tokenizer().pad_id,
            loss_type=p.loss_type,
            beta=p.beta,
            average_log_probs=p.average_log_probs,
            sft_weight=p.sft_weight,
            preference_weight=p.preference_weight,
            eta=p.eta,
            reference=p.reference,
            packing=d.packing,
            capacity=d.max_length,
        )


__all__ = [
    "BTKind",
    "DPOConfig",
    "DPOSection",
    "DPOTrainer",
    "LossType",
    "OnlineTrainer",
    "RMConfig",
    "RMMode",
    "RMSection",
    "Reference",
    "RewardModelTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TRAINERS",
    "register_trainer",
]

# ------------------------------------------------------------------------------ online trainers
# the online algorithms' shared pieces (aligner.algorithms.online) import nothing from here;
# PPO and the REINFORCE family subclass OnlineTrainer below and register themselves
from aligner.algorithms.online import RewardKind as _RewardKind, check_online_section  # noqa: E402


class OnlineTrainer(_BaseTrainer):
    """The roles of an online algorithm built from its section (``cfg[key]``): reference
    (unless :meth:`needs_reference` says no), reward source, the experience maker, then
    :meth:`build_algorithm` (the algorithm's own roles and options)."""

    data_kind = "prompts"
    key = "online"
    epochs_key = "epochs"

    @classmethod
    def check(cls, cfg):
        check_online_section(cls.key, cfg[cls.key], cfg.trainer.global_batch_size, cls.epochs_key)

    def section(self):
        return self.cfg[self.key]

    def needs_reference(self) -> bool:
        return True

    def prepare(self):
        train = self.load_data(self.cfg.data.train)
        policy_models = self.build_models()
        roles, algo = self.build_roles(policy_models, len(train))
        algo.prompt_pool = train
        return algo, policy_models, train, None, {"roles": roles}

    def max_steps(self, n_prompts: int) -> int:
        t = self.cfg.trainer
        if t.max_epochs is None:
            return t.max_steps
        return min(t.max_steps if t.max_steps >= 0 else 10**9, t.max_epochs * (n_prompts // t.global_batch_size))

    def build_roles(self, policy_models, n_prompts: int):
        """Reference, reward and the algorithm's own roles (before any training or resume:
        the reference is the initial policy), then the algorithm."""
        from aligner.rewards import build_reward
        from aligner.rollout import GenerationConfig
        from aligner.training.roles import ReferencePolicy, RoleSet

        s, t = self.section(), self.cfg.trainer
        roles = RoleSet()
        reference = None
        if self.needs_reference():
            if s.reference == "host":
                reference = ReferencePolicy(policy_models, "host")
            else:
                reference = ReferencePolicy(policy_models, "model", reference_chunks=self.build_models())
                roles.add(reference.role)
        roles.reference = reference
        r = s.reward
        reward = build_reward(r.kind, path=r.path, function=r.function, tokenizer=self.tokenizer(),
                              attributes=list(r.attributes) if r.attributes else None,
                              attribute_weights=list(r.attribute_weights) if r.attribute_weights is not None
                              else None, reward_attribute=r.reward_attribute, micro_batch_size=r.micro_batch_size,
                              answer_field=r.answer_field, format_reward=r.format_reward)
        if getattr(reward, "role", None) is not None:
            roles.add(reward.role)
        g = s.generation
        gen = GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                               top_p=g.top_p, seed=t.seed if g.seed is None else g.seed,
                               stop_token_ids=[self.tokenizer().eos_id])
        rollout_buffer = t.global_batch_size * s.samples_per_prompt
        algo = self.build_algorithm(roles, gen, reward, reference, rollout_buffer, self.max_steps(n_prompts))
        return roles, algo

    def build_algorithm(self, roles, generation, reward, reference, rollout_buffer: int, max_steps: int):
        raise NotImplementedError

    def load_data(self, path):
        from aligner.data.datasets import longest_sequences

        data = super().load_data(path)
        if data is not None:
            limit = self.model_config().max_position_embeddings
            over = (longest_sequences(data) >= limit).nonzero()[0]  # from the mapped index files
            if over.size:
                i = int(over[0])
                raise ValueError(f"{data.where(i)}: the row has a prompt of {len(data[i]['prompt_tokens'])} tokens;"
                                 f" prompt + response must fit model.max_position_embeddings = {limit} tokens")
        return data

    def check_data_rows(self) -> None:
        """Also: with the exact-answer reward every prompt row carries its answer (the
        error names the file, the line and the field)."""
        super().check_data_rows()
        r = self.section().reward
        if r.kind != _RewardKind.exact_answer:
            return
        from aligner.data.datasets import read_rows
        from aligner.data.loading import dataset_paths
        from aligner.data.prepared import is_prepared

        rows = ((path, lineno, row) for path in dataset_paths(self.cfg.data.train) if not is_prepared(path)
                for lineno, row, _ in read_rows(path))
        for path, lineno, row in rows:
            value = row.get(r.answer_field)
            if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
                raise ConfigError(f"{path}:{lineno}: field {r.answer_field!r} is missing or not a single answer"
                                  f" ({self.key}.reward.kind = exact_answer reads each prompt row's answer from"
                                  f" {self.key}.reward.answer_field = {r.answer_field!r})")


import aligner.algorithms.ppo  # noqa: E402,F401  registers the "ppo" trainer (it builds on the classes above)
import aligner.algorithms.pg  # noqa: E402,F401  registers the "pg" trainer
import aligner.algorithms.steerlm  # noqa: E402,F401  registers the "steerlm2" trainer
