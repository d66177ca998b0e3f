"""Mixtral: the Mistral layer with a mixture-of-experts MLP (megatron-core's ``MoELayer``).

Each token's router logits ``x W_r^T`` (E experts) go through a softmax over all experts,
the top k are kept and renormalised to sum to 1, which equals megatron-core's default
router (top k of the logits, then a softmax over those k); every expert is a SwiGLU MLP of
width ``intermediate_size``. Routing is dropless (no capacity factor), as in transformers.
HF names: ``block_sparse_moe.gate`` (router [E, h]), ``block_sparse_moe.experts.<e>.w1`` /
``w3`` / ``w2`` (gate / up / down of expert e). See docs/moe.md.
"""
from aligner.models.architectures import register
from aligner.models.architectures.base import RoutedExperts, UnsupportedModelError
from aligner.models.architectures.mistral import Mistral


class Mixtral(RoutedExperts, Mistral):
    model_type = "mixtral"
    causal_lm = "MixtralForCausalLM"
    sequence_classification = "MixtralForSequenceClassification"
    features = ("mixture of experts: softmax, top-k renormalised, dropless", "sliding-window attention")
    options = Mistral.options + ("num_experts", "moe_router_topk")
    moe_prefix = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")  # gate, up, down

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("router_jitter_noise"):
            raise UnsupportedModelError(f"{source}: router_jitter_noise = {hf['router_jitter_noise']!r} is not"
                                        " supported (random noise on the router input in training)")
        for key in ("num_local_experts", "num_experts_per_tok"):
            if key not in hf:
                raise UnsupportedModelError(f"{source}: missing key {key!r}")
        return dict(super().config_from_hf(hf, source), num_experts=hf["num_local_experts"],
                    moe_router_topk=hf["num_experts_per_tok"])

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), num_local_experts=cfg.num_experts,
                    num_experts_per_tok=cfg.moe_router_topk, router_jitter_noise=0.0)

    def transformer_config(self, cfg) -> dict:
        # dropless top-k routing (no capacity factor); the aux losses are switched on by
        # the training config, not by the architecture
        return dict(super().transformer_config(cfg), num_moe_experts=cfg.num_experts,
                    moe_router_topk=cfg.moe_router_topk, moe_ffn_hidden_size=cfg.ffn_hidden_size,
                    moe_router_load_balancing_type="none",
                    moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather")


register(Mixtral())
