"""HF checkpoints in and out: logits parity with transformers at TP=1, TP=2, PP=2 and
TP=2 x PP=2 (Llama, Mistral, Qwen2 with qkv bias; fp32, 1e-4 on a right-padded batch),
bit-identical round trips, reward-model export parity, and clear errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

VOCAB = 100
FAMILIES = ("llama", "mistral", "qwen2")


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (3, 12), generator=g)
    lengths = torch.tensor([12, 9, 5])
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0  # right padding with pad id 0
    return tokens, lengths


def make_checkpoints(root):
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**common, rope_theta=5000.0, tie_word_embeddings=False)).save_pretrained(f"{root}/llama")
    MistralForCausalLM(MistralConfig(**common, sliding_window=64)).save_pretrained(f"{root}/mistral")
    Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).save_pretrained(f"{root}/qwen2")
    LlamaForSequenceClassification(LlamaConfig(**common, num_labels=3)).save_pretrained(f"{root}/rm")


def run_layout(root, tp, pp):
    """Logits (last stage, gathered) for every family, and an HF export of each."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from aligner.models import export_hf, from_pretrained

    initialize(ParallelConfig(tp=tp, pp=pp))
    tokens, _ = _batch()
    out = {}
    for name in FAMILIES + ("rm",):
        head = "reward" if name == "rm" else None
        models, cfg = from_pretrained(f"{root}/{name}", head=head)
        export_hf(models, cfg, f"{root}/{name}_export_tp{tp}pp{pp}", head=head)
        y = _pipeline_forward(models[0], tokens)
        if ps.is_pipeline_last_stage():
            if head is None:
                y = gather_from_tensor_model_parallel_region(y)[..., :VOCAB]
            out[name] = y.detach()
    return out if ps.is_pipeline_last_stage() else None


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    spawn_local(make_checkpoints, 1, root, timeout=200)
    out = {"tp1pp1": spawn_local(run_layout, 1, root, 1, 1, timeout=300)[0]}
    out["tp2pp1"] = spawn_local(run_layout, 2, root, 2, 1, timeout=300)[0]
    out["tp1pp2"] = spawn_local(run_layout, 2, root, 1, 2, timeout=300)[1]
    out["tp2pp2"] = spawn_local(run_layout, 4, root, 2, 2, timeout=400)[2]
    return root, out


def _hf_logits(path, seq_cls=False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    tokens, lengths = _batch()
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits, lengths


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(runs, family, layout):
    root, out = runs
    ref, lengths = _hf_logits(f"{root}/{family}")
    ours = out[layout][family]
    for i, n in enumerate(lengths.tolist()):  # real tokens of the right-padded rows
        torch.testing.assert_close(ours[i, :n], ref[i, :n], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"])
@pytest.mark.parametrize("name", FAMILIES + ("rm",))
def test_export_round_trip_is_bit_identical(runs, name, layout):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root, _ = runs
    src = load_file(f"{root}/{name}/model.safetensors")
    dst_dir = Path(f"{root}/{name}_export_{layout.replace('tp', 'tp').replace('pp', 'pp')}")
    dst = {}
    for f in dst_dir.glob("*.safetensors"):
        dst.update(load_file(str(f)))
    if name == "qwen2":  # tied: HF writes no lm_head
        src.pop("lm_head.weight", None)
    assert sorted(src) == sorted(dst)
    for k in src:
        assert torch.equal(src[k], dst[k]), k
    cls = AutoModelForSequenceClassification if name == "rm" else AutoModelForCausalLM
    assert cls.from_pretrained(str(dst_dir)) is not None


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"])
def test_reward_model_scores_match_exported_hf(runs, layout):
    root, out = runs
    ref, lengths = _hf_logits(f"{root}/rm_export_{layout}", seq_cls=True)  # HF reads the last non-pad token
    values = out[layout]["rm"]
    ours = values[torch.arange(len(lengths)), lengths - 1]
    assert ours.shape == ref.shape == (3, 3)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def run_errors(root):
    from aligner.models import CheckpointError, UnsupportedModelError, from_pretrained

    initialize(ParallelConfig())
    msgs = {}
    for case in ("missing_shard", "corrupt", "shape", "missing_tensor", "arch"):
        try:
            from_pretrained(f"{root}/{case}")
        except (CheckpointError, UnsupportedModelError, FileNotFoundError) as exc:
            msgs[case] = f"{type(exc).__name__}: {exc}"
    return msgs


def test_bad_checkpoints_give_clear_errors(runs):
    from safetensors.torch import load_file, save_file

    root, _ = runs
    src = Path(root) / "llama"
    tensors = load_file(str(src / "model.safetensors"))
    # a sharded checkpoint whose second shard is missing
    d = Path(root) / "missing_shard"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors" for i, k in enumerate(names)}
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
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}, str(d / "model.safetensors"))
    d = Path(root) / "arch"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))

    msgs = spawn_local(run_errors, 1, root, timeout=200)[0]
    assert "model-00002-of-00002.safetensors" in msgs["missing_shard"] and "missing" in msgs["missing_shard"]
    assert "corrupt/model.safetensors" in msgs["corrupt"]
    assert "model.layers.0.mlp.gate_proj.weight" in msgs["shape"] and "[96, 64]" in msgs["shape"]
    assert "model.layers.1.mlp.down_proj.weight" in msgs["missing_tensor"] and "not found" in msgs["missing_tensor"]
    assert "gpt2" in msgs["arch"] and "config.json" in msgs["arch"]
