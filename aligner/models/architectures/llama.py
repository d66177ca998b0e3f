"""Llama (Llama 2, Llama 3 / 3.1 with ``llama3`` RoPE scaling, Llama 3.2 with tied
embeddings): the layout every other family starts from (:class:`~.base.Architecture`)."""
from aligner.models.architectures import register
from aligner.models.architectures.base import Architecture


class Llama(Architecture):
    model_type = "llama"
    causal_lm = "LlamaForCausalLM"
    sequence_classification = "LlamaForSequenceClassification"
    features = ("RoPE scaling (llama3, linear)", "tied embeddings")

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), attention_bias=False, mlp_bias=False)


register(Llama())
