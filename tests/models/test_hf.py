"""HF checkpoints in and out, against transformers.

- logits parity at TP=1, TP=2, PP=2 and TP=2 x PP=2 (Llama with llama3 RoPE scaling,
  Mistral, Qwen2 with qkv bias and tied embeddings; fp32 on a right-padded batch, to the
  tolerances below);
- HF -> aligner -> HF round trips bit-identical at every layout, loadable by transformers;
- a reward model's exported scores equal aligner's; a reward model saved as a training
  checkpoint at TP=2 and exported by ``aligner export`` at TP=1 is bit-identical;
- log-probs / entropy from vocab-parallel logits equal full-softmax references (padded
  vocabulary included), gradients too;
- clear errors for broken checkpoints.

Three spawns: world 2 (TP=2, then PP=2), world 4 (TP=2 x PP=2), world 1.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

VOCAB = 100  # padded to 128 in aligner: at TP=2 rank 1 holds 28 padding rows
# fp32 tolerances, set from measurement (largest deviation over the 3 families x 4 layouts):
# logits 2.3e-7, reward-head scores 6e-8, log-probs / entropy (vs a float64 softmax of HF's
# logits) 5.5e-7. The bounds leave a few ulps of headroom for other BLAS / thread counts.
LOGITS_ATOL = 1e-6
LOGPROB_ATOL = 2e-6
FAMILIES = ("llama", "mistral", "qwen2")
LAYOUTS = ("tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (3, 12), generator=g)
    lengths = torch.tensor([12, 9, 5])
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0  # right padding with pad id 0
    return tokens, lengths


def _random_logits():
    """Full-vocabulary logits [2, 5, 128] with the padded rows at finfo.min, labels, weights."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 5, 128, generator=g) * 3
    full[..., VOCAB:] = torch.finfo(torch.float32).min
    labels = torch.randint(0, VOCAB, (2, 5), generator=g)
    return full, labels, torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)


def make_checkpoints(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                              MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**common, rope_theta=5000.0, rope_scaling=LLAMA3_ROPE,
                                 tie_word_embeddings=False)).save_pretrained(f"{root}/llama")
    MistralForCausalLM(MistralConfig(**common, sliding_window=64)).save_pretrained(f"{root}/mistral")
    Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).save_pretrained(f"{root}/qwen2")
    LlamaForSequenceClassification(LlamaConfig(**common, num_labels=3)).save_pretrained(f"{root}/rm")
    # a tokenizer inside the llama model folder: export copies it, never the weights
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2").save_pretrained(f"{root}/llama")


def _switch(tp, pp):
    """Re-initialise megatron-core's parallel state at another layout in the same processes."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(ParallelConfig(tp=tp, pp=pp))


def _pipeline_forward(model, tokens):
    """Forward through the stages with megatron-core's own forward-only schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    got = []

    def step(it, m):
        batch = next(it)
        return m(batch, None, None), lambda y: (got.append(y) or y.sum() * 0, {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
                                seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    return got[0] if got else None


def _layout(root, tp, pp, rm_checkpoint=None):
    """Per family: last-stage outputs (LM logits gathered, reward values), log-probs and
    entropy of the LM logits; an HF export of each model."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from aligner.models import export_hf, from_pretrained, save_checkpoint, token_entropy, token_logprobs

    tokens, _ = _batch()
    out = {}
    for name in FAMILIES + ("rm",):
        head = "reward" if name == "rm" else None
        models, cfg = from_pretrained(f"{root}/{name}", head=head)
        tok_dir = f"{root}/llama" if name == "llama" else None
        export_hf(models, cfg, f"{root}/{name}_export_tp{tp}pp{pp}", tokenizer_dir=tok_dir)
        if name == "rm" and rm_checkpoint:
            save_checkpoint(rm_checkpoint, 7, models, extra={"note": "rm"}, model_config=cfg.to_dict())
        y = _pipeline_forward(models[0], tokens)
        if ps.is_pipeline_last_stage():
            y = y.detach()
            if head is None:
                out[f"{name}_logprobs"] = token_logprobs(y, tokens)
                out[f"{name}_entropy"] = token_entropy(y)
                y = gather_from_tensor_model_parallel_region(y)
            out[name] = y
    return out if ps.is_pipeline_last_stage() else None


def _vocab_parallel_grads():
    """token_logprobs / token_entropy and their gradients from this TP rank's logit slice."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from aligner.models import token_entropy, token_logprobs

    full, labels, w_lp, w_ent = _random_logits()
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    per = full.shape[-1] // tp
    local = full[..., rank * per:(rank + 1) * per].clone().requires_grad_()
    lp, ent = token_logprobs(local, labels), token_entropy(local)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    parts = [torch.empty_like(local.grad) for _ in range(tp)]
    dist.all_gather(parts, local.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    return {"logprobs": lp.detach(), "entropy": ent.detach(), "grad": torch.cat(parts, -1)}


def run_world2(root):
    """TP=2 (also: vocab-parallel log-prob gradients, a reward-model training checkpoint), then PP=2."""
    _switch(2, 1)
    tp2 = _layout(root, 2, 1, rm_checkpoint=f"{root}/rm_ckpt")
    tp2["grads"] = _vocab_parallel_grads()
    _switch(1, 2)
    return {"tp2pp1": tp2, "tp1pp2": _layout(root, 1, 2)}


def run_world4(root):
    initialize(ParallelConfig(tp=2, pp=2))
    return _layout(root, 2, 2)


def run_world1(root):
    """TP=1; ``aligner export`` of the TP=2 reward checkpoint; log-probs leave b=1 inputs
    alone; errors of broken checkpoints."""
    from aligner.cli.export import main as export_main
    from aligner.models import CheckpointError, UnsupportedModelError, from_pretrained, token_logprobs

    initialize(ParallelConfig())
    out = _layout(root, 1, 1)
    out["export_rc"] = export_main([f"{root}/rm_ckpt", f"{root}/rm_cli_export"])
    from aligner.models import export_hf

    models, cfg = from_pretrained(f"{root}/llama")
    export_hf(models, cfg, f"{root}/llama_export_small_files", max_shard_bytes=200_000)
    x = torch.randn(1, 6, 128)
    kept = x.clone()
    token_logprobs(x, torch.zeros(1, 6, dtype=torch.long))
    out["b1_input_unchanged"] = torch.equal(x, kept)
    errors = {}
    for case in ("missing_shard", "corrupt", "shape", "missing_tensor", "arch", "pickle_only", "extra_tensor"):
        try:
            from_pretrained(f"{root}/{case}")
        except (CheckpointError, UnsupportedModelError, FileNotFoundError) as exc:
            errors[case] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    return out


def make_broken_checkpoints(root):
    from safetensors.torch import load_file, save_file

    src = Path(root) / "llama"
    tensors = load_file(str(src / "model.safetensors"))
    # a sharded checkpoint whose second shard is missing
    d = Path(root) / "missing_shard"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    wm = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # a truncated file
    d = Path(root) / "corrupt"
    shutil.copytree(src, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    # config does not match the weights
    d = Path(root) / "shape"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    d = Path(root) / "missing_tensor"
    shutil.copytree(src, d)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"},
              str(d / "model.safetensors"))
    d = Path(root) / "arch"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    # a tensor the config has no place for (Llama attention_bias puts a bias on o_proj)
    d = Path(root) / "extra_tensor"
    shutil.copytree(src, d)
    save_file(dict(tensors, **{"model.layers.2.self_attn.o_proj.bias": torch.zeros(64)}), str(d / "model.safetensors"))
    # only a pickle checkpoint: never unpickled (its bytes would fail to unpickle anyway)
    d = Path(root) / "pickle_only"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    make_checkpoints(root)
    make_broken_checkpoints(root)
    w2 = spawn_local(run_world2, 2, root, timeout=400)
    out = {"tp2pp1": w2[0]["tp2pp1"], "tp2pp1_rank1": w2[1]["tp2pp1"], "tp1pp2": w2[1]["tp1pp2"]}
    out["tp2pp2"] = spawn_local(run_world4, 4, root, timeout=400)[2]
    out["tp1pp1"] = spawn_local(run_world1, 1, root, timeout=300)[0]
    return root, out


def _hf(path, seq_cls=False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    tokens, lengths = _batch()
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits, lengths


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(runs, family, layout):
    root, out = runs
    ref, lengths = _hf(f"{root}/{family}")
    ours = out[layout][family]
    assert ours.shape == (3, 12, 128)
    for i, n in enumerate(lengths.tolist()):  # real tokens of the right-padded rows
        torch.testing.assert_close(ours[i, :n, :VOCAB], ref[i, :n], atol=LOGITS_ATOL, rtol=0)
        assert (ours[i, :n, VOCAB:] == torch.finfo(torch.float32).min).all()  # padded vocabulary masked


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_entropy_match_full_softmax(runs, family, layout):
    root, out = runs
    ref, lengths = _hf(f"{root}/{family}")
    tokens, _ = _batch()
    logp = torch.log_softmax(ref.double(), -1)
    ref_lp = logp.gather(-1, tokens[..., None])[..., 0]
    ref_ent = -(logp.exp() * logp).sum(-1)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[layout][f"{family}_logprobs"][i, :n].double(), ref_lp[i, :n],
                                   atol=LOGPROB_ATOL, rtol=0)
        torch.testing.assert_close(out[layout][f"{family}_entropy"][i, :n].double(), ref_ent[i, :n],
                                   atol=LOGPROB_ATOL, rtol=0)


def test_vocab_parallel_logprob_gradients(runs):
    """At TP=2 each rank holds half of a 128-row vocabulary whose last 28 rows are padding."""
    full, labels, w_lp, w_ent = _random_logits()
    x = full[..., :VOCAB].double().requires_grad_()
    logp = torch.log_softmax(x, -1)
    lp = logp.gather(-1, labels[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    _, out = runs
    for rank_out in (out["tp2pp1"]["grads"], out["tp2pp1_rank1"]["grads"]):  # full [b, s] results on every rank
        torch.testing.assert_close(rank_out["logprobs"].double(), lp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(rank_out["entropy"].double(), ent.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(rank_out["grad"][..., :VOCAB].double(), x.grad, atol=1e-5, rtol=0)
        assert (rank_out["grad"][..., VOCAB:] == 0).all()


def test_logprobs_do_not_modify_their_input(runs):
    assert runs[1]["tp1pp1"]["b1_input_unchanged"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES + ("rm",))
def test_export_round_trip_is_bit_identical(runs, name, layout):
    from safetensors.torch import load_file

    root, _ = runs
    src = load_file(f"{root}/{name}/model.safetensors")
    dst_dir = Path(f"{root}/{name}_export_{layout}")
    dst = {}
    for f in dst_dir.glob("*.safetensors"):
        dst.update(load_file(str(f)))
    if name == "qwen2":  # tied: HF writes no lm_head
        src.pop("lm_head.weight", None)
    assert sorted(src) == sorted(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    if layout.endswith("pp2"):
        index = json.loads((dst_dir / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(index) == sorted(src) and len(set(index.values())) == 2
    # transformers loads it and computes exactly what the source checkpoint computes
    # (config.json included: RoPE scaling, tied embeddings, qkv bias, num_labels)
    ref, _ = _hf(f"{root}/{name}", seq_cls=name == "rm")
    got, _ = _hf(str(dst_dir), seq_cls=name == "rm")
    assert torch.equal(ref, got)


def test_export_splits_files_by_size(runs):
    from safetensors.torch import load_file

    root, _ = runs
    dst = Path(f"{root}/llama_export_small_files")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((dst / f).stat().st_size < 200_000 + 10_000 for f in files)
    src = load_file(f"{root}/llama/model.safetensors")
    got = {}
    for f in files:
        part = load_file(str(dst / f))
        assert all(index["weight_map"][k] == f for k in part)
        got.update(part)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in src.values())
    assert sorted(got) == sorted(src) and all(torch.equal(src[k], got[k]) for k in src)
    ref, _ = _hf(f"{root}/llama")
    assert torch.equal(ref, _hf(str(dst))[0])


def test_export_copies_tokenizer_files_only(runs):
    from transformers import AutoTokenizer

    root, _ = runs
    src = Path(root) / "llama"
    for layout in LAYOUTS:
        dst = Path(f"{root}/llama_export_{layout}")
        weights = {p.name for p in dst.glob("*.safetensors")} | {p.name for p in dst.glob("*.index.json")}
        copied = {p.name for p in dst.iterdir()} - weights - {"config.json"}
        expected = {p.name for p in src.iterdir()} - {"model.safetensors", "config.json"}
        assert copied == expected and "tokenizer.json" in copied, (layout, copied)
        assert weights == ({"model.safetensors"} if layout.endswith("pp1") else
                           {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json"})
    tok = AutoTokenizer.from_pretrained(f"{root}/llama_export_tp2pp2")
    assert tok("w5 w7")["input_ids"] == [5, 7]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reward_model_scores_match_exported_hf(runs, layout):
    from aligner.models import reward_at_last_token

    root, out = runs
    cfg = json.loads(Path(f"{root}/rm_export_{layout}/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] == 0
    ref, lengths = _hf(f"{root}/rm_export_{layout}", seq_cls=True)  # HF reads the last non-pad token
    ours = reward_at_last_token(out[layout]["rm"], lengths)
    assert ours.shape == ref.shape == (3, 3)
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=0)


def test_tp_ranks_agree(runs):
    _, out = runs
    for key in ("rm", "llama", "llama_logprobs", "llama_entropy"):
        assert torch.equal(out["tp2pp1"][key], out["tp2pp1_rank1"][key]), key


def test_reward_checkpoint_saved_at_tp2_exports_at_tp1(runs):
    """save_checkpoint at TP=2 with model_config, then ``aligner export`` (world 1, no flags):
    the HF folder holds the source reward model's tensors exactly."""
    from safetensors.torch import load_file

    root, out = runs
    assert out["tp1pp1"]["export_rc"] == 0
    dst_dir = Path(root) / "rm_cli_export"
    assert json.loads((dst_dir / "config.json").read_text())["num_labels"] == 3
    src, dst = load_file(f"{root}/rm/model.safetensors"), load_file(str(dst_dir / "model.safetensors"))
    assert sorted(src) == sorted(dst) and all(torch.equal(src[k], dst[k]) for k in src)


def test_bad_checkpoints_give_clear_errors(runs):
    root, out = runs
    msgs = out["tp1pp1"]["errors"]
    assert "model-00002-of-00002.safetensors" in msgs["missing_shard"] and "missing" in msgs["missing_shard"]
    assert "corrupt/model.safetensors" in msgs["corrupt"] and "cannot read" in msgs["corrupt"]
    assert "model.layers.0.mlp.gate_proj.weight" in msgs["shape"] and "[96, 64]" in msgs["shape"]
    assert "[128, 64]" in msgs["shape"] and "shape/model.safetensors" in msgs["shape"]
    assert "model.layers.1.mlp.down_proj.weight" in msgs["missing_tensor"] and "not found" in msgs["missing_tensor"]
    assert "gpt2" in msgs["arch"] and "arch/config.json" in msgs["arch"]
    assert "pytorch_model.bin" in msgs["pickle_only"] and "not read" in msgs["pickle_only"]
    assert "'model.layers.2.self_attn.o_proj.bias'" in msgs["extra_tensor"]
    assert "extra_tensor/model.safetensors" in msgs["extra_tensor"]
