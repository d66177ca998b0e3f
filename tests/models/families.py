"""The parity harness of the architecture families: tiny random checkpoints made with
transformers' own config classes, what aligner computes from them (spawned jobs) and what
transformers computes from them (this process).

Every family in :data:`FAMILIES` gets the same checks (tests/models/test_families.py):

- the last position's logits of :data:`PROMPTS` (up to 128 tokens, longer than any
  window) at TP=1, TP=2 and PP=2 against transformers' forward (fp32, :data:`LOGITS_TOL`);
- greedy decoding of :data:`NEW_TOKENS` tokens at TP=1, TP=2 and PP=2, with both decode
  paths of the rollout engine (the fused decoder and megatron-core's KV-cached forward),
  identical to ``transformers.generate``; and with continuous batching refilling a slot
  mid-flight (a stop token ends one row early), each response HF's of its prompt alone;
  the logits and decoding checks also at TP=2 with sequence parallelism for
  :data:`SP_FAMILIES` (the MoE families, which train at TP > 1 only with it, and Gemma 2);
- the SFT and the DPO trainer at TP=2 (sequence parallel for :data:`MOE_FAMILIES`; ``init.hf``, ``data.template=raw``, two SGD steps,
  no clipping) against the same losses computed with transformers: step 1's loss,
  log-probs and gradient norm, and step 2's loss after one update (:data:`LOSS_TOL`);
- export at TP=2 -> transformers loads the same class and computes the same logits
  (:data:`EXPORT_TOL`), the exported tensors equal the source's; import of that export at
  PP=2 -> export again gives the same files.

Checkpoints: 2 layers (4 where a family alternates layer kinds), hidden 64, 4 heads over 2
key/value groups, vocabulary 100 (padded to 128: at TP=2 rank 1 holds 28 padding rows),
weights drawn with ``initializer_range`` 0.2 so greedy choices are far from ties; norm
weights are 1 plus small noise (so a norm mapped to the wrong place shows), as are the
"1 + w" norms' effective scales; biases are small random values. Llama and Qwen2 tie their
embeddings; the Gemmas do not (:func:`_hf_model` says why).

The mixture-of-experts families also at EP=2 (each rank holds half the experts, the two
ranks being the data-parallel group): logits and greedy decoding as above, greedy decoding
with the two ranks generating different prompts and numbers of tokens (their MoE layers
exchange tokens at every step), and export at EP=2 (transformers' logits, tensors equal).

Jobs: one world-2 job (TP=2, then PP=2, then EP=2 in the same processes) and one world-1
job (TP=1), each going over every family.
"""
import json
import math
from pathlib import Path

import torch

VOCAB, PAD, BOS, EOS = 100, 0, 1, 2
NEW_TOKENS = 32
LOGITS_TOL = 1e-5
EXPORT_TOL = 1e-6
LOSS_TOL = 1e-5
# SGD steps that move each loss well clear of the tolerances and short of saturation: SFT's
# by 25-55 %, DPO's from log 2 to 0.08-0.66 (a DPO loss near 0 would compare nothing)
LR = {"sft": 0.05, "dpo": 1e-4}
BETA = 0.5


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


# lengths close to each other: the engine feeds a longer prompt's tail one column per step
PROMPTS = [_ids(116, 1), _ids(122, 2), _ids(128, 3)]


def _words(n, seed):
    return " ".join(f"w{i}" for i in _ids(n, seed))


SFT_ROWS = [{"messages": [{"role": "user", "content": _words(20 + i, 10 + i)},
                          {"role": "assistant", "content": _words(8 - i, 20 + i)}]} for i in range(2)]
PAIRS = [{"prompt": _words(24 - i, 30 + i), "chosen": _words(6 + i, 40 + i), "rejected": _words(4, 50 + i)}
         for i in range(2)]


# ---------------------------------------------------------------------------- checkpoints
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=192, initializer_range=0.2, pad_token_id=PAD,
              bos_token_id=BOS, eos_token_id=EOS)


def _hf_model(name):
    """A random transformers model of family ``name`` (the harness's tiny shape)."""
    import transformers as tf

    if name == "llama":  # Llama 3.2: tied embeddings, llama3 rope scaling
        return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    if name == "mistral":  # a window shorter than the prompts
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=16))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=True))
    if name == "qwen3":  # head_dim 24: q / k / v widths differ from hidden
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=24))
    # Gemma untied: tied, the token's own embedding (x sqrt(h)) dominates the last hidden state
    # of these tiny models and greedy decoding repeats one token, which would compare nothing
    if name == "gemma2":  # 4 layers: windowed, global, windowed, global
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON_4, head_dim=32, sliding_window=16, query_pre_attn_scalar=20,
                                                    attn_logit_softcapping=8.0, final_logit_softcapping=12.0,
                                                    tie_word_embeddings=False))
    if name == "gemma3":  # 4 layers, windowed but the last; the global layers' rope scaled
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **COMMON_4, head_dim=32, sliding_window=16, query_pre_attn_scalar=20, final_logit_softcapping=12.0,
            tie_word_embeddings=False,
            layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}}))
    if name == "phi3":  # three quarters of each head rotated, a window shorter than the prompts
        return tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, sliding_window=24, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}))
    if name == "olmo2":
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**COMMON))
    if name == "mixtral":  # 4 experts, top-2, a window shorter than the prompts
        return tf.MixtralForCausalLM(tf.MixtralConfig(**MOE, sliding_window=24))
    if name == "qwen2_moe":  # top-k not renormalised, a shared expert behind its sigmoid gate
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**QWEN_MOE, norm_topk_prob=False,
                                                        shared_expert_intermediate_size=48))
    if name == "qwen3_moe":  # top-k renormalised, q/k norms, head_dim 24
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**QWEN_MOE, norm_topk_prob=True, head_dim=24))
    if name == "nemotron":  # half of each head rotated (transformers' default)
        return tf.NemotronForCausalLM(tf.NemotronConfig(**COMMON))
    raise ValueError(name)


COMMON_4 = dict(COMMON, num_hidden_layers=4)
# the mixture-of-experts families: 4 experts of width 32, each token routed to 2
MOE = dict(COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
QWEN_MOE = dict(COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "nemotron", "mixtral",
            "qwen2_moe", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
SP_FAMILIES = MOE_FAMILIES + ("gemma2",)


def make_checkpoint(root, name):
    """Save family ``name``'s tiny random model and a word-level tokenizer (``w<i>`` = id i)
    in ``root/name``; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(root) / name
    torch.manual_seed(sum(map(ord, name)))
    model = _hf_model(name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):  # 1 + noise as a scale ("1 + w" norms store w)
                p.copy_((0.0 if p.abs().max() == 0 else 1.0) + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):  # transformers starts biases at 0, which would hide a misplaced one
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"w{PAD}", bos_token=f"w{BOS}", eos_token=f"w{EOS}",
                            unk_token="w3").save_pretrained(path)
    for fname, rows in (("sft.jsonl", SFT_ROWS), ("pairs.jsonl", PAIRS)):
        (path / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- transformers
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_last_logits(model):
    """[len(PROMPTS), VOCAB]: each prompt's last-position logits (one prompt at a time)."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in PROMPTS])


def hf_greedy(model):
    """NEW_TOKENS greedy tokens per prompt (no stop token, as the engine is asked)."""
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=PAD)
            out.append(seq[0, len(p):].tolist())
    return out


def _encode(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _response_logps(model, prompt, response):
    """Σ log p(response | prompt) (fp64 softmax of the fp32 logits) and the token count."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1:].sum(), len(response)


def _sgd_step(model, lr):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def _grad_norm(model):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))


def hf_sft(path):
    """Per step (before its update): token-mean NLL of the responses + EOS and the gradient
    norm, two SGD steps (the ``raw`` template: prompt, response, EOS)."""
    model, encode = hf_model(path), _encode(path)
    rows = [(encode(r["messages"][0]["content"]), encode(r["messages"][1]["content"]) + [EOS]) for r in SFT_ROWS]
    steps = []
    for _ in range(2):
        parts = [_response_logps(model, p, r) for p, r in rows]
        loss = -sum(lp for lp, _ in parts) / sum(n for _, n in parts)
        loss.backward()
        steps.append({"loss": loss.item(), "grad_norm": _grad_norm(model)})
        _sgd_step(model, LR["sft"])
    return steps


def hf_dpo(path):
    """Per step: the DPO loss (Rafailov et al. 2023, eq. 7) over :data:`PAIRS`, mean chosen /
    rejected log-probs and the gradient norm; two SGD steps, the reference being the
    initial model."""
    model, encode = hf_model(path), _encode(path)
    seqs = [(encode(p["prompt"]), encode(p[k]) + [EOS]) for p in PAIRS for k in ("chosen", "rejected")]

    def logps():
        out = torch.stack([_response_logps(model, p, r)[0] for p, r in seqs])
        return out[0::2], out[1::2]

    with torch.no_grad():
        ref_c, ref_r = logps()
    steps = []
    for _ in range(2):
        pc, pr = logps()
        loss = (-torch.nn.functional.logsigmoid(BETA * ((pc - ref_c) - (pr - ref_r)))).mean()
        loss.backward()
        steps.append({"loss": loss.item(), "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item(),
                      "grad_norm": _grad_norm(model)})
        _sgd_step(model, LR["dpo"])
    return steps


# ---------------------------------------------------------------------------- aligner (ranks)
def _switch(tp, pp, ep=1):
    from megatron.core import parallel_state as ps

    from aligner.parallel import ParallelConfig, initialize

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(ParallelConfig(tp=tp, pp=pp, ep=ep, seed=1))


def _last_logits(models):
    """Each prompt's last-position logits [n, VOCAB] (right-padded batch, one forward through
    the pipeline schedule) on the last stage, gathered over TP; None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    width = max(map(len, PROMPTS))
    tokens = torch.full((len(PROMPTS), width), PAD)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = torch.tensor(p)
    got = []

    def step(it, m):
        return m(next(it), None, None), lambda y: (got.append(y.detach()) or y.sum() * 0, {})

    for m in models:
        m.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=models,
                                    num_microbatches=1, seq_length=width, micro_batch_size=len(PROMPTS),
                                    forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(got[0])
    return torch.stack([logits[i, len(p) - 1, :VOCAB] for i, p in enumerate(PROMPTS)])


def _generate(models, cfg):
    from aligner.rollout import GenerationConfig, RolloutEngine

    out = {}
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[])
    for impl in ("fused", "megatron"):
        engine = RolloutEngine(models, cfg, decode_impl=impl)
        res = engine.generate(PROMPTS, greedy)
        out[impl] = [res.response_tokens(i) for i in range(len(res))]
    # continuous batching: two slots for the three prompts; the stop token ends the first
    # prompt early, so the third is prefilled into its slot and decodes beside the second
    # at other positions (per-row rope, cache extent and sliding window)
    stop = refill_stop_token(out["fused"])
    engine = RolloutEngine(models, cfg, decode_impl="fused", max_batch=2)
    res = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[stop]))
    out["refill"] = {"stop": stop, "responses": [res.response_tokens(i) for i in range(len(res))],
                     "continuous": engine.continuous}
    return out


def refill_stop_token(greedy):
    """A token of the first prompt's greedy response (from its 5th on) that the second's
    does not contain: the first row ends early while the second runs on."""
    for k in range(4, len(greedy[0])):
        if greedy[0][k] not in greedy[0][:k] and greedy[0][k] not in greedy[1]:
            return greedy[0][k]
    return greedy[0][4]


UNEVEN_TOKENS = 8


def _generate_uneven(models, cfg):
    """Data-parallel ranks generating different work while their experts are split (EP=2):
    rank 0 all :data:`PROMPTS` (:data:`NEW_TOKENS` tokens, two slots: the third prompt
    refills one with the fused decoder, a second batch with megatron-core's), rank 1 the last
    prompt alone (:data:`UNEVEN_TOKENS` tokens), so rank 1 finishes many steps earlier."""
    from aligner.rollout import GenerationConfig, RolloutEngine

    first = torch.distributed.get_rank() == 0
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS if first else UNEVEN_TOKENS, greedy=True, stop_token_ids=[])
    out = {}
    for impl in ("fused", "megatron"):
        engine = RolloutEngine(models, cfg, decode_impl=impl, max_batch=2)
        res = engine.generate(PROMPTS if first else PROMPTS[-1:], greedy)
        out[impl] = [res.response_tokens(i) for i in range(len(res))]
    return out


def _train(path, algorithm, out_dir):
    """Two SGD steps of the SFT or DPO trainer on the family's data; the train metrics."""
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.sft import SFTTrainer

    # megatron-core's MoE layer trains at TP > 1 only with sequence parallelism
    cfg = {"init": {"hf": str(path)}, "parallel": {"tp": 2, "sequence_parallel": path.name in MOE_FAMILIES},
           "data": {"train": str(path / ("sft.jsonl" if algorithm == "sft" else "pairs.jsonl")), "template": "raw",
                    "max_length": 64},
           "optim": {"name": "sgd", "lr": LR[algorithm], "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 0,
                     "schedule": "constant"},
           "trainer": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "out_dir": str(out_dir),
                       "export_hf": False, "progress": False, "tensorboard": False, "resume": False}}
    if algorithm == "dpo":
        cfg["dpo"] = {"beta": BETA, "loss_type": "dpo", "sft_weight": 0.0}  # conf/dpo.yaml adds an SFT term
    (DPOTrainer if algorithm == "dpo" else SFTTrainer)(cfg).fit()
    torch.distributed.barrier()
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def run_world2(root, names):
    """Per family: TP=2 (logits, greedy, both with sequence parallelism too for
    :data:`SP_FAMILIES`; export, SFT and DPO trainers), then PP=2 (logits,
    greedy, import of the TP=2 export and export again); then per MoE family EP=2 (logits,
    greedy, greedy with uneven work per rank, export)."""
    from aligner.models import export_hf, from_pretrained

    root = Path(root)
    out = {name: {} for name in names}
    _switch(2, 1)
    for name in names:
        models, cfg = from_pretrained(root / name)
        out[name]["tp2"] = {"logits": _last_logits(models), **_generate(models, cfg)}
        if name in SP_FAMILIES:
            sp_models, _ = from_pretrained(root / name, sequence_parallel=True)
            out[name]["tp2sp"] = {"logits": _last_logits(sp_models), **_generate(sp_models, cfg)}
        export_hf(models, cfg, root / f"{name}_export", tokenizer_dir=root / name)
        out[name]["sft"] = _train(root / name, "sft", root / f"{name}_sft")
        out[name]["dpo"] = _train(root / name, "dpo", root / f"{name}_dpo")
    _switch(1, 2)
    for name in names:
        models, cfg = from_pretrained(root / name)
        out[name]["pp2"] = {"logits": _last_logits(models), **_generate(models, cfg)}
        models, cfg = from_pretrained(root / f"{name}_export")
        export_hf(models, cfg, root / f"{name}_export_again")
    moe = [name for name in names if name in MOE_FAMILIES]
    if moe:
        _switch(1, 1, ep=2)  # each rank holds half the experts; the two ranks are the DP group
        for name in moe:
            models, cfg = from_pretrained(root / name)
            out[name]["ep2"] = {"logits": _last_logits(models), **_generate(models, cfg),
                                "uneven": _generate_uneven(models, cfg)}
            export_hf(models, cfg, root / f"{name}_export_ep2", tokenizer_dir=root / name)
    return out


def run_world1(root, names):
    """Per family at TP=1: logits and greedy."""
    from aligner.models import from_pretrained

    _switch(1, 1)
    out = {}
    for name in names:
        models, cfg = from_pretrained(Path(root) / name)
        out[name] = {"tp1": {"logits": _last_logits(models), **_generate(models, cfg)}}
    return out
