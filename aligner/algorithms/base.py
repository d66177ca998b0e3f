"""What every algorithm shares (docs/architecture.md): :class:`RunConfig`, the config
sections of every run; :class:`Trainer`, one configured algorithm on the shared loop
(checks, parallel layout, tokenizer, data, models, the monitor, the run folder), and
:data:`TRAINERS`, the trainers by name (:func:`register_trainer`);
:class:`TokenAlgorithm`, micro-batches of sequences or groups of them; :func:`policy_update`,
the step of an algorithm that owns it; :func:`pair_logps` and :func:`pair_margin`.

``Trainer(cfg)`` takes a dict, DictConfig or schema dataclass and checks it (types,
choices, ranges, combinations: :func:`aligner.config.validate_config`); ``fit()`` first
checks what needs no process group (:mod:`aligner.training.preflight`), then initialises
the layout, builds everything and runs :class:`aligner.training.loop.TrainingLoop`.

Imports here are the config machinery and torch; what pulls megatron-core (the loop, the
models, the parallel state) is imported where it is used, so that ``aligner train``
reports a config mistake without loading it.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from aligner.config import Choice, ConfigError, check_required, plain, validate_config
from aligner.data.datasets import resolve_template, token_counts
from aligner.evaluation.config import MonitorSection, check_monitor_sources
from aligner.models.config import ModelConfig
from aligner.parallel import ParallelConfig, get_device, initialize, is_initialized, padded_length, set_seed
from aligner.runtime import UserError, get_logger, is_rank0
from aligner.training import preflight as checks
from aligner.training.algorithm import Algorithm
from aligner.training.batching import (
    packed_microbatches,
    padded_microbatch,
    per_item_sum,
    schedule_microbatches,
    shifted_logprobs,
)
from aligner.training.config import (
    DataSection,
    DType,
    InitSection,
    LoraSection,
    ModelSection,
    MoESection,
    OptimSection,
    ParallelSection,
    TrainerSection,
    check_moe_model,
    model_fields,
)
from aligner.training.run_folder import check_resume, start_fresh, write_config


# ------------------------------------------------------------------------------ config
@dataclass
class RunConfig:
    """The sections every run has; an algorithm's schema adds its own (``rm``, ``dpo``, ...).

    algorithm: which trainer a top-level config runs (a key of
    :data:`TRAINERS`).
    """

    algorithm: str = MISSING
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    lora: LoraSection = field(default_factory=LoraSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    moe: MoESection = field(default_factory=MoESection)


class Reference(Choice):
    """How an offline algorithm holds its reference, the initial policy (DPO, KTO: docs/dpo.md)."""

    precompute = "precompute"  # reference log-probs computed once
    resident = "resident"  # reference weights kept in host memory, swapped in every step


def init_from_hf() -> InitSection:
    """``init`` of an algorithm that starts from a trained model: ``init.hf`` required."""
    return InitSection(hf=MISSING)


def reference_steps(loop, full: bool = False) -> Optional[int]:
    """The epoch-0 steps whose rows a precomputed reference table covers: the run's steps
    when it ends within epoch 0 (a short run, a smoke test: the rows it never trains are not
    computed), else None: every row (epoch 0's batches, then its unused tail, which later
    epochs train). ``full``: every row whatever the run's length (a run resumed from a
    checkpoint whose table covered them all, :func:`coverage_summary`)."""
    if full or loop.max_steps > loop.steps_per_epoch:
        return None
    return loop.max_steps


def reference_batches(loop, training: bool, steps: Optional[int] = None) -> List[List[dict]]:
    """The global batches of the rows an offline reference table covers (DPO, KTO): the
    validation rows (indices after the training set's, batched as evaluation batches them)
    and, with ``training`` (``Reference.precompute``), epoch 0 batch for batch as training
    sees it (step 0 reproduces these numbers bit for bit): its first ``steps`` batches
    (:func:`reference_steps`), or with ``steps`` None all of them and then the rows of epoch
    0's unused tail (later epochs train them)."""
    n_train, val, gbs = len(loop.train_data), loop.val_data or [], loop.cfg.global_batch_size
    batches = [[dict(val[i], index=n_train + i) for i in range(start, min(start + gbs, len(val)))]
               for start in range(0, len(val), gbs)]
    if training:
        covered = set()
        for step in range(loop.steps_per_epoch if steps is None else steps):
            samples = loop.global_batch(step)
            covered.update(int(s["index"]) for s in samples)
            batches.append(samples)
        if steps is None:
            tail = [loop.train_data[i] for i in range(n_train) if i not in covered]  # index i: position i
            batches += [tail[i: i + gbs] for i in range(0, len(tail), gbs)]
    return batches


def resumes_whole_table(loop) -> bool:
    """Whether the run resumes a checkpoint whose training reference table was recorded
    without its coverage (:func:`coverage_summary`: written when a table always covered every
    row); such a run computes the whole table again, as that run did, so the two compare."""
    table = ((loop.resume_state() or {}).get("reference_table") or {}).get("training")
    return table is not None and "per_step" not in table


def coverage_summary(loop, steps: Optional[int], tokens, abs_logps) -> dict:
    """What a training reference table covers, for the resume check (:func:`coverage_mismatch`):
    per covered epoch-0 step ``[tokens, Σ|log p|]`` of its rows (``tokens``, ``abs_logps``:
    per training row), and the unused tail's (None unless every row is covered: ``steps``
    None, :func:`reference_steps`)."""
    per_step, covered = [], set()
    for step in range(loop.steps_per_epoch if steps is None else steps):
        idx = [int(s["index"]) for s in loop.global_batch(step)]
        covered.update(idx)
        per_step.append([float(tokens[idx].sum()), float(abs_logps[idx].sum())])
    tail = None
    if steps is None:
        rest = [i for i in range(len(loop.train_data)) if i not in covered]
        tail = [float(tokens[rest].sum()), float(abs_logps[rest].sum())] if rest else [0.0, 0.0]
    return {"per_step": per_step, "tail": tail}


def coverage_mismatch(theirs: dict, mine: dict) -> Optional[Tuple[str, str]]:
    """Where two :func:`coverage_summary` records disagree over what both cover, step by step
    (the first steps both computed, then the tail where both did): ``("data", what)`` for other
    token counts, ``("weights", what)`` for a Σ|log p| beyond 1e-3 relative (layout round-off
    stays far below it; each step on its own, so that a small change of the initial weights
    is not averaged away), else None."""
    import math

    n = min(len(theirs["per_step"]), len(mine["per_step"]))
    parts = [(f"the rows of step {k + 1}", theirs["per_step"][k], mine["per_step"][k]) for k in range(n)]
    if theirs.get("tail") is not None and mine.get("tail") is not None:
        parts.append(("the rows of epoch 0's unused tail", theirs["tail"], mine["tail"]))
    for what, (tok_then, abs_then), (tok_now, abs_now) in parts:
        if tok_then != tok_now:
            return "data", f"{what}: {tok_then:.0f} response tokens then, {tok_now:.0f} now"
    for what, (_, abs_then), (_, abs_now) in parts:
        if not math.isclose(abs_then, abs_now, rel_tol=1e-3):
            return "weights", f"{what}: Σ|log p| {abs_now:.6g} now, {abs_then:.6g} then"
    return None


WEIGHTS_CHANGED = "the initial weights (init.hf, or model and trainer.seed) changed since the run began"


def check_reference_table(split: str, theirs: dict, mine: dict, count: str, unit: str) -> None:
    """Refuse (:class:`UserError`, one line) a resume whose recomputed reference table is not
    the checkpoint's run's: other data (``count``, the record's number of ``unit``, or token
    counts) or other initial weights (Σ|log p| beyond 1e-3 relative); step by step over the
    steps both computed where both records have them (:func:`coverage_summary`), else (a
    checkpoint written without them) on the totals."""
    import math

    if theirs[count] != mine[count]:
        mismatch = ("data", f"{theirs[count]} {unit} then, {mine[count]} now")
    elif "per_step" in theirs and "per_step" in mine:
        mismatch = coverage_mismatch(theirs, mine)
    elif theirs["tokens"] != mine["tokens"]:
        mismatch = ("data", f"{theirs[count]} {unit} of {theirs['tokens']} response tokens then,"
                            f" {mine[count]} of {mine['tokens']} now")
    elif not math.isclose(theirs["abs_logps"], mine["abs_logps"], rel_tol=1e-3):
        mismatch = ("weights", f"Σ|log p| {mine['abs_logps']:.6g} now, {theirs['abs_logps']:.6g} then")
    else:
        mismatch = None
    if mismatch and mismatch[0] == "data":
        raise UserError(f"resume: the {split} data differ from the checkpoint's run ({mismatch[1]})")
    if mismatch:
        raise UserError(f"resume: the reference log-probs recomputed from the initial weights differ from the"
                        f" checkpoint's run on the {split} {unit} ({mismatch[1]}): {WEIGHTS_CHANGED}")


def reference_scope(loop, batches: List[List[dict]], unit: str) -> Optional[str]:
    """What the reference batches of :func:`reference_batches` cover, for
    :func:`computing_reference`: ``"the log-probs of N training and M validation <unit>"``
    (None when they are empty: a resident reference without validation data)."""
    n_val = len(loop.val_data or [])
    n_train = sum(len(b) for b in batches) - n_val
    return f"the log-probs of {n_train} training and {n_val} validation {unit}" if n_train + n_val else None


@contextmanager
def computing_reference(loop, algorithm: str, what: str):
    """The models in evaluation mode, without gradients, while an offline reference is
    computed from the initial weights (DPO, KTO), announced before (``what`` it covers) and
    after (the seconds it took): on a large set it is minutes before the first step.
    ``what`` None: nothing to announce."""
    import torch

    log = get_logger("aligner.algorithms")
    if what is not None:
        log.info(f"[{algorithm}] reference: {what}, from the initial weights")
    t0 = time.perf_counter()
    modes = [m.training for m in loop.models]
    for m in loop.models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(loop.models, modes):
            m.train(mode)
    if what is not None:
        log.info(f"[{algorithm}] reference: done in {time.perf_counter() - t0:.1f} s")


def reduce_table(table, *, spread: bool = True, summed: bool = True):
    """A reference table filled on the last pipeline stage, each row by one data-parallel
    rank: summed over the DP ranks (``summed``), then (``spread``) sent to every pipeline
    stage, so that every rank holds it all (on the host)."""
    import torch.distributed as dist  # torch.distributed with the parallel state, as training runs
    from megatron.core import parallel_state as ps  # megatron-core loads when training runs, not at config checks

    reduce = summed and ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_world_size() > 1
    send = spread and ps.get_pipeline_model_parallel_world_size() > 1
    if not (reduce or send):
        return table
    t = table.to(get_device())  # the collectives' device (NCCL takes no host tensors)
    if reduce:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    if send:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t.cpu()


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """One configured algorithm on the shared loop (module docstring). A subclass sets
    ``schema`` and ``data_kind``, checks its section (:meth:`check`) and gives
    :meth:`algorithm` (and, for more roles than the policy, :meth:`prepare`);
    :func:`register_trainer` names it.

    ``cfg`` is the checked config, typed (choices are :class:`aligner.config.Choice`
    members) and resolved; :meth:`recorded` is its plain form, as the run folder records it.
    """

    name = ""
    schema: type = RunConfig
    data_kind = "sft"
    config_name: Optional[str] = None  # the top-level config of its defaults (None: conf/<name>.yaml if any)
    replays_routing = False  # moe.routing_replay applies (an online trainer's ExperienceMaker)

    def __init__(self, cfg: Any):
        if isinstance(cfg, dict):
            cfg = OmegaConf.merge(self.defaults(), cfg)
        elif not isinstance(cfg, DictConfig):
            cfg = OmegaConf.structured(cfg)
        self.cfg = validate_config(self.derive(cfg), self.schema)
        self.check(self.cfg)
        self.check_batch(self.cfg)
        OmegaConf.resolve(self.cfg)
        self._model_cfg: Optional[ModelConfig] = None
        self._tok = None

    @classmethod
    def defaults(cls) -> DictConfig:
        """What a dict given from Python is merged onto: the YAML of the trainer's top-level
        config (``conf/<name>.yaml``, as ``aligner train <name>`` composes it), else the
        schema's defaults. A DictConfig or schema instance is taken as it is (``aligner
        train`` passes the composition)."""
        # Hydra composes the YAML: loaded only by trainers built from a dict
        from aligner.algorithms.composition import compose_with_hydra, top_configs, without_hydra

        name = cls.config_name or cls.name
        if name not in top_configs():
            return OmegaConf.structured(cls.schema)
        return without_hydra(compose_with_hydra(name, [], {cls.name: cls.schema}))

    @classmethod
    def derive(cls, cfg):
        """Keys the algorithm derives from others before the config is checked (default: none)."""
        return cfg

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """What the algorithm checks of a whole run beyond its sections' own checks (values
        and combinations): a ConfigError naming the key."""

    @classmethod
    def check_batch(cls, cfg: DictConfig, dp_size: int = 1) -> None:
        """The batch rule (docs/configuration.md): a step's ``trainer.global_batch_size``
        samples split evenly over the ``dp_size`` data-parallel ranks into micro-batches of
        ``trainer.micro_batch_size`` samples (ConfigError naming both keys)."""
        t = cfg.trainer
        if t.global_batch_size % (t.micro_batch_size * dp_size):
            layout = f" x {dp_size} data-parallel ranks" if dp_size > 1 else ""
            raise ConfigError(f"trainer.global_batch_size = {t.global_batch_size} is not a multiple of"
                              f" trainer.micro_batch_size = {t.micro_batch_size}{layout}")

    def check_train_size(self, n: int, unit: str = "samples") -> None:
        """A step takes ``trainer.global_batch_size`` of the ``n`` training samples: a
        ConfigError naming both numbers when there are fewer (before any model is built)."""
        gbs = self.cfg.trainer.global_batch_size
        if n < gbs:
            raise ConfigError(f"data.train gives {n} {unit}, fewer than trainer.global_batch_size = {gbs} (one"
                              " step's worth)", hint="add data, or lower trainer.global_batch_size")

    def recorded(self) -> dict:
        """The config as recorded in the run folder (``config.yaml``): plain values."""
        return plain(self.cfg)

    # ---------------------------------------------------------------- before any process group
    def preflight(self) -> bool:
        """Everything that can be checked without a process group or a model; raises
        ConfigError naming the key. Returns whether the run folder's run will be resumed."""
        check_required(self.cfg, f"aligner train {self.name}", also=self.unset_required())
        c = self.cfg
        checks.check_layer_spec(c)
        checks.check_init(c)
        checks.check_data_files(c)
        checks.check_out_dir(c)
        checks.check_monitor(c)
        check_monitor_sources(c.monitor)
        self.check_data_rows()
        checks.check_tokenizer(c)
        checks.check_devices(c)
        try:
            mc = self.model_config()
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as exc:  # an HF config aligner cannot represent
            raise ConfigError(f"init.hf = {c.init.hf!r}: {exc}") from None
        checks.check_model(c, mc)
        check_moe_model(c.moe, "moe", mc)
        if c.moe.routing_replay and not self.replays_routing:
            raise ConfigError(f"moe.routing_replay = true: algorithm {c.algorithm} does not train on"
                              " rollouts' log-probs (PPO and the pg family do)")
        self.check_batch(c, checks.data_parallel_size(c))
        return check_resume(c.trainer.out_dir, self.recorded(), c.trainer.resume)

    def unset_required(self) -> List[str]:
        """Keys that the choices of this config require and that are not set (beyond the
        ``???`` values), reported with them (default: none)."""
        return []

    def check_data_rows(self) -> None:
        """Every row of the data files read once (no tokenizer): a malformed row is reported
        with its file and line before any process group or model exists."""
        d = self.cfg.data
        checks.check_rows((d.train, d.validation), self.data_kind, d.format, d.skip_invalid)

    # ---------------------------------------------------------------- pieces
    def init_parallel(self) -> None:
        # the layer specs are megatron-core: loaded when a run starts, not at config checks
        from aligner.models.layer_spec import check_parallel_support, resolve_layer_spec

        if not is_initialized():
            p = self.cfg.parallel
            mc = self.model_config()
            spec = resolve_layer_spec(mc.layer_spec)
            check_parallel_support(spec, sequence_parallel=p.sequence_parallel and p.tp > 1)
            initialize(
                ParallelConfig(
                    tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, backend=str(p.backend),
                    seed=self.cfg.trainer.seed, timeout_minutes=p.timeout_minutes,
                ),
                num_layers=mc.num_layers,
                num_attention_heads=mc.num_attention_heads,
                num_query_groups=mc.num_query_groups,
                layer_spec=spec,
            )
        set_seed(self.cfg.trainer.seed)

    def model_config(self) -> ModelConfig:
        """The policy's architecture: ``init.hf``'s config.json, else the ``model`` section."""
        if self._model_cfg is None:
            layer_spec = str(OmegaConf.select(self.cfg, "model.layer_spec") or "auto")
            if self.cfg.init.hf:
                mc = ModelConfig.from_hf(self.cfg.init.hf)
                mc.layer_spec = layer_spec  # kernels, not architecture
            else:
                try:
                    mc = ModelConfig.from_dict(model_fields(self.cfg.model), "config group 'model'")
                except (TypeError, ValueError) as exc:
                    raise ConfigError(str(exc)) from None
            self._model_cfg = mc
        return self._model_cfg

    def tokenizer(self):
        # transformers / sentencepiece load with the first tokenizer, not at config checks
        from aligner.data.tokenizer import load_tokenizer

        path = self.cfg.data.tokenizer or self.cfg.init.hf
        if not path:
            raise ConfigError("data.tokenizer is not set (a tokenizer folder or SentencePiece .model file)")
        if self._tok is None:
            try:
                self._tok = load_tokenizer(path)
            except FileNotFoundError as exc:
                key = "data.tokenizer" if self.cfg.data.tokenizer else "init.hf"
                raise ConfigError(f"{key} = {path!r}: {exc}") from None
        return self._tok

    def params_dtype(self):
        import torch  # the dtype of a run's parameters (init.dtype)

        return torch.bfloat16 if self.cfg.init.dtype == DType.bf16 else torch.float32

    def build_models(self, head=None, num_outputs=1, model_cfg: Optional[ModelConfig] = None,
                     hf: Optional[str] = None) -> list:
        """This rank's model chunks of the policy's architecture with ``head``: the weights of
        ``init.hf``, else a random initialisation from ``trainer.seed``. ``model_cfg`` and
        ``hf``: another model of the run instead (a distillation teacher), at the same layout."""
        # the model code is megatron-core: loaded when models are built
        from aligner.models import build_model, load_hf_weights
        from aligner.models.moe import router_options

        own = model_cfg is None and hf is None
        mc = model_cfg or self.model_config()
        hf = hf or self.cfg.init.hf
        if hf is None:
            tok = self.tokenizer()
            if mc.vocab_size < tok.vocab_size:
                raise ConfigError(
                    f"model.vocab_size = {mc.vocab_size} is smaller than the tokenizer's {tok.vocab_size}"
                )
            mc.pad_token_id = tok.pad_id if mc.pad_token_id is None else mc.pad_token_id
            mc.eos_token_id = tok.eos_id if mc.eos_token_id is None else mc.eos_token_id
            mc.bos_token_id = tok.bos_id if mc.bos_token_id is None else mc.bos_token_id
        p = self.cfg.parallel
        stages = [None] if not p.vpp else list(range(p.vpp))
        # the moe section's router options are the policy's (and its copies'), not another model's
        m = self.cfg.moe
        router = router_options(aux_loss_coeff=m.aux_loss_coeff, load_balancing=str(m.load_balancing),
                                z_loss_coeff=m.z_loss_coeff, routing_replay=m.routing_replay) \
            if mc.num_experts and own else {}
        models = [build_model(mc, head=head, num_outputs=num_outputs, params_dtype=self.params_dtype(), vp_stage=s,
                              sequence_parallel=p.sequence_parallel and p.tp > 1, **router).to(get_device())
                  for s in stages]
        if hf:
            load_hf_weights(models, hf, mc, head=head)
        if self.cfg.lora.enabled and own:  # the policy's adapters, not another model's (a teacher)
            self.add_adapters(models)
        return models

    def add_adapters(self, models: list) -> None:
        """``lora``: adapters on ``models`` (this rank's chunks), the rest frozen (docs/lora.md)."""
        # the adapters are megatron-core layers: loaded when models are built
        from aligner.models.lora import LoraSettings, apply_lora
        from aligner.models.lora_peft import load_peft

        lo = self.cfg.lora
        settings = LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora,
                                targets=tuple(lo.targets), seed=self.cfg.trainer.seed)
        try:
            apply_lora(models, self.model_config(), settings)  # its errors name the lora key
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if lo.init_peft:
            try:
                load_peft(models, lo.init_peft)
            except (ValueError, FileNotFoundError) as exc:
                raise ConfigError(f"lora.init_peft = {lo.init_peft!r}: {exc}") from None

    def load_data(self, path) -> Optional[Sequence[dict]]:
        # the datasets are tokenized with transformers / sentencepiece: loaded when a run starts
        from aligner.data import load_dataset

        if not path:
            return None
        d = self.cfg.data
        samples = load_dataset(
            path,
            kind=self.data_kind,
            tokenizer=self.tokenizer(),
            fmt=d.format,
            template=str(d.template),
            max_length=d.max_length,
            overlong=str(d.overlong),
            skip_invalid=d.skip_invalid,
            packing=d.packing,
            seed=self.cfg.trainer.seed,
            **self.data_options(),
        )
        return samples  # mapped, not held: each sample is read when a step takes it

    def data_options(self) -> dict:
        return {}

    def export_metadata(self, algo: Algorithm) -> dict:
        """What the HF export records about this run (aligner.models.hf.export_hf): the
        template its data was rendered with, resolved, so that scoring renders alike."""
        return {"template": resolve_template(self.tokenizer(), str(self.cfg.data.template), algo.head == "reward")}

    def algorithm(self) -> Algorithm:
        raise NotImplementedError

    def hooks(self, algo: Algorithm) -> list:
        """What runs beside training (aligner.training.algorithm.StepHook): the gold-vs-proxy
        monitor when ``monitor.enabled`` (docs/monitor.md)."""
        # the monitor samples with the rollout engine (megatron-core): loaded when a run starts
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
        self.check_train_size(len(train))
        val = self.load_data(self.cfg.data.validation)
        models = self.build_models(head=algo.head, num_outputs=algo.num_outputs)
        return algo, models, train, val, {}

    def fit(self) -> dict:
        resuming = self.preflight()  # before the heavy imports: a mistake is reported in seconds
        # the loop is megatron-core: loaded once the config and the files are checked
        from aligner.training.loop import TrainingLoop

        self.init_parallel()
        algo, models, train, val, loop_options = self.prepare()
        out_dir = Path(self.cfg.trainer.out_dir)
        tok_dir = None
        if is_rank0():  # every check passed: the run folder is this run's from here on
            if not resuming:
                start_fresh(out_dir)
            write_config(out_dir, OmegaConf.to_yaml(self.recorded()))
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
            export_metadata=self.export_metadata(algo),
            **loop_options,
        )
        result = self.trainer.fit()
        if is_rank0():
            (out_dir / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        return result


# ------------------------------------------------------------------------------ trainers by name
TRAINERS: Dict[str, type] = {}
"""``TRAINERS[name]`` is the trainer class ``aligner train`` runs for a config whose
``algorithm`` is ``name``; complete once :mod:`aligner.algorithms.catalog` has imported
every algorithm module."""


def register_trainer(name: str) -> Callable[[type], type]:
    """Class decorator: ``TRAINERS[name] = cls`` and ``cls.name = name``; the command line
    stores ``cls.schema`` in Hydra's ConfigStore as ``<name>_schema`` (the first default
    of ``conf/<config>.yaml``)."""

    def add(cls: type) -> type:
        if name in TRAINERS:
            raise ValueError(f"a trainer named {name!r} is already registered")
        cls.name = name
        TRAINERS[name] = cls
        return cls

    return add


# ------------------------------------------------------------------------------ owned steps
def policy_update(context, algo: "TokenAlgorithm", local: Sequence[dict],
                  samples: Optional[Sequence[dict]] = None) -> dict:
    """One optimizer step of the policy on this rank's ``local`` samples, for an algorithm
    that owns its step (:class:`aligner.training.algorithm.StepContext`): its micro-batches
    (sequence length from the step's global ``samples``, default ``local``), the schedule,
    the update; the metrics reduced over ranks with ``lr``, ``grad_norm`` and ``skipped``."""
    seq_length = padded_length(max(algo.sample_length(s) for s in (samples or local)))
    policy = context.roles["policy"]
    micro = schedule_microbatches(algo.microbatches(local, context.micro_batch_size, seq_length),
                                  interleaved=len(policy.chunks) > 1)
    policy.train()
    policy.zero_grad()
    lr = policy.lr
    store = context.run_schedule(policy.chunks, micro, algo.forward, algo.loss, forward_only=False,
                                 count=algo.loss_count)
    ok, grad_norm = policy.step()
    metrics = context.reduce_metrics(store)
    metrics.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   skipped=0.0 if ok else 1.0)
    return metrics


# ------------------------------------------------------------------------------ sequences
def pair_count(batch: dict) -> int:
    """Pairs in a micro-batch whose items alternate chosen, rejected."""
    return (int(batch["num_items"]) + 1) // 2


def pair_logps(batch: dict, logits):
    """Per pair of a micro-batch whose items alternate chosen, rejected: the summed
    log-probs of the response tokens and their counts, ``[n]`` each (vocab-parallel logits
    ``[b, s, v/p]``): ``(chosen, rejected, chosen_count, rejected_count)``."""
    lp = shifted_logprobs(logits, batch["tokens"]).float()
    mask = batch["loss_mask"]
    sums = per_item_sum(lp * mask, batch)
    counts = per_item_sum(mask, batch)
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def pair_margin(sample: dict) -> float:
    """The margin ``m`` of a pair for the margin losses (margin BT, margin DPO): the row's
    ``margin`` when it has one, else ``|strength|`` (HelpSteer2-Preference: both are
    |preference_strength|; docs/data_formats.md)."""
    margin = sample.get("margin")
    return float(margin) if margin is not None else abs(float(sample.get("strength", 0.0)))


class TokenAlgorithm(Algorithm):
    """Micro-batching for algorithms whose units are sequences or groups of them (a pair,
    a SteerLM group), padded or packed (:mod:`aligner.training.batching`)."""

    def __init__(self, pad_id: int, packing: bool = False, capacity: Optional[int] = None):
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

    def loss_count(self, batch: dict) -> int:
        """Target tokens (``loss_mask``): the count of a token-level loss. Algorithms whose
        units are items or pairs override it."""
        return int(batch["loss_mask"].sum().round())

    def sample_tokens(self, sample: dict) -> int:
        """Every token the sample puts through the model (both responses of a pair)."""
        return sum(t.numel() for t, _ in self.groups(sample))

    def sample_length(self, sample: dict) -> int:
        """The sample's longest sequence (a padded row holds one sequence)."""
        return max(t.numel() for t, _ in self.groups(sample))

    def setup(self, loop) -> None:
        """Before training: with packing, every sample (a pair: chosen + rejected) must fit one bin."""
        if self.packing:
            self.check_fits_bin(loop.train_data, "training")
            self.check_fits_bin(loop.val_data or [], "validation")

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
        # megatron-core: loaded when a run starts, not with the config checks
        from aligner.models.moe import padding_mask

        # an MoE model's routers leave the padding (item -1) out of their losses and statistics
        items = batch.get("item_of_token")
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                     padding_mask=padding_mask(model, None if items is None else items < 0))
