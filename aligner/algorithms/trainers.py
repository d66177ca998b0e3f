"""Trainers: one configured algorithm on the shared loop, usable with or without Hydra.

``SFTTrainer(cfg).fit()``, ``RewardModelTrainer(cfg).fit()``, ``DPOTrainer(cfg).fit()``
where ``cfg`` is the composed config (a dict, DictConfig or the dataclass schemas below):
the sections of :class:`aligner.training.config.RunConfig` plus the algorithm's own
(``sft``, ``rm``, ``dpo``). Each trainer initialises the parallel layout (unless already
initialised), loads the tokenizer and data, builds the model (random init or ``init.hf``)
and runs :class:`aligner.training.loop.TrainingLoop`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from aligner.training.config import RunConfig, validate_config


@dataclass
class SFTSection:
    """``sft``: nothing to tune beyond the shared groups (kept for symmetry and future knobs)."""

    enabled: bool = True


@dataclass
class RMSection:
    """``rm``: reward-model objective (REFERENCE section 2).

    mode: ``regression`` (HelpSteer2 multi-attribute, masked MSE) or ``bt`` (pairs).
    attributes: the head's outputs in order (regression labels by these names).
    bt_kind: ``regular`` | ``margin`` | ``scaled``. reward_attribute: the head output used
    as the scalar reward for BT (helpfulness in the HelpSteer2-Preference recipes).
    attribute_weights: optional weights ``w`` giving ``r = w · ŷ`` instead.
    """

    mode: str = "regression"
    attributes: List[str] = field(
        default_factory=lambda: ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    )
    bt_kind: str = "regular"
    reward_attribute: str = "helpfulness"
    attribute_weights: Optional[List[float]] = None


@dataclass
class DPOSection:
    """``dpo``: preference optimisation (REFERENCE section 3)."""

    loss_type: str = "dpo"
    beta: float = 0.1
    average_log_probs: bool = False
    sft_weight: float = 0.0
    preference_weight: float = 1.0
    eta: float = 1.0
    reference: str = "precompute"


@dataclass
class SFTConfig(RunConfig):
    sft: SFTSection = field(default_factory=SFTSection)


@dataclass
class RMConfig(RunConfig):
    rm: RMSection = field(default_factory=RMSection)


@dataclass
class DPOConfig(RunConfig):
    dpo: DPOSection = field(default_factory=DPOSection)


class _BaseTrainer:
    schema = RunConfig
    head: Optional[str] = None
    data_kind = "sft"

    def __init__(self, cfg: Any):
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.structured(cfg) if not isinstance(cfg, dict) else OmegaConf.create(cfg)
        self.cfg = validate_config(cfg, self.schema)

    # ---------------------------------------------------------------- pieces
    def init_parallel(self):
        from aligner.parallel import ParallelConfig, initialize, is_initialized, set_seed

        if not is_initialized():
            p = self.cfg.parallel
            initialize(
                ParallelConfig(
                    tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, backend=p.backend or "auto",
                    seed=self.cfg.trainer.seed, timeout_minutes=p.timeout_minutes,
                ),
                num_layers=self.model_config().num_layers,
                num_attention_heads=self.model_config().num_attention_heads,
                num_query_groups=self.model_config().num_query_groups,
            )
        set_seed(self.cfg.trainer.seed)

    def model_config(self):
        from aligner.models import ModelConfig

        if getattr(self, "_model_cfg", None) is None:
            if self.cfg.init.hf:
                mc = ModelConfig.from_hf(self.cfg.init.hf)
            else:
                mc = ModelConfig.from_dict(OmegaConf.to_container(self.cfg.model, resolve=True), "config group 'model'")
            self._model_cfg = mc
        return self._model_cfg

    def tokenizer(self):
        from aligner.data import load_tokenizer

        path = self.cfg.data.tokenizer or self.cfg.init.hf
        if not path:
            raise ValueError("data.tokenizer is not set (a tokenizer folder or SentencePiece .model file)")
        if getattr(self, "_tok", None) is None:
            self._tok = load_tokenizer(path)
        return self._tok

    def build_models(self, head=None, num_outputs=1):
        from aligner.models import build_model, load_hf_weights

        mc = self.model_config()
        tok = self.tokenizer()
        if self.cfg.init.hf is None:
            if mc.vocab_size < tok.vocab_size:
                raise ValueError(
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
            **self.data_options(),
        )
        return [dict(s, index=i) for i, s in enumerate(samples)]

    def data_options(self) -> dict:
        return {}

    def algorithm(self):
        raise NotImplementedError

    # ---------------------------------------------------------------- run
    def fit(self) -> dict:
        from aligner.training.loop import TrainingLoop

        self.init_parallel()
        if not self.cfg.data.train:
            raise ValueError("data.train is not set")
        algo = self.algorithm()
        train = self.load_data(self.cfg.data.train)
        val = self.load_data(self.cfg.data.validation)
        models = self.build_models(head=algo.head, num_outputs=algo.num_outputs)
        out_dir = Path(self.cfg.trainer.out_dir)
        container = OmegaConf.to_container(self.cfg, resolve=True)
        if _rank0():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        tok_dir = None
        if _rank0():
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
            run_config=container,
        )
        result = self.trainer.fit()
        if _rank0():
            (out_dir / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        return result


def _device():
    from aligner.parallel import get_device

    return get_device()


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class SFTTrainer(_BaseTrainer):
    schema = SFTConfig
    data_kind = "sft"

    def algorithm(self):
        from aligner.algorithms.sft import SFTAlgorithm

        d = self.cfg.data
        return SFTAlgorithm(self.tokenizer().pad_id, packing=d.packing, capacity=d.max_length)


class RewardModelTrainer(_BaseTrainer):
    schema = RMConfig

    @property
    def data_kind(self):
        return "regression" if self.cfg.rm.mode == "regression" else "pairs"

    def data_options(self):
        return {"attributes": list(self.cfg.rm.attributes)} if self.cfg.rm.mode == "regression" else {}

    def algorithm(self):
        from aligner.algorithms.reward import RewardAlgorithm

        rm, d = self.cfg.rm, self.cfg.data
        attributes = list(rm.attributes)
        if rm.reward_attribute not in attributes:
            raise ValueError(f"rm.reward_attribute = {rm.reward_attribute!r} is not one of rm.attributes {attributes}")
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


class DPOTrainer(_BaseTrainer):
    schema = DPOConfig
    data_kind = "pairs"

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


TRAINERS = {"sft": SFTTrainer, "rm": RewardModelTrainer, "dpo": DPOTrainer}
import aligner.algorithms.ppo  # noqa: E402,F401  registers TRAINERS["ppo"] (the online trainers build on the classes above)
