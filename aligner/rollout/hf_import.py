"""Stopgap: HF Llama-family safetensors into this rank's model for the current TP / PP.

``load_hf(path)`` calls ``aligner.models.from_pretrained`` when the model layer provides it.
Until it does, a direct mapping of the HF tensors onto megatron-core's local-spec parameter
names (no virtual pipeline stages):

- ``q_proj`` / ``k_proj`` / ``v_proj`` -> ``linear_qkv``: per query group, its query heads,
  then its key head, then its value head; TP ranks take whole groups;
- ``gate_proj`` / ``up_proj`` -> ``linear_fc1``: each TP rank holds [gate shard; up shard];
- ``o_proj`` / ``down_proj`` split along the input dimension; embeddings and the output
  layer split along the (padded) vocabulary, padding rows zero.
"""
from __future__ import annotations

from pathlib import Path


def load_hf(path: str, **build_kwargs):
    """(model chunks, ModelConfig) for the current parallel layout, weights from ``path``."""
    try:
        from aligner.models import from_pretrained
    except ImportError:
        from_pretrained = None
    if from_pretrained is not None:
        models, cfg = from_pretrained(path, **build_kwargs)
        return (models if isinstance(models, list) else [models]), cfg
    return _load_direct(path, **build_kwargs)


def score_outputs(path: str) -> int:
    """Outputs of a HF ``*ForSequenceClassification`` checkpoint: rows of its ``score.weight``
    (transformers leaves ``num_labels`` out of config.json when it is the default, 2)."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if "score.weight" in st.keys():
                return int(st.get_slice("score.weight").get_shape()[0])
    raise ValueError(f"{path}: no score.weight in its safetensors: not a sequence-classification (reward) model")


def _load_direct(path: str, **build_kwargs):
    import torch
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from aligner.models.config import ModelConfig
    from aligner.models.gpt import build_model

    cfg = ModelConfig.from_hf(path)
    hf = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    model = build_model(cfg, **build_kwargs)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    d, g, r = cfg.head_dim, cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    vpad = cfg.padded_vocab_size()

    def vocab_rows(w):
        full = torch.zeros(vpad, w.shape[1], dtype=w.dtype)
        full[: w.shape[0]] = w
        return full.chunk(tp, 0)[rank]

    # megatron-core's default split: equal consecutive blocks of layers per stage
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.num_layers // ps.get_pipeline_model_parallel_world_size())
    state = {}
    if model.pre_process:
        state["embedding.word_embeddings.weight"] = vocab_rows(hf["model.embed_tokens.weight"])
    for i in range(len(model.decoder.layers)):
        src, dst = f"model.layers.{offset + i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(g, r * d, -1)
        k = hf[src + "self_attn.k_proj.weight"].view(g, d, -1)
        v = hf[src + "self_attn.v_proj.weight"].view(g, d, -1)
        qkv = torch.cat((q, k, v), dim=1).chunk(tp, 0)[rank]
        state[dst + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, q.shape[-1])
        if src + "self_attn.q_proj.bias" in hf:
            qb = hf[src + "self_attn.q_proj.bias"].view(g, r * d)
            kb = hf[src + "self_attn.k_proj.bias"].view(g, d)
            vb = hf[src + "self_attn.v_proj.bias"].view(g, d)
            state[dst + "self_attention.linear_qkv.bias"] = torch.cat((qb, kb, vb), 1).chunk(tp, 0)[rank].reshape(-1)
        state[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"].chunk(tp, 1)[rank]
        state[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        state[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        gate = hf[src + "mlp.gate_proj.weight"].chunk(tp, 0)[rank]
        up = hf[src + "mlp.up_proj.weight"].chunk(tp, 0)[rank]
        state[dst + "mlp.linear_fc1.weight"] = torch.cat((gate, up), 0)
        state[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"].chunk(tp, 1)[rank]
    if model.post_process:
        state["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if model.head is not None:  # *ForSequenceClassification: the score layer
            state["head.weight"] = hf["score.weight"]
        elif not cfg.tie_word_embeddings:
            state["output_layer.weight"] = vocab_rows(hf["lm_head.weight"])
        elif not model.pre_process:
            state["output_layer.weight"] = vocab_rows(hf["model.embed_tokens.weight"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise KeyError(f"{name} is not a parameter of the model; have {sorted(params)[:8]}...")
            params[name].copy_(value)
    return [model], cfg
