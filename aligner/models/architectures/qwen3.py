"""Qwen3 (dense): the Llama layout with an RMSNorm on each head's query and key before
the rotation (megatron-core's ``qk_layernorm``), ``head_dim`` independent of hidden / heads."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture, Replicated, UnsupportedModelError


class Qwen3(Architecture):
    model_type = "qwen3"
    causal_lm = "Qwen3ForCausalLM"
    sequence_classification = "Qwen3ForSequenceClassification"
    features = ("per-head q/k RMSNorm", "head_dim independent of hidden / heads", "tied embeddings")

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: Qwen3 use_sliding_window = true is not supported")
        return super().config_from_hf(hf, source)

    def transformer_config(self, cfg) -> dict:
        return dict(super().transformer_config(cfg), qk_layernorm=True)

    def layer_design(self, cfg) -> dict:
        return {"qk_norm": "head"}

    def layer_weights(self, cfg, layer: int) -> dict:
        attn, d = self.layer_prefix.format(layer) + "self_attn.", cfg.head_dim
        return dict(super().layer_weights(cfg, layer),
                    **{"self_attention.q_layernorm.weight": Replicated(attn + "q_norm.weight", (d,)),
                       "self_attention.k_layernorm.weight": Replicated(attn + "k_norm.weight", (d,))})


register(Qwen3())
