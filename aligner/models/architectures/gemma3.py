"""Gemma 3 (text): Gemma 2's layout (:mod:`.gemma2`) with a ``1 + w`` RMSNorm on each
head's query and key, its own rope on the sliding-window layers (``rope_local_base_freq``,
unscaled; the global layers may scale theirs), five windowed layers to one global, and no
attention-logit soft-capping (transformers' Gemma 3 does not apply it, so a config that
sets it is refused)."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Replicated, refuse, rope_from_hf
from aligner.models.architectures.gemma2 import Gemma


class Gemma3Text(Gemma):
    model_type = "gemma3_text"
    causal_lm = "Gemma3ForCausalLM"
    sequence_classification = "Gemma3TextForSequenceClassification"
    features = ("embedding scale sqrt(hidden)", "(1 + w) RMSNorm", "pre and post norms", "GeGLU (tanh GELU)",
                "independent head_dim", "query_pre_attn_scalar", "per-head (1 + w) q/k RMSNorm",
                "final-logit soft-capping", "sliding-window / global layers (5:1)",
                "local rope base on sliding-window layers", "tied embeddings")
    options = ("sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping",
               "rope_local_theta")
    defaults = {"rope_local_theta": 10000.0}  # transformers' rope_local_base_freq
    window_pattern = 6

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("attn_logit_softcapping") is not None:
            raise refuse(source, "attn_logit_softcapping", hf["attn_logit_softcapping"],
                         "transformers' Gemma 3 does not apply it")
        fields = super().config_from_hf(hf, source)
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: one rope per layer type
            theta, scaling, partial = rope_from_hf(hf, source, params["full_attention"])
            local_theta, local_scaling, _ = rope_from_hf(hf, source, params.get("sliding_attention") or {})
            if local_scaling:
                raise refuse(source, "rope_parameters.sliding_attention", params["sliding_attention"],
                             "the local rope is unscaled")
            fields.update(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial)
        else:
            local_theta = hf.get("rope_local_base_freq", self.defaults["rope_local_theta"])
        return dict(fields, rope_local_theta=float(local_theta))

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), rope_local_base_freq=cfg.rope_local_theta)

    def transformer_config(self, cfg) -> dict:
        return dict(super().transformer_config(cfg), qk_layernorm=True)

    def layer_design(self, cfg) -> dict:
        return {"norms": "sandwich", "qk_norm": "head", "local_rope": True}

    def layer_weights(self, cfg, layer: int) -> dict:
        attn, d = self.layer_prefix.format(layer) + "self_attn.", cfg.head_dim
        return dict(super().layer_weights(cfg, layer),
                    **{"self_attention.q_layernorm.weight": Replicated(attn + "q_norm.weight", (d,)),
                       "self_attention.k_layernorm.weight": Replicated(attn + "k_norm.weight", (d,))})


register(Gemma3Text())
