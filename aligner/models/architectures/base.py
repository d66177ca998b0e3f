"""What an architecture adapter is: the base class (the Llama layout) and the weight rules.

An :class:`Architecture` describes one HF model family (``model_type``) to the rest of
``aligner.models``:

- **config**: :meth:`~Architecture.config_from_hf` reads the family's ``config.json`` into
  :class:`aligner.models.ModelConfig` fields, refusing (:class:`UnsupportedModelError`, one
  line naming the key and its value) any option that would be computed differently from
  transformers; :meth:`~Architecture.hf_config` writes the family's keys back on export;
- **megatron-core**: :meth:`~Architecture.transformer_config` gives the
  ``TransformerConfig`` fields that differ from the Llama layout, and
  :meth:`~Architecture.layer_spec` the layer ``ModuleSpec`` and final norm for a resolved
  layer spec (``te`` / ``fused`` / ``local``, :mod:`aligner.models.layer_spec`);
- **weights**: :meth:`~Architecture.layer_weights` and :meth:`~Architecture.global_weights`
  map every megatron-core parameter to its HF tensors with a *rule* (below).
  :mod:`aligner.models.hf` applies the rules both ways: each rank reads only its TP slice on
  import, and the slices are gathered on export, so any TP / PP layout reads and writes
  the same HF files.

Rules (frozen dataclasses; shapes are the full HF shapes, h hidden, d head size,
nq / ng query heads / key-value groups, f MLP width, v vocabulary):

- :class:`Replicated`: every TP rank holds the whole tensor (norm weights and biases);
- :class:`Split`: split over TP along ``dim`` (0: a column-parallel output, 1: a
  row-parallel input);
- :class:`VocabRows`: embedding / output rows, padded to the padded vocabulary with zeros
  and split over TP; the padding is dropped on export;
- :class:`QKV`: megatron-core's fused ``linear_qkv`` (per query group: its nq/ng query
  heads, then its key head, then its value head; a TP rank holds whole groups) from HF's
  separate ``q_proj`` / ``k_proj`` / ``v_proj`` or one fused ``qkv_proj`` ([q; k; v] rows);
- :class:`GLU`: megatron-core's ``linear_fc1`` of a gated MLP (each TP rank holds [its
  gate rows; its up rows]) from HF's ``gate_proj`` / ``up_proj`` or one fused
  ``gate_up_proj`` ([gate; up] rows);
- :class:`ScoreHead`: the reward / value head (``score.weight`` of
  ``*ForSequenceClassification``), replicated.

A new family is one module in this package that subclasses :class:`Architecture` (or a
family it extends) and calls :func:`aligner.models.architectures.register`; see
docs/models.md. This module imports neither torch nor megatron-core, so the config layer
can list the families without loading them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


class UnsupportedModelError(ValueError):
    """A HF config whose architecture or option aligner cannot represent exactly."""


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


# ------------------------------------------------------------------ weight rules
@dataclass(frozen=True)
class Replicated:
    name: str
    shape: Tuple[int, ...]

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {self.name: self.shape}


@dataclass(frozen=True)
class Split:
    name: str
    shape: Tuple[int, ...]
    dim: int

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {self.name: self.shape}


@dataclass(frozen=True)
class VocabRows:
    name: str
    shape: Tuple[int, int]  # (vocab_size, h): the real rows

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {self.name: self.shape}


@dataclass(frozen=True)
class QKV:
    """``q``/``k``/``v`` names (or ``fused``), ``tail`` = (h,) for weights, () for biases."""

    heads: int
    groups: int
    head_dim: int
    tail: Tuple[int, ...]
    q: str = ""
    k: str = ""
    v: str = ""
    fused: str = ""

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        d = self.head_dim
        if self.fused:
            return {self.fused: ((self.heads + 2 * self.groups) * d, *self.tail)}
        return {self.q: (self.heads * d, *self.tail), self.k: (self.groups * d, *self.tail),
                self.v: (self.groups * d, *self.tail)}


@dataclass(frozen=True)
class GLU:
    """``gate``/``up`` names (or ``fused``) of a gated MLP's first projection [f, h]."""

    ffn: int
    hidden: int
    gate: str = ""
    up: str = ""
    fused: str = ""

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        if self.fused:
            return {self.fused: (2 * self.ffn, self.hidden)}
        return {self.gate: (self.ffn, self.hidden), self.up: (self.ffn, self.hidden)}


@dataclass(frozen=True)
class ScoreHead:
    name: str = "score.weight"

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {}  # (outputs, h): the outputs come from the checkpoint


# ------------------------------------------------------------------ config helpers
def rope_from_hf(hf: dict, source: str, rope_params: Optional[dict] = None) -> Tuple[float, Optional[dict], float]:
    """(rope_theta, rope_scaling or None, partial_rotary_factor) from a HF config:
    transformers 4's ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` keys or
    transformers 5's ``rope_parameters`` dict (or ``rope_params``, a family's own entry of
    it). A rope type aligner does not compute is refused, naming it."""
    where = "rope_parameters"
    if rope_params is None:
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is not None:
            where = "rope_scaling"
    else:
        rope_params, rope_theta, rope_scaling = dict(rope_params), rope_params.get("rope_theta", 10000.0), None
    partial = float(hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)))
    if rope_scaling is None and rope_params:
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        for key in ("rope_theta", "partial_rotary_factor"):
            rope_scaling.pop(key, None)
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"{source}: {where}.rope_type = {rope_type!r} is not supported;"
                                        f" supported: {SUPPORTED_ROPE_TYPES}")
        if rope_type == "default":
            rope_scaling = None
    return float(rope_theta), rope_scaling, partial


def refuse(source: str, key: str, value: Any, why: str) -> UnsupportedModelError:
    """The one-line error for an option aligner does not compute: ``<file>: <key> = <value> ...``."""
    return UnsupportedModelError(f"{source}: {key} = {value!r} is not supported ({why})")


# ------------------------------------------------------------------ the adapter
# ModelConfig fields only some families have, and their "not used" value.
OPTIONS = {"sliding_window": None, "layer_types": None, "partial_rotary_factor": 1.0, "query_pre_attn_scalar": None,
           "attn_logit_softcapping": None, "final_logit_softcapping": None, "rope_local_theta": None,
           "num_experts": None, "moe_router_topk": None, "moe_norm_topk_prob": None, "moe_shared_expert_size": None}


class Architecture:
    """One HF model family; this base class is the Llama layout (see the module docstring).

    Class attributes a family sets: ``model_type`` (HF), ``causal_lm`` and
    ``sequence_classification`` (HF class names), ``qkv_bias`` (biases on q/k/v),
    ``features`` (what it adds to the Llama layout, for ``aligner env`` and docs/models.md),
    ``options`` (the :data:`OPTIONS` fields it reads), ``defaults`` (what ``ModelConfig``
    fields left at None take: transformers' defaults for the family),
    ``activation_keys`` / ``activations`` (the config keys naming the MLP activation and
    the values computed), ``norm_eps_key``, ``tied_by_default`` (HF's default of
    ``tie_word_embeddings``).
    """

    model_type: str = ""
    causal_lm: str = ""
    sequence_classification: str = ""
    qkv_bias: bool = False
    features: Tuple[str, ...] = ()
    options: Tuple[str, ...] = ()
    defaults: Dict[str, Any] = {}
    layer_prefix: str = "model.layers.{}."
    activation_keys: Tuple[str, ...] = ("hidden_act",)
    activations: Tuple[str, ...] = ("silu", "swish")
    norm_eps_key: str = "rms_norm_eps"
    tied_by_default: bool = False

    # -------------------------------------------------------------- config
    def config_from_hf(self, hf: dict, source: str) -> dict:
        """:class:`ModelConfig` fields from the family's HF ``config.json`` dict (``hf_config``
        is added by the caller)."""
        key = next((k for k in self.activation_keys if k in hf), self.activation_keys[0])
        act = hf.get(key, self.activations[0])
        if act not in self.activations:
            raise UnsupportedModelError(
                f"{source}: {key} {act!r} is not supported ({self.model_type}: {' / '.join(self.activations)} only)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias = true is not supported")
        if not self.qkv_bias and hf.get("attention_bias"):
            raise UnsupportedModelError(
                f"{source}: attention_bias = true (biases on q/k/v and o_proj) is not supported"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"{source}: missing key {key!r}")
        rope_theta, rope_scaling, partial_rotary_factor = rope_from_hf(hf, source)
        num_heads = hf["num_attention_heads"]
        return dict(
            arch=self.model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_query_groups=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial_rotary_factor,
            norm_eps=hf.get(self.norm_eps_key, 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", self.tied_by_default)),
            qkv_bias=self.qkv_bias,
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def check_config(self, cfg) -> None:
        """Refuse field values this family does not have (called by ``ModelConfig``): q/k/v
        biases other than the family's, and any of :data:`OPTIONS` set but not in
        ``options`` (transformers' class would ignore it, so the model would differ)."""
        if cfg.qkv_bias != self.qkv_bias:
            raise UnsupportedModelError(
                f"model.qkv_bias = {cfg.qkv_bias} does not exist in HF {self.causal_lm}"
                f" (q/k/v biases: arch qwen2 only)"
            )
        for name, unset in OPTIONS.items():
            value = getattr(cfg, name)
            if value != unset and name not in self.options:
                raise UnsupportedModelError(f"model.{name} = {value!r} does not exist in HF {self.causal_lm}"
                                            f" (model.arch = {self.model_type})")

    def hf_config(self, cfg) -> dict:
        """The family's keys of the exported ``config.json`` (beyond the common ones)."""
        return {"hidden_act": "silu", "rms_norm_eps": cfg.norm_eps}

    # -------------------------------------------------------------- megatron-core
    def transformer_config(self, cfg) -> dict:
        """``TransformerConfig`` fields of this family (the common ones are set by
        ``ModelConfig.to_transformer_config``)."""
        import torch.nn.functional as F  # here, not at import: listing the families stays light

        fields = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                      add_qkv_bias=cfg.qkv_bias)
        if cfg.sliding_window:
            # HF's window counts the query's own key: megatron-core's (left, right) = (w - 1, 0)
            fields["window_size"] = (cfg.sliding_window - 1, 0)
            if cfg.layer_types is not None:  # megatron-core's per-layer pattern: 1 = windowed
                fields["window_attn_skip_freq"] = [int(w) for w in cfg.windowed_layers()]
        if cfg.query_pre_attn_scalar is not None:
            fields["softmax_scale"] = cfg.query_pre_attn_scalar ** -0.5
        return fields

    def embedding_multiplier(self, cfg) -> Optional[float]:
        """A factor on the token embeddings (Gemma: sqrt(h)), or None."""
        return None

    def layer_design(self, cfg) -> dict:
        """What the family's layer adds to the Llama layer: the fields of
        :class:`aligner.models.layer_spec.LayerDesign` (per-head or whole-projection q/k
        norms, sandwich or post norms, attention-logit soft-capping, a local rope)."""
        return {}

    def layer_spec(self, cfg, spec: str):
        """(layer ``ModuleSpec``, final-norm class) for a resolved layer spec name."""
        from aligner.models.layer_spec import LayerDesign, build_layer_spec  # megatron-core: loaded when a model is built

        fields = self.transformer_config(cfg)
        return build_layer_spec(spec, LayerDesign(**self.layer_design(cfg)), normalization=fields["normalization"],
                                zero_centered_gamma=fields.get("layernorm_zero_centered_gamma", False))

    def te_spec_builds(self, cfg) -> bool:
        """Whether megatron-core's Transformer Engine spec builds this family's layer (else
        ``model.layer_spec = auto`` takes the fused spec on GPUs too)."""
        from aligner.models.layer_spec import LayerDesign, te_builds  # megatron-core: loaded when a model is built

        return te_builds(LayerDesign(**self.layer_design(cfg)))

    # -------------------------------------------------------------- weights
    def global_weights(self, cfg, head: Optional[str] = None) -> Dict[str, Any]:
        """Rules of the parameters outside the layers, by megatron-core parameter name."""
        h = cfg.hidden_size
        rules: Dict[str, Any] = {
            "embedding.word_embeddings.weight": VocabRows("model.embed_tokens.weight", (cfg.vocab_size, h)),
            "decoder.final_layernorm.weight": Replicated("model.norm.weight", (h,)),
        }
        if head is not None:
            rules["head.weight"] = ScoreHead()
        else:
            out = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            rules["output_layer.weight"] = VocabRows(out, (cfg.vocab_size, h))
        return rules

    def layer_weights(self, cfg, layer: int) -> Dict[str, Any]:
        """Rules of one layer's parameters, by megatron-core name inside the layer
        (``decoder.layers.<i>.`` removed); HF names are the layer's own (``layer`` counts
        from 0 over the whole model)."""
        p = self.layer_prefix.format(layer)
        h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
        nq, ng = cfg.num_attention_heads, cfg.num_query_groups
        attn = p + "self_attn."
        rules: Dict[str, Any] = {
            "input_layernorm.weight": Replicated(p + "input_layernorm.weight", (h,)),
            "self_attention.linear_qkv.weight": QKV(nq, ng, d, (h,), q=attn + "q_proj.weight",
                                                    k=attn + "k_proj.weight", v=attn + "v_proj.weight"),
            "self_attention.linear_proj.weight": Split(attn + "o_proj.weight", (h, nq * d), dim=1),
            "pre_mlp_layernorm.weight": Replicated(p + "post_attention_layernorm.weight", (h,)),
            "mlp.linear_fc1.weight": GLU(f, h, gate=p + "mlp.gate_proj.weight", up=p + "mlp.up_proj.weight"),
            "mlp.linear_fc2.weight": Split(p + "mlp.down_proj.weight", (h, f), dim=1),
        }
        if cfg.qkv_bias:
            rules["self_attention.linear_qkv.bias"] = QKV(nq, ng, d, (), q=attn + "q_proj.bias",
                                                          k=attn + "k_proj.bias", v=attn + "v_proj.bias")
        return rules

    def hf_shapes(self, cfg, head: Optional[str] = None) -> Dict[str, Tuple[int, ...]]:
        """Every HF tensor of the whole model and its shape (the score head's excepted)."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        for rule in self.global_weights(cfg, head).values():
            shapes.update(rule.hf_shapes())
        for layer in range(cfg.num_layers):
            for rule in self.layer_weights(cfg, layer).values():
                shapes.update(rule.hf_shapes())
        return shapes


class RoutedExperts:
    """Mixin of a mixture-of-experts family, placed before its dense family: megatron-core's
    ``MoELayer`` in place of the dense MLP, its router (``<moe_prefix>gate`` [E, h]) and the
    routed experts' HF names (``<moe_prefix>experts.<e>.<name>``, ``expert_names`` = the
    gate, up and down projections' names). :meth:`expert_weights` maps one expert; the
    weight import / export shards the experts over the expert-parallel ranks with it."""

    moe_prefix = "mlp."
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def layer_design(self, cfg) -> dict:
        return dict(super().layer_design(cfg), num_experts=cfg.num_experts)

    def expert_weights(self, cfg, layer: int, expert: int) -> dict:
        """Rules of one routed expert's parameters (``expert`` counts from 0 over all experts)."""
        p = self.layer_prefix.format(layer) + self.moe_prefix + f"experts.{expert}."
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        gate, up, down = self.expert_names
        return {"linear_fc1.weight": GLU(f, h, gate=p + gate + ".weight", up=p + up + ".weight"),
                "linear_fc2.weight": Split(p + down + ".weight", (h, f), dim=1)}

    def layer_weights(self, cfg, layer: int) -> dict:
        rules = {k: v for k, v in super().layer_weights(cfg, layer).items() if not k.startswith("mlp.")}
        p = self.layer_prefix.format(layer) + self.moe_prefix
        rules["mlp.router.weight"] = Replicated(p + "gate.weight", (cfg.num_experts, cfg.hidden_size))
        for e in range(cfg.num_experts):
            for name, rule in self.expert_weights(cfg, layer, e).items():
                rules[f"mlp.experts.local_experts.{e}.{name}"] = rule
        return rules

