"""``aligner generate`` end to end on a tiny HF Llama with a word-level tokenizer.

References from transformers in this process: greedy ``generate`` per prompt and the
sequence-classification scores of prompt + response from a tiny HF reward model; for
templated prompt files the prompts written out by hand (extra_id) or by transformers'
``apply_chat_template`` (chat), for every prompt-bearing format of the data layer.
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


# A chat template for the word-level vocabulary: role words, then the content.
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'w240 ' if m['role'] == 'system' else ('w241 ' if m['role'] == 'user'"
                 " else 'w242 ') }}{{ m['content'] }} w243 {% endfor %}{% if add_generation_prompt %}w242 {% endif %}")
MARKERS = ("<extra_id_0>System", "<extra_id_1>User", "<extra_id_1>Assistant", "<extra_id_2>")


def _tokenizer(chat=False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB - len(MARKERS))})
    # the extra_id markers (each with the word glued to it) are words of their own
    vocab.update({m: VOCAB - len(MARKERS) + i for i, m in enumerate(MARKERS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


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
    _tokenizer(chat=True).save_pretrained(root / "policy")  # its chat template: for --template chat / auto
    tok.save_pretrained(root / "plain_tokenizer")  # no chat template: auto means extra_id
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


def run_cli_capturing(policy_dir, checkpoint_root, *argvs):
    """run_cli, returning each run's (exit code, stderr)."""
    import contextlib
    import io

    results = []
    for code_and_argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run_cli(policy_dir, checkpoint_root, code_and_argv)[0] if not results else main(code_and_argv)
        results.append((code, err.getvalue()))
    return results


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def outputs(setup):
    root = setup["root"]
    base = ["--model", str(root / "policy"), "--prompts", str(setup["prompts"])]
    greedy = base + ["--output", str(root / "greedy.jsonl"), "--greedy", "--max-new-tokens", str(NEW),
                     "--stop-token-ids", "none", "--num-samples", "2", "--reward-model", str(root / "rm"),
              "--reward-attribute", "LABEL_0"]
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
        assert list(r["scores"].values()) == pytest.approx(setup["scores"][i], abs=1e-4)
        assert list(r["scores"]) == ["LABEL_0", "LABEL_1"] and r["reward"] == r["scores"]["LABEL_0"]
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


# ------------------------------------------------------------------ templated prompt files
SYSTEM_DEFAULT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
HS2 = dict(helpfulness=3, correctness=2, coherence=4, complexity=1, verbosity=2)
# per format: rows, and each row's prompt as (system or None, [(role, content), ...])
FORMAT_ROWS = {
    "prompt": ([{"prompt": "w10 w11", "id": "a"}, {"prompt": "w12", "system": "w50 w51"}],
               [(None, [("user", "w10 w11")]), ("w50 w51", [("user", "w12")])]),
    "sft": ([{"system": "w60", "conversations": [{"from": "User", "value": "w13 w14"}, {"from": "Assistant", "value": "w15"},
                                                 {"from": "User", "value": "w16"}, {"from": "Assistant", "value": "w17"}]}],
            [("w60", [("user", "w13 w14"), ("assistant", "w15"), ("user", "w16")])]),
    "openai": ([{"messages": [{"role": "system", "content": "w61"}, {"role": "user", "content": "w18"},
                              {"role": "assistant", "content": "w19"}]},
                {"messages": [{"role": "user", "content": "w62 w63"}, {"role": "assistant", "content": "w64"}]}],
               [("w61", [("user", "w18")]), (None, [("user", "w62 w63")])]),
    "helpsteer2": ([dict(prompt="w20 w21", response="w22", **HS2), dict(prompt="w20 w21", response="w23", **HS2)],
                   [(None, [("user", "w20 w21")])] * 2),
    "helpsteer2_preference": ([{"split": "train", "prompt": "w23", "response_1": "w24", "response_2": "w25",
                                "preference_strength": 2}], [(None, [("user", "w23")])]),
    "pairwise": ([{"prompt": "w26 w27", "chosen": "w28", "rejected": "w29", "margin": 1.5}],
                 [(None, [("user", "w26 w27")])]),
    "rewardbench": ([{"prompt": "w30", "chosen": "w31", "rejected": "w32", "subset": "s1", "id": 7}],
                    [(None, [("user", "w30")])]),
}


def extra_id_text(system, turns, response=None):
    """The extra_id template written out (generation prompt, or a reward row with ``response``)."""
    text = f"<extra_id_0>System\n{SYSTEM_DEFAULT if system is None else system}\n"
    for role, content in turns:
        text += f"<extra_id_1>{'User' if role == 'user' else 'Assistant'}\n{content}\n"
    text += "<extra_id_1>Assistant\n"
    return text if response is None else text + f"{response}\n<extra_id_2>"


def chat_tokens(hf_tok, system, turns, response=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for r, c in turns]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=response is None)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def expected_prompt(hf_tok, template, system, turns):
    if template == "chat" or (template == "auto" and hf_tok.chat_template):
        return chat_tokens(hf_tok, system, turns)
    return hf_tok.encode(extra_id_text(system, turns), add_special_tokens=False)


@pytest.fixture(scope="module")
def prompt_files(setup):
    files = {}
    for fmt, (rows, _) in FORMAT_ROWS.items():
        files[fmt] = setup["root"] / f"prompts_{fmt}.jsonl"
        files[fmt].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@pytest.mark.parametrize("tokenizer", ["policy", "plain_tokenizer"])
@pytest.mark.parametrize("template", ["extra_id", "chat", "auto"])
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_every_prompt_format_and_template_renders_as_written_out(setup, prompt_files, fmt, template, tokenizer):
    from transformers import AutoTokenizer

    from aligner.cli.generate import read_prompts
    from aligner.data import DataFormatError, load_tokenizer

    folder = setup["root"] / tokenizer
    hf_tok = AutoTokenizer.from_pretrained(folder)
    if template == "chat" and not hf_tok.chat_template:
        with pytest.raises(DataFormatError, match="no chat_template"):
            read_prompts(str(prompt_files[fmt]), load_tokenizer(str(folder)), template)
        return
    prompts = read_prompts(str(prompt_files[fmt]), load_tokenizer(str(folder)), template)
    rows, convs = FORMAT_ROWS[fmt]
    assert len(prompts) == len(rows)
    for p, row, (system, turns) in zip(prompts, rows, convs):
        assert p["prompt_tokens"] == expected_prompt(hf_tok, template, system, turns)
        assert all(type(t) is int for t in p["prompt_tokens"])
        assert p["meta"] == {k: v for k, v in row.items() if k != "prompt"}
        json.dumps({k: v for k, v in p.items() if k != "conversation"})  # plain JSON


def _greedy_reference(root, prompt_tokens):
    from transformers import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(root / "policy").eval()
    with torch.no_grad():
        x = torch.tensor([prompt_tokens])
        out = policy.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_tokens):].tolist()


def _rm_reference(root, tokens):
    from transformers import LlamaForSequenceClassification

    rm = LlamaForSequenceClassification.from_pretrained(root / "rm").eval()
    with torch.no_grad():
        return rm(torch.tensor([tokens])).logits[0].tolist()


# (name, format, options): every format once, every template, with and without a reward model
TEMPLATED_RUNS = [
    ("prompt_extra_id", "prompt", ["--template", "extra_id", "--num-samples", "2", "--reward-model", "RM",
                                   "--reward-attribute", "LABEL_1"]),
    ("sft_chat", "sft", ["--template", "chat", "--reward-model", "RM", "--attribute-weights", "0.5", "-1.0",
                         "--reward-template", "chat"]),
    ("openai_auto", "openai", ["--template", "auto"]),
    ("helpsteer2_auto_plain", "helpsteer2", ["--template", "auto", "--tokenizer", "PLAIN", "--num-samples", "2"]),
    ("preference_extra_id", "helpsteer2_preference", ["--template", "extra_id", "--reward-model", "RM",
                                                      "--attribute-weights", "1", "2"]),
    ("pairwise_chat", "pairwise", ["--template", "chat", "--num-samples", "3"]),
    ("rewardbench_auto", "rewardbench", ["--template", "auto", "--reward-model", "RM", "--reward-attribute",
                                         "LABEL_0", "--num-samples", "2"]),
]


@pytest.fixture(scope="module")
def templated_outputs(setup, prompt_files):
    root = setup["root"]
    argvs = []
    for name, fmt, options in TEMPLATED_RUNS:
        options = [{"RM": str(root / "rm"), "PLAIN": str(root / "plain_tokenizer")}.get(o, o) for o in options]
        argvs.append(["--model", str(root / "policy"), "--prompts", str(prompt_files[fmt]),
                      "--output", str(root / f"{name}.jsonl"), "--greedy", "--max-new-tokens", str(NEW),
                      "--stop-token-ids", "none"] + options)
    # refused before generating: a two-output head with no weights recorded, a name it lacks
    refused = ["--model", str(root / "policy"), "--prompts", str(prompt_files["prompt"]), "--template", "auto",
               "--reward-model", str(root / "rm")]
    argvs.append(refused + ["--output", str(root / "refused_a.jsonl")])
    argvs.append(refused + ["--output", str(root / "refused_b.jsonl"), "--reward-attribute", "helpfulness"])
    results = spawn_local(run_cli_capturing, 1, str(root / "policy"), str(root / "ckpt_templated"), *argvs,
                          timeout=400)[0]
    codes = [code for code, _ in results]
    texts = {name: (root / f"{name}.jsonl").read_text() for (name, _, _), code in zip(TEMPLATED_RUNS, codes) if code == 0}
    return codes, texts, [err for _, err in results[-2:]]


def test_templated_prompt_files_generate_plain_json_rows(setup, templated_outputs):
    from transformers import AutoTokenizer

    root = setup["root"]
    codes, texts, refusals = templated_outputs
    assert codes == [0] * len(TEMPLATED_RUNS) + [2, 2]
    assert not (root / "refused_a.jsonl").exists() and not (root / "refused_b.jsonl").exists()
    chat_tok = AutoTokenizer.from_pretrained(root / "policy")
    plain_tok = AutoTokenizer.from_pretrained(root / "plain_tokenizer")
    for name, fmt, options in TEMPLATED_RUNS:
        rows = [json.loads(line) for line in texts[name].splitlines()]  # plain JSON, nothing else
        template = options[options.index("--template") + 1]
        hf_tok = plain_tok if "PLAIN" in options else chat_tok
        samples = int(options[options.index("--num-samples") + 1]) if "--num-samples" in options else 1
        inputs, convs = FORMAT_ROWS[fmt]
        assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(len(inputs)) for k in range(samples)]
        for r in rows:
            system, turns = convs[r["index"]]
            prompt = expected_prompt(hf_tok, template, system, turns)
            assert r["prompt_tokens"] == prompt, name
            assert r["response_tokens"] == _greedy_reference(root, prompt), name
            assert r["response"] == hf_tok.decode(r["response_tokens"], skip_special_tokens=True)
            assert r["meta"] == {k: v for k, v in inputs[r["index"]].items() if k != "prompt"}
            if "--reward-model" not in options:
                assert "reward" not in r and "scores" not in r
                continue
            # the reward model reads the conversation and the response text in its own template
            if "--reward-template" in options:
                rm_tokens = chat_tokens(chat_tok, system, turns, r["response"])
            else:  # nothing recorded by this transformers-made RM: auto, i.e. extra_id for reward rows
                rm_tokens = chat_tok.encode(extra_id_text(system, turns, r["response"]), add_special_tokens=False)
            ref = _rm_reference(root, rm_tokens)
            assert list(r["scores"]) == ["LABEL_0", "LABEL_1"]
            assert list(r["scores"].values()) == pytest.approx(ref, abs=1e-5), name
            if "--reward-attribute" in options:
                assert r["reward"] == r["scores"][options[options.index("--reward-attribute") + 1]]
            else:
                w = [float(x) for x in options[options.index("--attribute-weights") + 1:][:2]]
                assert r["reward"] == pytest.approx(w[0] * ref[0] + w[1] * ref[1], abs=1e-5)
    assert "has 2 outputs ['LABEL_0', 'LABEL_1'] and records no reward weights" in refusals[0]
    assert "--reward-attribute 'helpfulness' is not an output of the head" in refusals[1]
    assert all(err.count("aligner generate: error:") == 1 for err in refusals)


# ------------------------------------------------------------------ over-long prompts
# the extra_id markers' ids in the word-level vocabulary (MARKERS, last in the vocabulary)
SYSTEM_ID, USER_ID, ASSISTANT_ID = VOCAB - 4, VOCAB - 3, VOCAB - 2
UNK = 3


@pytest.fixture
def long_raw_prompts(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "w10 w11 w12 w13", "id": "a"}, {"prompt_tokens": [1, 40, 41]}, {"prompt": "w7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_raw_prompts_follow_overlong(setup, long_raw_prompts, capsys):
    """--max-prompt-length 2 over raw prompts of 4, 3 and 1 tokens."""
    from aligner.cli.generate import read_prompts
    from aligner.data import DataFormatError, load_tokenizer

    tok = load_tokenizer(str(setup["root"] / "policy"))
    path = long_raw_prompts
    kept = read_prompts(str(path), tok, "raw", max_length=2, overlong="truncate_left")
    assert [p["prompt_tokens"] for p in kept] == [[12, 13], [40, 41], [7]]  # each prompt's end
    assert [p["prompt"] for p in kept] == ["w10 w11 w12 w13", None, "w7"] and kept[0]["meta"] == {"id": "a"}
    assert capsys.readouterr().err == f"aligner data: {path}: 3 prompts; truncated_left: 2\n"
    kept = read_prompts(str(path), tok, "raw", max_length=2, overlong="drop")
    assert [p["prompt_tokens"] for p in kept] == [[7]]
    assert capsys.readouterr().err == f"aligner data: {path}: 1 prompts; dropped_overlong: 2\n"
    with pytest.raises(DataFormatError) as err:
        read_prompts(str(path), tok, "raw", max_length=2, overlong="error")
    assert str(err.value) == (f"{path}:1: the prompt has 4 tokens, more than --max-prompt-length = 2 (--overlong ="
                              " error; truncate_left or drop would fit the row)")
    with pytest.raises(ValueError, match=rf"^{path}: no prompts \({{'dropped_overlong': 3}}\)$"):
        read_prompts(str(path), tok, "raw", max_length=0, overlong="drop")
    # no bound: the prompts as they are
    assert [p["prompt_tokens"] for p in read_prompts(str(path), tok, "raw")] == [[10, 11, 12, 13], [1, 40, 41], [7]]


def test_a_prompt_is_fitted_with_its_attribute_turn(setup, tmp_path, capsys):
    """extra_id with --attributes: <extra_id_0>System w50 <extra_id_1>User w10 w11
    <extra_id_1>Assistant <extra_id_2>helpfulness:... (one unknown word): 7 tokens; the
    last 4 are kept, the attribute turn among them."""
    from aligner.cli.generate import read_prompts
    from aligner.data import DataFormatError, load_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w10 w11", "system": "w50"}) + "\n")
    tok = load_tokenizer(str(setup["root"] / "plain_tokenizer"))
    whole = [SYSTEM_ID, 50, USER_ID, 10, 11, ASSISTANT_ID, UNK]
    assert read_prompts(str(path), tok, "extra_id", attributes="helpfulness=4", max_length=7,
                        overlong="error")[0]["prompt_tokens"] == whole
    assert not [line for line in capsys.readouterr().err.splitlines()  # nothing cut, nothing reported
                if not line.startswith("aligner data: preparing")]
    cut = read_prompts(str(path), tok, "extra_id", attributes="helpfulness=4", max_length=4, overlong="truncate_left")
    assert cut[0]["prompt_tokens"] == whole[-4:] and cut[0]["label"].startswith("helpfulness:4,")
    assert capsys.readouterr().err.splitlines()[-1] == f"aligner data: {path}: 1 prompts; truncated_left: 1"
    # without the attribute turn the prompt (6 tokens) fits 6; with it, it does not
    assert len(read_prompts(str(path), tok, "extra_id", max_length=6, overlong="error")[0]["prompt_tokens"]) == 6
    with pytest.raises(DataFormatError, match=rf"^{path}:1: the prompt has 7 tokens, more than --max-prompt-length = 6"):
        read_prompts(str(path), tok, "extra_id", attributes="helpfulness=4", max_length=6, overlong="error")


def test_a_prompt_the_context_cannot_hold_is_refused_by_default(setup, tmp_path, capsys):
    """The default bound is the context (64 tokens) less one: a 64-token prompt is refused
    before any model is loaded, naming the file, the line and the lengths."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w5"}) + "\n" + json.dumps({"prompt_tokens": [5] * 64}) + "\n")
    out = tmp_path / "out.jsonl"
    base = ["--model", str(setup["root"] / "policy"), "--prompts", str(path), "--output", str(out)]
    assert main(base) == 2
    assert capsys.readouterr().err == (f"aligner generate: error: {path}:2: the prompt has 64 tokens, more than"
                                       " --max-prompt-length = 63 (--overlong = error; truncate_left or drop would"
                                       " fit the row)\n")
    assert main(base + ["--max-prompt-length", "64"]) == 2
    assert capsys.readouterr().err == ("aligner generate: error: --max-prompt-length 64: expected at most 63 (the"
                                       " context, 64 tokens, less one for the response)\n")
    assert main(base + ["--max-seq-len", "32", "--max-prompt-length", "40"]) == 2
    assert "--max-prompt-length 40: expected at most 31 (the context, 32 tokens," in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ continuous batching, end to end
def run_cli_counting(*argvs):
    """CLI runs in one process, each engine the CLI makes recorded: (exit code, forwards,
    continuous) per run. The engine is the real one (a subclass that keeps its instances)."""
    import aligner.rollout
    from aligner.parallel import ParallelConfig, initialize

    engines = []

    class Recorded(aligner.rollout.RolloutEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    aligner.rollout.RolloutEngine = Recorded
    initialize(ParallelConfig())
    out = []
    for argv in argvs:
        code = main(argv)
        out.append((code, engines[-1].forwards, engines[-1].continuous))
    return out


@pytest.fixture(scope="module")
def counted_runs(setup):
    root = setup["root"]
    stop = setup["greedy"][0][2]  # prompt 0's third token: its rows end early, others may not
    base = ["--model", str(root / "policy"), "--prompts", str(setup["prompts"]), "--greedy",
            "--max-new-tokens", str(NEW), "--stop-token-ids", str(stop), "--num-samples", "2", "--batch-size", "3"]
    argvs = [base + ["--output", str(root / "refills_on.jsonl")],
             base + ["--output", str(root / "refills_off.jsonl"), "--no-continuous-batching"],
             ["--model", str(root / "policy"), "--prompts", str(setup["prompts"]), "--greedy", "--max-new-tokens",
              str(NEW), "--stop-token-ids", "none", "--max-prompt-length", "2", "--overlong", "truncate_left",
              "--output", str(root / "truncated.jsonl")]]
    runs = spawn_local(run_cli_counting, 1, *argvs, timeout=300)[0]
    return runs, {name: _read(root / f"{name}.jsonl") for name in ("refills_on", "refills_off", "truncated")}


def test_continuous_batching_option_reaches_the_engine_with_the_same_outputs(setup, counted_runs):
    """8 rows (4 prompts x 2 greedy samples) through 3 slots, rows ending on a stop token at
    different steps: the same file both ways; the forwards those of refills and of batches
    (counted by hand from the rows' lengths, tests/rollout/forward_counts.py)."""
    from tests.rollout.forward_counts import batch_forwards, refill_forwards

    runs, files = counted_runs
    (code_on, forwards_on, continuous_on), (code_off, forwards_off, continuous_off) = runs[:2]
    assert (code_on, code_off) == (0, 0) and continuous_on and not continuous_off
    on, off = files["refills_on"], files["refills_off"]
    assert [{k: v for k, v in r.items() if k != "logprobs"} for r in on] == \
        [{k: v for k, v in r.items() if k != "logprobs"} for r in off]
    # a row's logits do not depend on its neighbours, to float rounding: a prompt prefilled
    # with its batch or with a newcomers' group (other padded widths, other BLAS blocking)
    # differs by a few fp32 ulps (about 5e-7 at a log-prob of -4)
    for a, b in zip(on, off):
        assert a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-6, abs=1e-6)
    plen = [len(r["prompt_tokens"]) for r in on]
    rlen = [len(r["response_tokens"]) for r in on]
    assert len(set(rlen)) >= 2  # rows end at different steps
    assert forwards_off == batch_forwards(plen, rlen, 3)
    assert forwards_on == refill_forwards(plen, rlen, 3)
    # The two counts need not differ: prompts of 1, 3, 4 and 6 tokens (two rows each), the
    # 3-token rows stopping after 3 tokens, the others running to 8. Batches (every prompt
    # prefilled whole: max response length forwards each) take 8 + 8 + 8 = 24; refills take
    # the first batch's prefill, two newcomers' prefills (at the decisions 3 and 8 when an
    # unstaged row takes a slot) and decode steps up to the last row's 22nd decision: 24 too.
    # engine.continuous above tells the two modes apart.
    for r in on:  # each response: HF's greedy response of the prompt alone, cut after the stop token
        full = setup["greedy"][r["index"]]
        assert r["response_tokens"] == full[:full.index(int(r["response_tokens"][-1])) + 1] \
            if r["stop_reason"] == "stop_token" else full


def test_a_truncated_prompt_generates_as_its_kept_end(setup, counted_runs):
    runs, files = counted_runs
    assert runs[2][0] == 0
    rows = files["truncated"]
    assert [r["prompt_tokens"] for r in rows] == [[20, 30], [7], [104, 105], [41, 42]]
    for r in rows:
        assert r["response_tokens"] == _greedy_reference(setup["root"], r["prompt_tokens"])
