"""Run folders never mix runs: a rerun with a changed training config is refused naming the
keys, the same config resumes, ``trainer.resume=false`` starts afresh; a ``-m`` sweep gives
one run folder per job; TensorBoard drops the events after the resumed step; the W&B run
id is kept in the run folder. Tiny models through the real command line."""
import json
import sys

import pytest

from tests import pyproc

from aligner.training.run_folder import FREE_KEYS, config_diff, wandb_run_id

WORDS = ["hi", "there", "hello", "friend", "bye", "fine", "ok", "good", "bad", "what", "is", "2", "4", "yes", "no"]


def _tiny(vocab_size):
    return [f"model.vocab_size={vocab_size}", "model.hidden_size=32", "model.ffn_hidden_size=64",
            "model.num_layers=2", "model.num_attention_heads=2", "model.num_query_groups=1",
            "model.max_position_embeddings=128", "data.max_length=128", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4", "trainer.val_interval=0", "trainer.progress=false",
            "optim.warmup_steps=0", "optim.schedule=constant", "trainer.tensorboard=false"]


def _aligner(*args, cwd):
    return pyproc.run([sys.executable, "-W", "ignore", "-m", "aligner.cli.main", *args], timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A word-level HF tokenizer, SFT rows and preference pairs over its words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("run_folder")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(root / "tok")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {WORDS[i % 5]}"},
                                             {"role": "assistant", "content": f"{WORDS[(i + 3) % 15]} friend"}]}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"hi {WORDS[i % 15]}", "chosen": "hello friend", "rejected": "bye"}) + "\n")
    return root, len(vocab)


@pytest.fixture(scope="module")
def sft_run(world):
    root, vocab = world
    common = ["train", "sft", "data.train=sft.jsonl", "data.tokenizer=tok", "trainer.max_steps=2",
              "trainer.out_dir=sft_run", *_tiny(vocab)]
    first = _aligner(*common, cwd=root)
    assert first.returncode == 0, first.stderr
    return root, common


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_changed_config_is_refused_and_the_same_config_resumes(sft_run):
    root, common = sft_run
    run = root / "sft_run"
    recorded = (run / "config.yaml").read_text()
    assert "lr: 0.001" in recorded and json.loads((run / "checkpoints" / "latest").read_text())["step"] == 2
    before = _metrics(run)
    assert [r["step"] for r in before if r["split"] == "train"] == [1, 2]

    changed = _aligner(*common, "optim.lr=0.002", "trainer.seed=7", cwd=root)
    assert changed.returncode == 2
    assert changed.stderr.splitlines() == [
        "aligner train: error: sft_run holds a run with a different config, so it is not resumed:"
        " optim.lr: 0.001 -> 0.002; trainer.seed: 1234 -> 7",
        "hint: resume it with the same config, or start fresh: trainer.resume=false (replaces that run) or"
        " another trainer.out_dir",
    ]
    assert (run / "config.yaml").read_text() == recorded and _metrics(run) == before  # untouched

    # the same training config (how it is logged may change) resumes: nothing is retrained
    same = _aligner(*common, "trainer.log_interval=5", "trainer.keep_last=1", cwd=root)
    assert same.returncode == 0, same.stderr
    assert "resumed from step 2" in same.stderr
    assert _metrics(run) == before

    # trainer.resume=false starts afresh in the folder: the old run's files are gone first
    fresh = _aligner(*common, "optim.lr=0.002", "trainer.resume=false", cwd=root)
    assert fresh.returncode == 0, fresh.stderr
    assert "starting afresh in sft_run: removed the previous run's checkpoints" in fresh.stderr
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    after = _metrics(run)
    assert [r["step"] for r in after if r["split"] == "train"] == [1, 2]
    assert after[0]["lr"] == pytest.approx(0.002) and before[0]["lr"] == pytest.approx(0.001)


def test_a_sweep_runs_each_job_in_its_own_run_folder(sft_run):
    root, _ = sft_run
    out = _aligner("train", "dpo", "-m", "dpo.beta=0.05,0.1", "init.hf=sft_run/hf", "data.train=pairs.jsonl",
                   "trainer.max_steps=1", "trainer.out_dir=sweep", "trainer.progress=false",
                   "trainer.tensorboard=false", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                   "trainer.val_interval=0", "data.max_length=128", cwd=root)
    assert out.returncode == 0, out.stderr
    import yaml

    sweep = root / "sweep"
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1"]
    for num, beta in ((0, 0.05), (1, 0.1)):
        job = sweep / str(num)
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["dpo"]["beta"] == beta and cfg["trainer"]["out_dir"] == f"sweep/{num}"
        assert json.loads((job / "result.json").read_text())["step"] == 1
        assert (job / "hf" / "config.json").is_file() and (job / "checkpoints" / "latest").is_file()
        assert f"sweep job {num} of 2: dpo.beta={beta}" in out.stderr


def test_config_diff_names_training_keys_and_ignores_how_a_run_is_watched():
    a = {"optim": {"lr": 1e-3}, "parallel": {"tp": 1}, "trainer": {"seed": 1, "log_interval": 1, "out_dir": "x"},
         "model": {"layer_spec": "auto"}, "dpo": {"beta": 0.1}}
    b = {"optim": {"lr": 1e-3}, "parallel": {"tp": 2}, "trainer": {"seed": 1, "log_interval": 9, "out_dir": "y"},
         "model": {"layer_spec": "local"}, "dpo": {"beta": 0.2, "eta": 1.0}}
    assert config_diff(a, b) == [("dpo.beta", 0.1, 0.2), ("dpo.eta", "(absent)", 1.0)]
    assert config_diff(a, a) == []
    assert "parallel.*" in FREE_KEYS and "trainer.max_steps" not in FREE_KEYS
    # a run may be extended on resume (logged): the length is no reason to refuse
    longer = {**a, "trainer": {**a["trainer"], "max_steps": 10}}
    assert config_diff({**a, "trainer": {**a["trainer"], "max_steps": 5}}, longer) == []


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path):
    first = wandb_run_id(tmp_path, resume=False)
    assert len(first) == 8 and json.loads((tmp_path / "wandb.json").read_text()) == {"id": first}
    assert wandb_run_id(tmp_path, resume=True) == first  # a resumed run continues the same W&B run
    second = wandb_run_id(tmp_path, resume=False)  # a fresh start is a new W&B run
    assert second != first and wandb_run_id(tmp_path, resume=True) == second


def test_tensorboard_drops_the_events_after_the_resumed_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aligner.training.logging import MetricsLogger

    def scalars():
        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    first = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):
        first.log(step, "train", {"loss": float(step)})
    first.close()  # killed after step 4; the last checkpoint was at step 2
    resumed = MetricsLogger(tmp_path, tensorboard=True, resume_step=2)
    for step in (3, 4):
        resumed.log(step, "train", {"loss": 10.0 * step})
    resumed.close()
    assert scalars() == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 30, 40]
    fresh = MetricsLogger(tmp_path, tensorboard=True)  # a new run in the folder: no old events
    fresh.log(1, "train", {"loss": 5.0})
    fresh.close()
    assert scalars() == [(1, 5.0)]
