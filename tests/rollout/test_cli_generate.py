"""``aligner generate`` end to end on a tiny HF Llama with a word-level tokenizer.

References from transformers in this process: greedy ``generate`` per prompt and the
sequence-classification scores of prompt + response from a tiny HF reward model.
"""
import json

import pytest
import torch

from aligner.cli.generate import main
from aligner.parallel.spawn import spawn_local

VOCAB = 250
TEXT_PROMPTS = ["w10 w20 w30", "w7", "w100 w101 w102 w103 w104 w105"]
TOKEN_PROMPT = [1, 40, 41, 42]
NEW = 8


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("cli_generate")
    tok = _tokenizer()
    torch.manual_seed(1)
    policy = LlamaForCausalLM(_config()).eval()
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(2)
    rm = LlamaForSequenceClassification(_config(num_labels=2)).eval()
    rm.save_pretrained(root / "rm")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": p, "id": f"p{i}"} for i, p in enumerate(TEXT_PROMPTS)]
    rows.append({"prompt_tokens": TOKEN_PROMPT, "id": "tokens"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    token_prompts = [tok.encode(p) for p in TEXT_PROMPTS] + [TOKEN_PROMPT]
    greedy = []
    with torch.no_grad():
        for ids in token_prompts:
            x = torch.tensor([ids])
            out = policy.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            greedy.append(out[0, len(ids):].tolist())
        scores = [rm(torch.tensor([ids + resp])).logits[0].tolist() for ids, resp in zip(token_prompts, greedy)]
    return dict(root=root, prompts=prompts, token_prompts=token_prompts, greedy=greedy, scores=scores, tok=tok)


def run_cli(policy_dir, checkpoint_root, *argvs):
    """Save the HF policy as a training checkpoint, then several CLI runs in one process
    (the parallel state is set up once)."""
    from aligner.models import from_pretrained, save_checkpoint
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())
    models, cfg = from_pretrained(policy_dir)
    save_checkpoint(checkpoint_root, 3, models, model_config=cfg.to_dict())
    del models
    return [main(argv) for argv in argvs]


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def outputs(setup):
    root = setup["root"]
    base = ["--model", str(root / "policy"), "--prompts", str(setup["prompts"])]
    greedy = base + ["--output", str(root / "greedy.jsonl"), "--greedy", "--max-new-tokens", str(NEW),
                     "--stop-token-ids", "none", "--num-samples", "2", "--reward-model", str(root / "rm")]
    sampled = base + ["--max-new-tokens", str(NEW), "--temperature", "0.8", "--top-p", "0.9", "--seed", "4",
                      "--num-samples", "3", "--batch-size", "5"]
    from_checkpoint = ["--model", str(root / "ckpt"), "--tokenizer", str(root / "policy"),
                       "--prompts", str(setup["prompts"]), "--output", str(root / "checkpoint.jsonl"),
                       "--greedy", "--max-new-tokens", str(NEW), "--stop-token-ids", "none"]
    codes = spawn_local(run_cli, 1, str(root / "policy"), str(root / "ckpt"), greedy,
                        sampled + ["--output", str(root / "sampled_a.jsonl")],
                        sampled + ["--output", str(root / "sampled_b.jsonl")], from_checkpoint, timeout=300)[0]
    names = ("greedy", "sampled_a", "sampled_b", "checkpoint")
    return codes, {name: _read(root / f"{name}.jsonl") for name in names}


def test_greedy_rows_match_transformers_and_reward_model(setup, outputs):
    codes, files = outputs
    assert codes == [0, 0, 0, 0]
    rows = files["greedy"]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in range(2)]
    for r in rows:
        i = r["index"]
        assert r["prompt_tokens"] == setup["token_prompts"][i]
        assert r["response_tokens"] == setup["greedy"][i]
        assert r["response"] == setup["tok"].decode(setup["greedy"][i], skip_special_tokens=True)
        assert r["stop_reason"] == "max_new_tokens"
        assert len(r["logprobs"]) == NEW and all(lp <= 0 for lp in r["logprobs"])
        assert r["scores"] == pytest.approx(setup["scores"][i], abs=1e-4)
        assert r["reward"] == r["scores"][0]
        assert r["meta"]["id"] == (f"p{i}" if i < 3 else "tokens")
    assert rows[0]["prompt"] == TEXT_PROMPTS[0] and rows[-1]["prompt"] is None


def test_sampled_file_is_reproducible(outputs):
    _, files = outputs
    a, b = files["sampled_a"], files["sampled_b"]
    assert len(a) == 12 and a == b
    # different samples of a prompt draw from different seeds
    assert len({r["seed"] for r in a}) == 12
    assert any(a[3 * i]["response_tokens"] != a[3 * i + 1]["response_tokens"] for i in range(4))
    for r in a:  # the tokenizer's EOS is the default stop token
        assert (r["stop_reason"] == "stop_token") == (r["response_tokens"][-1] == 2)


def test_bad_prompt_file_names_file_and_line(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5"}\n{"text": "w6"}\n')
    out = tmp_path / "out.jsonl"
    code = main(["--model", str(setup["root"] / "policy"), "--prompts", str(bad), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "'prompt'" in err and "['text']" in err
    bad.write_text('{"prompt": "w5"}\nnot json\n')
    assert main(["--model", str(setup["root"] / "policy"), "--prompts", str(bad), "--output", str(out)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    code = main(["--model", str(setup["root"] / "policy"), "--prompts", str(bad), "--output", str(out),
                 "--top-p", "0"])
    assert code == 2 and "GenerationConfig.top_p" in capsys.readouterr().err
    assert not out.exists()


def test_training_checkpoint_generates_like_the_hf_folder(setup, outputs):
    _, files = outputs
    rows = files["checkpoint"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["response_tokens"] == setup["greedy"][r["index"]]
