"""Model architecture config: one dataclass, read from HF ``config.json`` or a named preset.

:class:`ModelConfig` describes a decoder-only Llama-family transformer (Llama 2/3,
Mistral, Qwen2): RMSNorm, SwiGLU MLP, rotary position embeddings, grouped-query
attention, optional q/k/v bias (Qwen2), tied or untied input/output embeddings.

- ``ModelConfig.from_hf(path_or_dict)`` reads a HF folder, a ``config.json`` path or a
  dict (both the ``rope_theta``/``rope_scaling`` keys of transformers 4 and the
  ``rope_parameters`` dict of transformers 5);
- ``to_hf_dict(head=None, num_labels=1)`` writes it back (for export);
- ``ModelConfig.preset("tiny")`` loads ``conf/model/tiny.yaml`` (keys are field names);
- ``to_transformer_config(params_dtype=None, **overrides)`` (None: float32) gives the
  megatron-core ``TransformerConfig``.

Vocab padding: megatron-core splits the vocabulary evenly across TP ranks, so the
embedding and output layer hold ``padded_vocab_size()`` rows, a multiple of
``make_vocab_size_divisible_by`` (128) that does not depend on the TP size, so a
training checkpoint reshards between layouts. The padding rows are zero on import,
their logits are masked out (see :mod:`aligner.models.gpt`) and they are stripped on export.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Union

if TYPE_CHECKING:
    import torch

from aligner.runtime import config_dir


class UnsupportedModelError(ValueError):
    """A HF config whose architecture or option aligner cannot represent."""


# HF model_type -> family defaults that differ between families.
_FAMILIES = {
    "llama": {"qkv_bias": False},
    "mistral": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
}
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_SEQ_CLS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}
_ARCH_TO_FAMILY = {v: k for k, v in {**_CAUSAL_LM}.items()}
_ARCH_TO_FAMILY.update({v: k for k, v in _SEQ_CLS.items()})

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
LAYER_SPECS = ("auto", "te", "fused", "local")  # model.layer_spec (aligner.models.layer_spec)


def supported_archs() -> List[str]:
    """The HF ``model_type`` families :class:`ModelConfig` accepts (``model.arch``)."""
    return list(_FAMILIES)


def preset_dirs() -> list[Path]:
    """Where ``ModelConfig.preset`` looks: the ``model`` folder of the one config folder
    (:func:`aligner.runtime.config_dir`: ``$ALIGNER_CONF_DIR``, the checkout's ``conf/``,
    or the installed package data)."""
    return [config_dir() / "model"]


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (config group ``model``).

    arch: family, one of ``llama``, ``mistral``, ``qwen2`` (HF ``model_type``).
    num_query_groups: key/value heads (GQA); None means multi-head attention.
    head_dim: per-head size; None means ``hidden_size // num_attention_heads``.
    rope_scaling: None or the HF dict (``rope_type`` ``llama3`` with ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``;
    or ``linear`` with ``factor``).
    sliding_window: from Mistral configs; attention is full (no window), which equals the
    window for sequences up to ``sliding_window`` tokens; the model refuses longer ones.
    qkv_bias: biases on q/k/v (None: the family's, i.e. only for ``qwen2``; HF Llama's
    ``attention_bias`` also biases ``o_proj``, which aligner does not model).
    pad_token_id: the id the data layer right-pads with; a sequence-classification export
    needs it (HF reads the reward at the last token that is not ``pad_token_id``).
    layer_spec: which kernels the layers are built from, not part of the architecture:
    ``auto`` (Transformer Engine if it can run, else ``fused``, else ``local``), ``te``,
    ``fused`` (torch's fused attention and RMSNorm) or ``local`` (see
    :mod:`aligner.models.layer_spec`). Not written to checkpoints or exports.
    """

    arch: str = "llama"
    vocab_size: int = 1024
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_layers: int = 4
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: Optional[bool] = None
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    pad_token_id: Optional[int] = None
    layer_spec: str = field(default="auto", compare=False)
    # The HF config this came from (kept so an export preserves keys aligner ignores).
    hf_config: Optional[dict] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.layer_spec not in LAYER_SPECS:
            raise ValueError(f"model.layer_spec = {self.layer_spec!r}; expected one of {LAYER_SPECS}")
        if self.arch not in _FAMILIES:
            raise UnsupportedModelError(
                f"model.arch = {self.arch!r} is not supported; supported: {sorted(_FAMILIES)}"
            )
        family_bias = _FAMILIES[self.arch]["qkv_bias"]
        if self.qkv_bias is None:
            self.qkv_bias = family_bias
        if self.qkv_bias != family_bias:
            raise UnsupportedModelError(
                f"model.qkv_bias = {self.qkv_bias} does not exist in HF {_CAUSAL_LM[self.arch]}"
                f" (q/k/v biases: arch qwen2 only)"
            )
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"model.num_attention_heads = {self.num_attention_heads} is not a multiple of"
                f" model.num_query_groups = {self.num_query_groups}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"model.hidden_size = {self.hidden_size} is not divisible by"
                    f" model.num_attention_heads = {self.num_attention_heads}; set model.head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
                )
            if rope_type == "default":
                self.rope_scaling = None

    # ------------------------------------------------------------------ sizes
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / output layer: ``vocab_size`` rounded up to a multiple of
        ``make_vocab_size_divisible_by`` (independent of the TP size)."""
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    def num_parameters(self) -> int:
        """Parameter count of the causal LM (unpadded vocab), as HF counts it."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.ffn_hidden_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """Load ``conf/model/<name>.yaml`` (see :func:`preset_dirs`); a path also works.
        ``overrides`` replace fields (e.g. ``vocab_size`` from the tokenizer)."""
        import yaml

        candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
        candidates += [d / f"{name}.yaml" for d in preset_dirs()]
        for path in candidates:
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
                if not isinstance(data, dict):
                    raise ValueError(f"{path}: a model preset is a mapping of ModelConfig fields")
                return cls.from_dict({**data, **overrides}, source=str(path))
        known = sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml")})
        raise FileNotFoundError(f"no model preset {name!r}; known presets: {known}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def load(cls, name_or_path: str) -> "ModelConfig":
        """A preset name, a preset YAML, a HF folder or a HF ``config.json``."""
        p = Path(name_or_path)
        if p.is_dir() or p.suffix == ".json":
            return cls.from_hf(p)
        return cls.preset(name_or_path)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, path_or_dict: Union[str, os.PathLike, dict]) -> "ModelConfig":
        """Read a HF config (folder, ``config.json`` path, or dict).

        Raises :class:`UnsupportedModelError` naming the file and the architecture for
        anything outside the Llama family (Llama, Mistral, Qwen2).
        """
        if isinstance(path_or_dict, dict):
            hf, source = dict(path_or_dict), "<dict>"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"{p}: HF config.json not found")
            with open(p, encoding="utf-8") as f:
                hf = json.load(f)
            source = str(p)

        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        family = model_type if model_type in _FAMILIES else None
        if family is None:
            for a in archs:
                if a in _ARCH_TO_FAMILY:
                    family = _ARCH_TO_FAMILY[a]
        if family is None:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} / architectures {archs} is not supported;"
                f" supported model types: {sorted(_FAMILIES)}"
            )
        for a in archs:
            if a not in _ARCH_TO_FAMILY:
                raise UnsupportedModelError(
                    f"{source}: architecture {a!r} is not supported; supported: {sorted(_ARCH_TO_FAMILY)}"
                )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (SwiGLU/silu only)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias = true is not supported")
        if family == "qwen2" and hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window = true is not supported")

        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params:
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.pop("rope_theta", None)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"{source}: rope scaling type {rope_type!r} is not supported;"
                    f" supported: {SUPPORTED_ROPE_TYPES}"
                )
            if rope_type == "default":
                rope_scaling = None

        qkv_bias = _FAMILIES[family]["qkv_bias"]
        if family in ("llama", "mistral") and hf.get("attention_bias"):
            raise UnsupportedModelError(
                f"{source}: attention_bias = true (biases on q/k/v and o_proj) is not supported"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"{source}: missing key {key!r}")
        num_heads = hf["num_attention_heads"]
        try:
            return cls._from_hf_fields(hf, family, num_heads, rope_theta, rope_scaling, qkv_bias)
        except ValueError as exc:  # a field check in __post_init__
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def _from_hf_fields(cls, hf, family, num_heads, rope_theta, rope_scaling, qkv_bias) -> "ModelConfig":
        return cls(
            arch=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_query_groups=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            init_std=hf.get("initializer_range", 0.02),
            sliding_window=hf.get("sliding_window") if family == "mistral" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=hf,
        )

    def to_hf_dict(self, head: Optional[str] = None, num_labels: int = 1) -> dict:
        """The HF ``config.json`` dict: a causal LM, or with ``head`` ("reward"/"value") a
        ``*ForSequenceClassification`` with ``num_labels``. Keys of the config this came
        from that aligner does not model are kept."""
        base = dict(self.hf_config or {})
        for k in ("architectures", "id2label", "label2id", "num_labels", "rope_parameters",
                  "rope_scaling", "rope_theta", "transformers_version", "_name_or_path",
                  "torch_dtype", "dtype", "problem_type"):
            base.pop(k, None)
        arch = (_SEQ_CLS if head else _CAUSAL_LM)[self.arch]
        out = dict(base)
        out.update(
            architectures=[arch],
            model_type=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.init_std,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.arch == "llama":
            out["attention_bias"] = False
            out["mlp_bias"] = False
        if self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        if head:
            out["num_labels"] = num_labels
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
            # regression: HF would otherwise guess single_label_classification for N > 1
            out["problem_type"] = "regression"
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        d.pop("layer_spec")  # a choice of kernels where the model runs, not of architecture
        return d

    # ------------------------------------------------------------------ megatron-core
    def to_transformer_config(self, params_dtype: Optional["torch.dtype"] = None, **overrides):
        """The megatron-core ``TransformerConfig`` for this architecture.

        ``overrides`` are TransformerConfig fields (e.g. ``sequence_parallel=True``,
        ``recompute_granularity="selective"``); the parallel sizes come from the current
        megatron-core parallel state when it is initialised, the virtual pipeline size
        included: megatron-core splits a rank's layers into its interleaved chunks from it
        (without it every chunk would build all of the rank's layers). params_dtype: None is
        float32.
        """
        # torch and megatron-core load here, not with the module: config checks read
        # ModelConfig (and the supported families) without them
        import torch
        import torch.nn.functional as F
        from megatron.core import parallel_state as ps
        from megatron.core.transformer import TransformerConfig

        params_dtype = torch.float32 if params_dtype is None else params_dtype
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            bias_activation_fusion=False,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            attention_softmax_in_fp32=True,
        )
        if ps.model_parallel_is_initialized():
            pp = ps.get_pipeline_model_parallel_world_size()
            vpp = ps.get_virtual_pipeline_model_parallel_world_size()
            kwargs.update(
                tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp,
                context_parallel_size=ps.get_context_parallel_world_size(),
                # Interleaved chunks on two stages: the previous and the next stage are the
                # same rank, and a batched exchange sends an activation and a gradient to it
                # in one call, which the receiver matches in the wrong order (silently: same
                # shape). megatron-core's unbatched exchange sends the two directions over
                # two process groups instead.
                batch_p2p_comm=not (vpp is not None and vpp > 1 and pp == 2),
            )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)
