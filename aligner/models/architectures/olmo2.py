"""OLMo 2: norms after attention and after the MLP instead of before (``post_attention_layernorm``,
``post_feedforward_layernorm``: ``layer_spec.PostNormRowParallelLinear``), and an RMSNorm
over the whole query and key projections, all heads together (``q_norm`` [heads · d],
``k_norm`` [groups · d]: ``layer_spec.ProjectionRMSNorm``, split over TP with the heads)."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture, Replicated, Split


class Olmo2(Architecture):
    model_type = "olmo2"
    causal_lm = "Olmo2ForCausalLM"
    sequence_classification = "Olmo2ForSequenceClassification"
    features = ("norms after attention and MLP (no pre-norms)", "q/k RMSNorm over the whole projection")

    def layer_design(self, cfg) -> dict:
        return {"norms": "post", "qk_norm": "projection"}

    def layer_weights(self, cfg, layer: int) -> dict:
        p, h, d = self.layer_prefix.format(layer), cfg.hidden_size, cfg.head_dim
        rules = super().layer_weights(cfg, layer)
        del rules["input_layernorm.weight"], rules["pre_mlp_layernorm.weight"]
        rules.update({
            "self_attention.q_layernorm.weight": Split(p + "self_attn.q_norm.weight", (cfg.num_attention_heads * d,), 0),
            "self_attention.k_layernorm.weight": Split(p + "self_attn.k_norm.weight", (cfg.num_query_groups * d,), 0),
            "self_attention.linear_proj.post_norm.weight": Replicated(p + "post_attention_layernorm.weight", (h,)),
            "mlp.linear_fc2.post_norm.weight": Replicated(p + "post_feedforward_layernorm.weight", (h,)),
        })
        return rules


register(Olmo2())
