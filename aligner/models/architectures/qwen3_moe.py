"""Qwen3-MoE: the Qwen3 layer (per-head q/k RMSNorm) with a mixture-of-experts MLP
(megatron-core's ``MoELayer``), no shared expert.

Routing as Qwen2-MoE's (:class:`~aligner.models.architectures.qwen2_moe.QwenMoE`): softmax
over all experts, top k, renormalised to sum to 1 under ``norm_topk_prob`` (which the
released Qwen3-MoE checkpoints set); dropless. HF names: ``mlp.gate`` (router [E, h]),
``mlp.experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``. See docs/moe.md.
"""
from aligner.models.architectures import register
from aligner.models.architectures.qwen2_moe import QwenMoE
from aligner.models.architectures.qwen3 import Qwen3


class Qwen3Moe(QwenMoE, Qwen3):
    model_type = "qwen3_moe"
    causal_lm = "Qwen3MoeForCausalLM"
    sequence_classification = "Qwen3MoeForSequenceClassification"
    features = ("per-head q/k RMSNorm", "head_dim independent of hidden / heads",
                "mixture of experts: softmax, top-k (renormalised under norm_topk_prob), dropless")

    def hf_config(self, cfg) -> dict:
        # transformers' Qwen3MoeConfig names num_experts num_local_experts (an alias)
        return dict(super().hf_config(cfg), num_local_experts=cfg.num_experts)


register(Qwen3Moe())
