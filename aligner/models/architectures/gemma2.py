"""Gemma 2: the Llama layout with Gemma's pieces.

- embeddings multiplied by sqrt(hidden) (in the embedding's dtype, as transformers does);
- RMSNorm with scale ``1 + w`` (megatron-core's ``layernorm_zero_centered_gamma``), and
  "sandwich" norms: before and after attention and the MLP (the after-norms are
  ``layer_spec.PostNormRowParallelLinear``);
- GeGLU MLP with tanh-approximated GELU;
- ``head_dim`` independent of hidden / heads, attention scaled by
  ``query_pre_attn_scalar^-1/2``;
- attention-logit and final-logit soft-capping ``cap · tanh(x / cap)``;
- sliding-window and global layers alternating (``layer_types``: layer 0 windowed).
"""
import math

from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture, Replicated, UnsupportedModelError


class Gemma(Architecture):
    """What Gemma 2 and Gemma 3 share (registered as Gemma 2)."""

    model_type = "gemma2"
    causal_lm = "Gemma2ForCausalLM"
    sequence_classification = "Gemma2ForSequenceClassification"
    features = ("embedding scale sqrt(hidden)", "(1 + w) RMSNorm", "pre and post norms", "GeGLU (tanh GELU)",
                "independent head_dim", "query_pre_attn_scalar", "attention-logit soft-capping",
                "final-logit soft-capping", "alternating sliding-window / global layers", "tied embeddings")
    options = ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping")
    activation_keys = ("hidden_activation", "hidden_act")
    activations = ("gelu_pytorch_tanh",)
    tied_by_default = True
    window_pattern = 2  # without layer_types: layer i is global when (i + 1) % pattern == 0

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{source}: use_bidirectional_attention = true is not supported")
        fields = super().config_from_hf(hf, source)
        layer_types = hf.get("layer_types")
        if layer_types is None:
            pattern = hf.get("sliding_window_pattern", self.window_pattern)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        return dict(fields, sliding_window=hf.get("sliding_window"), layer_types=list(layer_types),
                    query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                    attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                    final_logit_softcapping=hf.get("final_logit_softcapping"))

    def hf_config(self, cfg) -> dict:
        return dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.norm_eps, sliding_window=cfg.sliding_window,
                    layer_types=cfg.layer_types, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                    attn_logit_softcapping=cfg.attn_logit_softcapping,
                    final_logit_softcapping=cfg.final_logit_softcapping)

    def transformer_config(self, cfg) -> dict:
        from aligner.models.layer_spec import gelu_tanh  # megatron-core: loaded when a model is built

        return dict(super().transformer_config(cfg), layernorm_zero_centered_gamma=True, activation_func=gelu_tanh)

    def embedding_multiplier(self, cfg) -> float:
        return math.sqrt(cfg.hidden_size)

    def layer_design(self, cfg) -> dict:
        return {"norms": "sandwich", "softcap": cfg.attn_logit_softcapping}

    def layer_weights(self, cfg, layer: int) -> dict:
        p, h = self.layer_prefix.format(layer), cfg.hidden_size
        return dict(super().layer_weights(cfg, layer), **{
            "self_attention.linear_proj.post_norm.weight": Replicated(p + "post_attention_layernorm.weight", (h,)),
            "pre_mlp_layernorm.weight": Replicated(p + "pre_feedforward_layernorm.weight", (h,)),
            "mlp.linear_fc2.post_norm.weight": Replicated(p + "post_feedforward_layernorm.weight", (h,)),
        })


register(Gemma())
