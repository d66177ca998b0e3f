"""Mistral: the Llama layout with sliding-window attention (``sliding_window``)."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture


class Mistral(Architecture):
    model_type = "mistral"
    causal_lm = "MistralForCausalLM"
    sequence_classification = "MistralForSequenceClassification"
    features = ("sliding-window attention",)
    options = ("sliding_window",)

    def config_from_hf(self, hf: dict, source: str) -> dict:
        return dict(super().config_from_hf(hf, source), sliding_window=hf.get("sliding_window"))

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), sliding_window=cfg.sliding_window)


register(Mistral())
