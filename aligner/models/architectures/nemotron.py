"""Nemotron (the Nemotron-4 family): LayerNorm1p with bias (``layer_norm(x; 1 + w, b)``,
megatron-core's zero-centred gamma), an MLP without gate, ``down(relu(up(x))^2)``, and
partial rotary embedding (``partial_rotary_factor``, 0.5 when the config leaves it out,
as transformers reads it)."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture, Replicated, Split


class Nemotron(Architecture):
    model_type = "nemotron"
    causal_lm = "NemotronForCausalLM"
    sequence_classification = "NemotronForSequenceClassification"
    features = ("LayerNorm1p with bias", "squared-ReLU MLP without gate", "partial rotary embedding")
    options = ("partial_rotary_factor",)
    activations = ("relu2",)
    norm_eps_key = "norm_eps"

    def config_from_hf(self, hf: dict, source: str) -> dict:
        given = "partial_rotary_factor" in hf or "partial_rotary_factor" in (hf.get("rope_parameters") or {})
        fields = super().config_from_hf(hf, source)
        return fields if given else dict(fields, partial_rotary_factor=0.5)

    def hf_config(self, cfg) -> dict:
        return {"hidden_act": "relu2", "norm_eps": cfg.norm_eps, "partial_rotary_factor": cfg.partial_rotary_factor}

    def transformer_config(self, cfg) -> dict:
        from aligner.models.layer_spec import squared_relu  # megatron-core: loaded when a model is built

        return dict(super().transformer_config(cfg), normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                    gated_linear_unit=False, activation_func=squared_relu)

    def global_weights(self, cfg, head=None) -> dict:
        return dict(super().global_weights(cfg, head),
                    **{"decoder.final_layernorm.bias": Replicated("model.norm.bias", (cfg.hidden_size,))})

    def layer_weights(self, cfg, layer: int) -> dict:
        p, h, f = self.layer_prefix.format(layer), cfg.hidden_size, cfg.ffn_hidden_size
        return dict(super().layer_weights(cfg, layer), **{
            "input_layernorm.bias": Replicated(p + "input_layernorm.bias", (h,)),
            "pre_mlp_layernorm.bias": Replicated(p + "post_attention_layernorm.bias", (h,)),
            "mlp.linear_fc1.weight": Split(p + "mlp.up_proj.weight", (f, h), 0),
        })


register(Nemotron())
