"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with q/k/v in one fused ``qkv_proj``
([q; k; v] rows) and gate/up in one ``gate_up_proj`` ([gate; up] rows), partial rotary
embedding (``partial_rotary_factor``) and an optional sliding window on every layer.
The ``longrope`` scaling of the 128k-context models is refused."""
from aligner.models.architectures import register
from aligner.models.architectures.base import GLU, QKV, Architecture


class Phi3(Architecture):
    model_type = "phi3"
    causal_lm = "Phi3ForCausalLM"
    sequence_classification = "Phi3ForSequenceClassification"
    features = ("fused qkv_proj and gate_up_proj weights", "partial rotary embedding", "sliding-window attention")
    options = ("sliding_window", "partial_rotary_factor")

    def config_from_hf(self, hf: dict, source: str) -> dict:
        return dict(super().config_from_hf(hf, source), sliding_window=hf.get("sliding_window"))

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), sliding_window=cfg.sliding_window)

    def layer_weights(self, cfg, layer: int) -> dict:
        p = self.layer_prefix.format(layer)
        return dict(super().layer_weights(cfg, layer), **{
            "self_attention.linear_qkv.weight": QKV(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim,
                                                    (cfg.hidden_size,), fused=p + "self_attn.qkv_proj.weight"),
            "mlp.linear_fc1.weight": GLU(cfg.ffn_hidden_size, cfg.hidden_size, fused=p + "mlp.gate_up_proj.weight"),
        })


register(Phi3())
