"""Qwen2-MoE: the Qwen2 layer (q/k/v biases) with a mixture-of-experts MLP plus one shared
expert (megatron-core's ``MoELayer`` with its ``SharedExpertMLP``).

Routing: each token's router logits ``x W_r^T`` (E experts) go through a softmax over all
experts and the top k probabilities weigh the experts' outputs, renormalised to sum to 1
only under ``norm_topk_prob`` (megatron-core: ``moe_router_pre_softmax`` when they are not,
its default top-k-then-softmax when they are). The shared expert (a SwiGLU MLP of width
``shared_expert_intermediate_size``) sees every token and is weighed by
``sigmoid(x w_g)`` (``shared_expert_gate`` [1, h]: megatron-core's ``moe_shared_expert_gate``).
Routing is dropless, as in transformers. Every layer is an MoE layer: ``decoder_sparse_step``
other than 1 and a non-empty ``mlp_only_layers`` (dense layers among them) are refused.

HF names (:meth:`RoutedExperts.expert_weights` maps one routed expert from ``expert_names``): ``mlp.gate`` (router [E, h]), ``mlp.experts.<e>.gate_proj`` / ``up_proj`` /
``down_proj``, ``mlp.shared_expert.gate_proj`` / ``up_proj`` / ``down_proj``,
``mlp.shared_expert_gate``. See docs/moe.md.
"""
from aligner.models.architectures import register
from aligner.models.architectures.base import GLU, Replicated, RoutedExperts, Split, UnsupportedModelError, refuse
from aligner.models.architectures.qwen2 import Qwen2


class QwenMoE(RoutedExperts):
    """What Qwen2-MoE and Qwen3-MoE share on top of their dense layer (a mixin placed before
    the dense family): the MoE config keys, the router and the routed experts' HF names."""

    options = ("num_experts", "moe_router_topk", "moe_norm_topk_prob")
    defaults = {"moe_norm_topk_prob": False}  # transformers' default of norm_topk_prob
    moe_prefix = "mlp."

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("decoder_sparse_step", 1) != 1:
            raise refuse(source, "decoder_sparse_step", hf["decoder_sparse_step"],
                         "dense MLP layers between the MoE layers; 1 = every layer MoE is supported")
        if hf.get("mlp_only_layers"):
            raise refuse(source, "mlp_only_layers", hf["mlp_only_layers"],
                         "dense MLP layers among the MoE layers; [] is supported")
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        for key, value in (("num_experts", experts), ("num_experts_per_tok", hf.get("num_experts_per_tok")),
                           ("moe_intermediate_size", hf.get("moe_intermediate_size"))):
            if value is None:
                raise UnsupportedModelError(f"{source}: missing key {key!r}")
        fields = super().config_from_hf(hf, source)
        # ffn_hidden_size is one routed expert's width; intermediate_size (the width of
        # the dense layers, which every-layer-MoE models do not have) is kept in hf_config
        return dict(fields, ffn_hidden_size=hf["moe_intermediate_size"], num_experts=experts,
                    moe_router_topk=hf["num_experts_per_tok"],
                    moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)))

    def hf_config(self, cfg) -> dict:
        dense = (cfg.hf_config or {}).get("intermediate_size", cfg.ffn_hidden_size)
        return dict(super().hf_config(cfg), intermediate_size=dense, moe_intermediate_size=cfg.ffn_hidden_size,
                    num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                    norm_topk_prob=bool(cfg.moe_norm_topk_prob), decoder_sparse_step=1, mlp_only_layers=[])

    def transformer_config(self, cfg) -> dict:
        # dropless top-k routing; without renormalisation the softmax comes before the top
        # k. The aux losses are switched on by the training config (the moe section).
        return dict(super().transformer_config(cfg), num_moe_experts=cfg.num_experts,
                    moe_router_topk=cfg.moe_router_topk, moe_ffn_hidden_size=cfg.ffn_hidden_size,
                    moe_router_pre_softmax=not cfg.moe_norm_topk_prob,
                    moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                    moe_token_dispatcher_type="allgather")


class Qwen2Moe(QwenMoE, Qwen2):
    model_type = "qwen2_moe"
    causal_lm = "Qwen2MoeForCausalLM"
    sequence_classification = "Qwen2MoeForSequenceClassification"
    features = ("q/k/v biases", "mixture of experts: softmax, top-k (renormalised under norm_topk_prob),"
                " dropless", "a shared expert weighed by a sigmoid gate")
    options = QwenMoE.options + ("moe_shared_expert_size",)

    def config_from_hf(self, hf: dict, source: str) -> dict:
        if hf.get("qkv_bias", True) is not True:
            raise refuse(source, "qkv_bias", hf["qkv_bias"], "Qwen2-MoE without q/k/v biases")
        if "shared_expert_intermediate_size" not in hf:
            raise UnsupportedModelError(f"{source}: missing key 'shared_expert_intermediate_size'")
        return dict(super().config_from_hf(hf, source),
                    moe_shared_expert_size=hf["shared_expert_intermediate_size"])

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if cfg.num_experts and not cfg.moe_shared_expert_size:
            raise UnsupportedModelError(f"model.moe_shared_expert_size = {cfg.moe_shared_expert_size!r}: HF"
                                        f" {self.causal_lm} always has a shared expert (expected its width)")

    def hf_config(self, cfg) -> dict:
        return dict(super().hf_config(cfg), shared_expert_intermediate_size=cfg.moe_shared_expert_size,
                    qkv_bias=True)

    def transformer_config(self, cfg) -> dict:
        return dict(super().transformer_config(cfg), moe_shared_expert_intermediate_size=cfg.moe_shared_expert_size,
                    moe_shared_expert_gate=True)

    def layer_weights(self, cfg, layer: int) -> dict:
        rules = super().layer_weights(cfg, layer)
        p = self.layer_prefix.format(layer) + self.moe_prefix
        h, f = cfg.hidden_size, cfg.moe_shared_expert_size
        rules.update({
            "mlp.shared_experts.linear_fc1.weight": GLU(f, h, gate=p + "shared_expert.gate_proj.weight",
                                                        up=p + "shared_expert.up_proj.weight"),
            "mlp.shared_experts.linear_fc2.weight": Split(p + "shared_expert.down_proj.weight", (h, f), dim=1),
            "mlp.shared_experts.gate_weight": Replicated(p + "shared_expert_gate.weight", (1, h)),
        })
        return rules


register(Qwen2Moe())
