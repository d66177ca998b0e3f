"""Model architecture config: one dataclass, read from HF ``config.json`` or a named preset.

:class:`ModelConfig` describes a decoder-only transformer of one of the registered HF
families (:mod:`aligner.models.architectures`: the Llama layout — RMSNorm, SwiGLU MLP,
rotary position embeddings, grouped-query attention, tied or untied embeddings — and what
each family adds to it); ``arch`` names the family and its adapter does the rest.

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

from aligner.models import architectures
from aligner.models.architectures.base import SUPPORTED_ROPE_TYPES, UnsupportedModelError
from aligner.models.kernels import LAYER_SPECS
from aligner.runtime import config_dir

__all__ = ["LAYER_SPECS", "ModelConfig", "SUPPORTED_ROPE_TYPES", "UnsupportedModelError", "preset_dirs",
           "supported_archs"]


def supported_archs() -> List[str]:
    """The HF ``model_type`` families :class:`ModelConfig` accepts (``model.arch``): the
    architecture registry's."""
    return architectures.model_types()


def preset_dirs() -> list[Path]:
    """Where ``ModelConfig.preset`` looks: the ``model`` folder of the one config folder
    (:func:`aligner.runtime.config_dir`: ``$ALIGNER_CONF_DIR``, the checkout's ``conf/``,
    or the installed package data)."""
    return [config_dir() / "model"]


@dataclass
class ModelConfig:
    """Architecture of a decoder of one of the registered families (config group ``model``).

    arch: the family, a HF ``model_type`` with an adapter in :mod:`aligner.models.architectures`
    (``llama``, ``mistral``, ``qwen2``, ...), which maps it to megatron-core and HF weights.
    num_query_groups: key/value heads (GQA); None means multi-head attention.
    head_dim: per-head size; None means ``hidden_size // num_attention_heads``.
    rope_scaling: None or the HF dict (``rope_type`` ``llama3`` with ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``;
    or ``linear`` with ``factor``).
    sliding_window: keys a query attends to, itself included (HF's ``sliding_window``, Mistral):
    sliding-window attention on every path (training, both decode paths, any layout);
    None: full causal attention.
    layer_types: HF's per-layer ``"sliding_attention"`` / ``"full_attention"`` (Gemma's
    alternating layers); None: every layer is windowed when ``sliding_window`` is set.
    partial_rotary_factor: the share of each head's dimensions that rotary embedding rotates
    (Phi-3, Nemotron: the first ``head_dim · factor``).
    query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar^-1/2``
    (Gemma); None: ``head_dim^-1/2``.
    attn_logit_softcapping / final_logit_softcapping: ``cap · tanh(x / cap)`` on attention
    scores / output logits (Gemma 2; Gemma 3's final logits); None: none.
    rope_local_theta: the rope base of the sliding-window layers (Gemma 3; None there is
    transformers' default, 10000); other families have one rope.
    num_experts / moe_router_topk: a mixture-of-experts MLP (Mixtral): experts per layer and
    experts each token is routed to (megatron-core's ``MoELayer``, dropless; see
    docs/moe.md); ``ffn_hidden_size`` is then one expert's width. None: a dense MLP.
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
    layer_types: Optional[list] = None
    partial_rotary_factor: float = 1.0
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    rope_local_theta: Optional[float] = None
    num_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    pad_token_id: Optional[int] = None
    layer_spec: str = field(default="auto", compare=False)
    # The HF config this came from (kept so an export preserves keys aligner ignores).
    hf_config: Optional[dict] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.layer_spec not in LAYER_SPECS:
            raise ValueError(f"model.layer_spec = {self.layer_spec!r}; expected one of {LAYER_SPECS}")
        adapter = architectures.get(self.arch)
        if self.qkv_bias is None:
            self.qkv_bias = adapter.qkv_bias
        for name, value in adapter.defaults.items():  # the family's transformers defaults
            if getattr(self, name) is None:
                setattr(self, name, value)
        adapter.check_config(self)
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
        if (self.num_experts is None) != (self.moe_router_topk is None) or (
                self.num_experts is not None and not 1 <= self.moe_router_topk <= self.num_experts):
            raise ValueError(f"model.num_experts = {self.num_experts}, model.moe_router_topk = {self.moe_router_topk}:"
                             " expected both unset (a dense MLP) or 1 <= moe_router_topk <= num_experts")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window = {self.sliding_window}: expected a positive number of tokens")
        if self.layer_types is not None:
            kinds = ("sliding_attention", "full_attention")
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(kinds):
                raise ValueError(f"model.layer_types = {self.layer_types}: expected {self.num_layers} of {kinds}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("model.layer_types has sliding_attention layers but model.sliding_window is not set")
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(f"model.partial_rotary_factor = {self.partial_rotary_factor}: expected a share of"
                             f" head_dim = {self.head_dim} that is an even number of dimensions")
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
        return sum(math.prod(shape) for shape in self.architecture.hf_shapes(self).values())

    @property
    def architecture(self):
        """The family's adapter (:mod:`aligner.models.architectures`)."""
        return architectures.get(self.arch)

    def windowed_layers(self) -> list:
        """Per layer (from 0): whether it attends through the sliding window."""
        if not self.sliding_window:
            return [False] * self.num_layers
        if self.layer_types is None:
            return [True] * self.num_layers
        return [kind == "sliding_attention" for kind in self.layer_types]

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

        The family's adapter (found by ``model_type``) reads it; raises
        :class:`UnsupportedModelError` naming the file and the architecture or option for
        anything aligner does not compute exactly.
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

        adapter = architectures.for_hf_config(hf, source)
        fields = adapter.config_from_hf(hf, source)
        try:
            return cls(**fields, hf_config=hf)
        except ValueError as exc:  # a field check in __post_init__
            raise type(exc)(f"{source}: {exc}") from None

    def to_hf_dict(self, head: Optional[str] = None, num_labels: int = 1) -> dict:
        """The HF ``config.json`` dict: a causal LM, or with ``head`` ("reward"/"value") a
        ``*ForSequenceClassification`` with ``num_labels``. Keys of the config this came
        from that aligner does not model are kept."""
        base = dict(self.hf_config or {})
        for k in ("architectures", "id2label", "label2id", "num_labels", "rope_parameters",
                  "rope_scaling", "rope_theta", "transformers_version", "_name_or_path",
                  "torch_dtype", "dtype", "problem_type"):
            base.pop(k, None)
        adapter = self.architecture
        out = dict(base)
        out.update(
            architectures=[adapter.sequence_classification if head else adapter.causal_lm],
            model_type=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.init_std,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        out.update(adapter.hf_config(self))
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
            layernorm_epsilon=self.norm_eps,
            bias_activation_fusion=False,
            add_bias_linear=False,
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
        kwargs.update(self.architecture.transformer_config(self))
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
            if self.num_experts:
                ep = ps.get_expert_model_parallel_world_size()
                kwargs.update(expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size())
                if ep > 1:
                    # Across expert-parallel ranks megatron-core's all-to-all dispatcher, which
                    # exchanges token counts first: the ranks are data-parallel replicas whose
                    # batches differ in length. The all-gather dispatcher needs equal counts.
                    kwargs["moe_token_dispatcher_type"] = "alltoall"
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)
