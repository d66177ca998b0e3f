"""LoRA adapters against PEFT on transformers, and under TP / PP / DP.

One tiny Llama (HF); the same adapter values (random A and non-zero B, so that every
gradient is non-trivial) are copied into aligner's adapters and into a PEFT model. One SFT
step (token-mean NLL over a right-padded batch, through the loop's DDP role and pipeline
schedule) gives the loss and every adapter gradient, compared by HF module name with
PEFT's (1e-5), at TP1 (one process) and at TP2, PP2, DP2 (one 2-process job); the
merged HF export and the PEFT folder written at TP2, loaded by transformers and by
``peft.PeftModel.from_pretrained``, give PEFT's logits (1e-5); that folder imported at TP1
(whose step then starts from it) and exported again is byte-identical. With adapter dropout
(0.25) one step at TP2 equals one at TP1 (the masks are drawn alike, docs/lora.md). The
rollout engine generates with the adapters: greedy tokens and log-probs of both decode
implementations (the fused decoder adds the low-rank path itself) at TP1 and TP2 equal
PEFT's (1e-5). The base fingerprint
that adapter checkpoints record is the same at every layout.
"""
from pathlib import Path

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

VOCAB, RANK, ALPHA = 64, 4, 8.0
PROMPTS, NEW_TOKENS = [[5, 9, 17, 33], [40, 2, 11]], 6
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 1e-5


def _batch():
    """tokens [4, 10] right-padded (pad 0), loss mask on the answer tokens (after 3 prompt tokens)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, VOCAB, (4, 10), generator=g)
    lengths = torch.tensor([10, 7, 9, 5])
    mask = torch.zeros(4, 10)
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
        mask[i, 3:n] = 1.0
    return tokens, mask


def _adapter_values(hf_modules):
    """HF module name -> (A [r, in], B [out, r]), random and identical everywhere."""
    g = torch.Generator().manual_seed(11)
    return {name: (torch.randn(RANK, i, generator=g) * 0.2, torch.randn(o, RANK, generator=g) * 0.2)
            for name, (o, i) in sorted(hf_modules.items())}


def _hf_modules(cfg):
    """HF module name -> (out, in) of every adapted module of the tiny Llama."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    shapes = {"q_proj": (cfg.num_attention_heads * d, h), "k_proj": (cfg.num_query_groups * d, h),
              "v_proj": (cfg.num_query_groups * d, h), "o_proj": (h, cfg.num_attention_heads * d),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    return {f"model.layers.{i}.{'mlp' if n in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{n}": s
            for i in range(cfg.num_layers) for n, s in shapes.items()}


def _generated(models, cfg):
    """Greedy responses (token ids and their log-probs) of both decode implementations."""
    from aligner.rollout import GenerationConfig, RolloutEngine

    for m in models:
        m.eval()
    out = {}
    # fused_refill: one slot, so the second prompt is prefilled into it by the fused decoder
    for name, impl, max_batch in (("fused", "fused", 64), ("megatron", "megatron", 64), ("fused_refill", "fused", 1)):
        engine = RolloutEngine(models, cfg, decode_impl=impl, max_batch=max_batch)
        res = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[]))
        out[name] = ([res.response_tokens(i) for i in range(len(res))],
                     [res.response_logprobs(i) for i in range(len(res))], type(engine.decoder).__name__)
    assert engine.continuous and engine.forwards > 0
    return out


def _lora_step(hf_dir, tp, pp, export_to=None, peft_from=None, peft_to=None, dropout=0.0, generate=False):
    """One SFT step's loss and adapter gradients at this layout: this rank's
    ``{"loss": .., "grads": {(hf_module, "A"|"B"): (local grad, split, tp_rank)}}``.
    ``peft_from``: the adapter values imported from that PEFT folder (else copied in);
    ``export_to`` / ``peft_to``: then a merged HF export / a PEFT folder written there."""
    from megatron.core import parallel_state as ps

    from aligner.models import build_model, load_hf_weights
    from aligner.models.config import ModelConfig
    from aligner.models.lora import LoraSettings, apply_lora, lora_layers
    from aligner.training.batching import shifted_logprobs
    from aligner.training.config import OptimSection
    from aligner.training.metrics import metric
    from aligner.training.roles import build_trainable_role, run_schedule

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(ParallelConfig(tp=tp, pp=pp, seed=1))
    cfg = ModelConfig.from_hf(hf_dir)
    cfg.layer_spec = "local"
    models = [build_model(cfg)]
    load_hf_weights(models, hf_dir, cfg)
    apply_lora(models, cfg, LoraSettings(rank=RANK, alpha=ALPHA, dropout=dropout))
    trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), trainable
    values = _adapter_values(_hf_modules(cfg))
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if peft_from:
        from aligner.models.lora_peft import load_peft

        load_peft(models, peft_from)
    with torch.no_grad():
        for layer in ([] if peft_from else lora_layers(models)):
            for part in layer.parts.values():
                a, b = values[part.hf_module]
                if part.split == "out":
                    per = b.shape[0] // tp_size
                    b = b[tp_rank * per:(tp_rank + 1) * per]
                else:
                    per = a.shape[1] // tp_size
                    a = a[:, tp_rank * per:(tp_rank + 1) * per]
                part.lora_A.copy_(a)
                part.lora_B.copy_(b)
    role = build_trainable_role("policy", models, OptimSection(name="sgd", lr=0.0), max_steps=1)
    tokens, mask = _batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = tokens.shape[0] // dp
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    micro = [{"tokens": tokens[mine][i:i + 1], "loss_mask": mask[mine][i:i + 1]} for i in range(rows)]

    def loss(batch, logits):
        lp = shifted_logprobs(logits, batch["tokens"])
        nll = -(lp * batch["loss_mask"]).sum()
        count = batch["loss_mask"].sum()
        return nll, count.round().long(), {"loss": metric(nll, count)}

    role.zero_grad()
    torch.manual_seed(123)  # the adapters' dropout masks: the same draws at every layout
    out = run_schedule(role.chunks, micro, lambda m, b: m(b["tokens"], None, None), loss, forward_only=False)
    loss_value = None
    if out:  # the last pipeline stage: (Σ nll, Σ tokens) over its micro-batches and DP
        sums = torch.stack([m["loss"] for m in out]).sum(0)
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
        loss_value = float(sums[0] / sums[1])
    grads = {}
    for layer in lora_layers(models):
        for part in layer.parts.values():
            for which, p in (("A", part.lora_A), ("B", part.lora_B)):
                grads[(part.hf_module, which)] = (p.main_grad.detach().clone(), part.split, tp_rank)
    if export_to:
        from aligner.models import export_hf

        export_hf(models, cfg, export_to)
    if peft_to:
        from aligner.models.lora_peft import export_peft

        export_peft(models, peft_to)
    from aligner.models.checkpoint import base_fingerprint

    return {"loss": loss_value, "grads": grads, "fingerprint": base_fingerprint(models),
            "generated": _generated(models, cfg) if generate else None}


def _full_grads(results):
    """Rank results -> ``{(hf_module, which): full grad}`` (TP shards concatenated; DP
    replicas checked equal)."""
    parts = {}
    for r in results:
        for key, (g, split, tp_rank) in r["grads"].items():
            parts.setdefault(key, {}).setdefault(tp_rank, []).append((g, split))
    full = {}
    for (module, which), by_rank in parts.items():
        for copies in by_rank.values():
            for g, _ in copies[1:]:
                assert torch.equal(g, copies[0][0]), (module, which)
        shards = [by_rank[k][0][0] for k in sorted(by_rank)]
        split = by_rank[0][0][1]
        sharded = (split == "out" and which == "B") or (split == "in" and which == "A")
        full[(module, which)] = torch.cat(shards, 0 if split == "out" else 1) if sharded else shards[0]
    return full


def _world2(hf_dir, merged_dir, peft_dir):
    return {"tp2": _lora_step(hf_dir, 2, 1, export_to=merged_dir, peft_to=peft_dir, generate=True),
            "pp2": _lora_step(hf_dir, 1, 2),
            "dp2": _lora_step(hf_dir, 1, 1), "tp2_dropout": _lora_step(hf_dir, 2, 1, dropout=0.25)}


def _world1(hf_dir, peft_from, peft_to):
    return {"tp1": _lora_step(hf_dir, 1, 1, peft_from=peft_from, peft_to=peft_to, generate=True),
            "tp1_dropout": _lora_step(hf_dir, 1, 1, dropout=0.25)}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 pad_token_id=0, tie_word_embeddings=False)).save_pretrained(root / "llama")
    return str(root / "llama")


def _peft_model(hf_dir, hf_modules):
    """PEFT on transformers' Llama from ``hf_dir``, its adapters set to the values aligner's hold."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (a, b) in _adapter_values(hf_modules).items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(a)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(b)
    return model


def _peft_step(hf_dir, hf_modules):
    """PEFT's loss, adapter gradients and logits for the same batch and adapter values."""
    model = _peft_model(hf_dir, hf_modules)
    tokens, mask = _batch()
    logits = model(input_ids=tokens, attention_mask=(tokens > 0).long()).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    loss = -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.float().backward()
    params = dict(model.named_parameters())
    grads = {}
    for name in hf_modules:
        grads[(name, "A")] = params[f"base_model.model.{name}.lora_A.default.weight"].grad
        grads[(name, "B")] = params[f"base_model.model.{name}.lora_B.default.weight"].grad
    return float(loss.detach()), grads, logits.detach()


def test_lora_sft_step_equals_peft_at_every_layout(tiny_llama):
    from aligner.models.config import ModelConfig

    hf_modules = _hf_modules(ModelConfig.from_hf(tiny_llama))
    ref_loss, ref_grads, ref_logits = _peft_step(tiny_llama, hf_modules)
    assert len(ref_grads) == 2 * len(hf_modules) == 28
    merged, peft_tp2, peft_tp1 = (f"{tiny_llama}_{name}" for name in ("merged_tp2", "peft_tp2", "peft_tp1"))
    world2 = spawn_local(_world2, 2, tiny_llama, merged, peft_tp2, timeout=400)
    # TP1 starts from the PEFT folder written at TP2 and writes it again
    world1 = spawn_local(_world1, 1, tiny_llama, peft_tp2, peft_tp1, timeout=300)
    layouts = {"tp1": [world1[0]["tp1"]]}
    for name in ("tp2", "pp2", "dp2"):
        layouts[name] = [r[name] for r in world2]

    # adapter dropout (0.25): TP2 draws TP1's masks (loss and every gradient equal), and they drop something
    tp1, tp2 = _full_grads([world1[0]["tp1_dropout"]]), _full_grads([r["tp2_dropout"] for r in world2])
    assert abs(world1[0]["tp1_dropout"]["loss"] - world2[0]["tp2_dropout"]["loss"]) < TOL
    assert abs(world1[0]["tp1_dropout"]["loss"] - ref_loss) > 1e-3
    assert set(tp1) == set(tp2) == set(ref_grads)
    for key in tp1:
        assert (tp1[key] - tp2[key]).abs().max() < TOL, key
    # rollout generates with the adapters: both decode paths at TP1 and TP2 give PEFT's greedy tokens and log-probs
    reference = _peft_greedy(tiny_llama, hf_modules)
    for name, result in (("tp1", world1[0]["tp1"]), ("tp2", world2[0]["tp2"])):
        assert result["generated"]["fused"][2] == result["generated"]["fused_refill"][2] == "FusedDecoder"
        for impl, (tokens, logprobs, _) in result["generated"].items():
            for (ref_tokens, ref_lp), got, got_lp in zip(reference, tokens, logprobs):
                assert got == ref_tokens, (name, impl, got, ref_tokens)
                assert (got_lp.double() - ref_lp).abs().max() < TOL, (name, impl)

    # the base fingerprint of adapter checkpoints does not depend on the layout
    fingerprints = {r["fingerprint"] for results in layouts.values() for r in results}
    assert len(fingerprints) == 1 and len(next(iter(fingerprints))) == 16, fingerprints
    for name, results in layouts.items():
        losses = {r["loss"] for r in results if r["loss"] is not None}
        assert losses, name
        assert all(abs(v - ref_loss) < TOL for v in losses), (name, losses, ref_loss)
        grads = _full_grads(results)
        assert set(grads) == set(ref_grads), name
        for key, ref in ref_grads.items():
            assert ref.abs().max() > 1e-4, key  # a gradient that says something
            err = (grads[key] - ref).abs().max().item()
            assert err < TOL, (name, key, err)

    # the merged export (written at TP2) loaded by transformers gives PEFT's logits
    from transformers import LlamaForCausalLM

    tokens, mask = _batch()
    attention = (tokens > 0).long()
    merged_logits = LlamaForCausalLM.from_pretrained(merged).eval()(input_ids=tokens, attention_mask=attention).logits
    real = attention.bool()
    err = (merged_logits[real] - ref_logits[real]).abs().max().item()
    assert err < TOL, err

    # the PEFT folder written at TP2, loaded by peft on the HF base, gives PEFT's logits;
    # imported at TP1 and exported again it is the same bytes
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), peft_tp2).eval()
    peft_logits = peft_model(input_ids=tokens, attention_mask=attention).logits
    err = (peft_logits[real] - ref_logits[real]).abs().max().item()
    assert err < TOL, err
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(peft_tp1) / name).read_bytes() == (Path(peft_tp2) / name).read_bytes(), name


def _peft_greedy(hf_dir, hf_modules):
    """PEFT's greedy responses and their log-probs for PROMPTS (the same adapter values)."""
    model = _peft_model(hf_dir, hf_modules)
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            logits = model(input_ids=seq).logits[0].double()
        new = seq[0, len(prompt):]
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, new[:, None])[:, 0]
        out.append((new.tolist(), lp))
    return out
