"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture, UnsupportedModelError


class Qwen2(Architecture):
    model_type = "qwen2"
    causal_lm = "Qwen2ForCausalLM"
    sequence_classification = "Qwen2ForSequenceClassification"
    qkv_bias = True
    features = ("q/k/v biases", "tied embeddings")

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: Qwen2 use_sliding_window = true is not supported")
        return super().config_from_hf(hf, source)


register(Qwen2())
