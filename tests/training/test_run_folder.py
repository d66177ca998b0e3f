"""Run folders never mix runs: a rerun with a changed training config is refused naming the
keys, the same config resumes, ``trainer.resume=false`` starts afresh; a ``-m`` sweep gives
one run folder per job; TensorBoard drops the events after the resumed step; the W&B run
id is kept in the run folder. Tiny models through the real command line."""
import json
import subprocess
import sys

import pytest
import torch

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


def test_a_dpo_run_whose_data_changed_is_refused_on_resume_in_one_line(sft_run):
    root, _ = sft_run
    pairs = (root / "pairs.jsonl").read_text().splitlines(keepends=True)
    (root / "pairs_changing.jsonl").write_text("".join(pairs))
    command = ("train", "dpo", "init.hf=sft_run/hf", "data.train=pairs_changing.jsonl", "trainer.out_dir=dpo_changed",
               "trainer.progress=false", "trainer.tensorboard=false", "trainer.global_batch_size=4",
               "trainer.micro_batch_size=4", "trainer.val_interval=0", "data.max_length=128", "trainer.save_interval=1")
    first = _aligner(*command, "trainer.max_steps=1", cwd=root)
    assert first.returncode == 0, first.stderr
    assert "[dpo] reference: the log-probs of" in first.stderr and "[dpo] reference: done in" in first.stderr
    (root / "pairs_changing.jsonl").write_text("".join(pairs[:-4]))  # the same path, four rows fewer
    again = _aligner(*command, "trainer.max_steps=2", cwd=root)
    assert again.returncode == 2, again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("aligner train: error:")]
    assert len(errors) == 1 and "Traceback" not in again.stderr, again.stderr
    assert errors[0].startswith("aligner train: error: resume: the training data differ from the checkpoint's run ("), \
        errors[0]


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


# ---------------------------------------------------------------------------- a finished run
@pytest.fixture(scope="module")
def done_run(world):
    """A finished 2-step SFT run in its own folder (the tests above change sft_run's)."""
    root, vocab = world
    common = ["train", "sft", "data.train=sft.jsonl", "data.tokenizer=tok", "trainer.max_steps=2",
              "trainer.out_dir=done_run", "data.validation=sft.jsonl", *_tiny(vocab)]
    first = _aligner(*common, cwd=root)
    assert first.returncode == 0, first.stderr
    return root, common


def test_rerunning_a_finished_run_changes_nothing(done_run):
    root, common = done_run
    run = root / "done_run"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == 2 and result["train"]["loss"] > 0 and result["val"]["loss"] > 0
    again = _aligner(*common, cwd=root)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 2: the run is complete (trainer.max_steps = 2), nothing to train" in again.stderr
    assert json.loads((run / "result.json").read_text()) == result
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before}
    changed = [str(p.relative_to(run)) for p in before if after[p][0] != before[p][0]]
    assert changed == [], changed
    # the HF export is not written again (only a missing one is)
    assert all(after[p][1] == before[p][1] for p in before if "hf" in p.parts)


def test_learning_rate_zero_trains_nothing(world, done_run):
    """optim.lr=0 is accepted (a parity check, an evaluation-only pass): the exported weights
    are the initial ones."""
    from safetensors.torch import load_file

    root, vocab = world
    out = _aligner("train", "sft", "init.hf=done_run/hf", "data.train=sft.jsonl", "data.tokenizer=tok",
                   "trainer.max_steps=1", "optim.lr=0", "optim.min_lr=0", "trainer.out_dir=lr0", *_tiny(vocab), cwd=root)
    assert out.returncode == 0, out.stderr
    initial, trained = load_file(root / "done_run" / "hf" / "model.safetensors"), \
        load_file(root / "lr0" / "hf" / "model.safetensors")
    assert initial.keys() == trained.keys()
    assert all(torch.equal(initial[k], trained[k]) for k in initial)
    assert json.loads((root / "lr0" / "result.json").read_text())["train"]["lr"] == 0.0


def test_a_fresh_start_removes_every_output_a_run_of_any_algorithm_writes(tmp_path):
    from aligner.training.run_folder import start_fresh

    # what runs of other algorithms leave: PPO's critic export, the monitor's best-gold policy
    # (and the folders of its swap), SteerLM 2.0's sampled groups; plus a file of the user's
    left = ["checkpoints/step_0000002/extra.json", "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard/events",
            "wandb.json", "hf/config.json", "hf_critic/config.json", "tokenizer/tokenizer.json", "result.json",
            "config.yaml", "config.yaml.tmp", "best_gold/monitor.json", "best_gold.old/monitor.json",
            "best_gold.tmp-7/config.json", "steerlm2_samples/iteration_0.jsonl", "notes.txt"]
    for name in left:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = start_fresh(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert len(removed) == len({name.split("/")[0] for name in left}) - 1


def test_speed_only_knobs_may_change_on_resume():
    """How many rollouts are generated or responses scored together changes the time a step
    takes, not what it computes; sampling settings do change it."""
    recorded = {"pg": {"generation": {"max_batch": 64, "temperature": 1.0, "continuous_batching": True},
                       "reward": {"micro_batch_size": 8}},
                "ppo": {"generation": {"max_batch": 64}, "reward": {"micro_batch_size": 8}},
                "steerlm2": {"generation": {"max_batch": 64}, "reward_micro_batch_size": 8},
                "monitor": {"micro_batch_size": 8}, "trainer": {"micro_batch_size": 2, "save_on_signal": True}}
    faster = {"pg": {"generation": {"max_batch": 8, "temperature": 1.0, "continuous_batching": False},
                     "reward": {"micro_batch_size": 2}},
              "ppo": {"generation": {"max_batch": 8}, "reward": {"micro_batch_size": 2}},
              "steerlm2": {"generation": {"max_batch": 8}, "reward_micro_batch_size": 2},
              "monitor": {"micro_batch_size": 2}, "trainer": {"micro_batch_size": 1, "save_on_signal": False}}
    assert config_diff(recorded, faster) == []
    hotter = json.loads(json.dumps(faster))
    hotter["pg"]["generation"]["temperature"] = 0.7
    assert config_diff(recorded, hotter) == [("pg.generation.temperature", 1.0, 0.7)]


# ---------------------------------------------------------------------------- signals
def _wait_for_step(run, step, proc, timeout=240.0):
    """Wait until the run in ``run`` has logged training step ``step`` (fails if it ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        path = run / "metrics.jsonl"
        if path.is_file() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_saves_a_checkpoint_and_ctrl_c_names_the_last_one(world, tmp_path):
    """A real training process: SIGTERM to its whole process group (as Slurm sends it)
    finishes the step, saves a checkpoint and stops with one line naming it (exit 143);
    the same command resumes from it, and Ctrl-C (SIGINT) stops at once with one line naming
    the last complete checkpoint (exit 130). No traceback either way."""
    import os
    import signal

    from aligner.models.checkpoint import find_latest

    root, vocab = world
    run = tmp_path / "signalled"
    cmd = [sys.executable, "-W", "ignore", "-m", "aligner.cli.main", "train", "sft", f"data.train={root / 'sft.jsonl'}",
           f"data.tokenizer={root / 'tok'}", "trainer.max_steps=100000", "trainer.save_interval=1000",
           f"trainer.out_dir={run}", *_tiny(vocab)]

    def signalled(sig, group, step):
        err = tmp_path / f"stderr_{sig}"
        proc = pyproc.start(cmd, cwd=root, stderr=err)
        try:
            _wait_for_step(run, step, proc)
            (os.killpg if group else os.kill)(proc.pid, sig)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running 120 s after {sig!r}; its stderr ends:\n"
                                     + "\n".join(err.read_text().splitlines()[-30:])) from None
        finally:
            proc.kill()
        return code, err.read_text().splitlines()

    code, lines = signalled(signal.SIGTERM, True, 2)
    latest = find_latest(run / "checkpoints")
    assert code == 143 and latest is not None, lines
    saved = int(latest.name.split("_")[1])
    assert lines[-1] == (f"aligner train: stopped by SIGTERM after step {saved}: saved the checkpoint {latest};"
                         " the same command resumes from it"), lines
    assert not any("Traceback" in line or "error" in line for line in lines), lines
    assert not (run / "result.json").exists()

    code, lines = signalled(signal.SIGINT, False, saved + 2)
    assert code == 130, lines
    assert any(line == f"[aligner rank 0] [sft] resumed from step {saved}" for line in lines), lines
    assert lines[-1].startswith("aligner train: interrupted (Ctrl-C) at step ")
    assert lines[-1].endswith(f"; the last complete checkpoint is {latest}: the same command resumes from it")
    assert find_latest(run / "checkpoints") == latest
    assert not any("Traceback" in line for line in lines), lines


# A Ctrl-C whose KeyboardInterrupt Python cannot pass on: it arrives while a finalizer runs
# (``__del__`` here), where Python reports the exception as ignored and carries on.
SWALLOWED_CTRL_C = """
import signal, sys
from omegaconf import OmegaConf
from aligner.algorithms.sft import SFTTrainer
from aligner.runtime import RunStopped
from aligner.training.algorithm import StepHook

class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)

class CtrlCInAFinalizer(StepHook):
    name = "ctrl_c"
    def after_step(self, loop):
        if loop.step == 3:
            Finalized()  # dropped at once: its finalizer gets the interrupt

class Trainer(SFTTrainer):
    def hooks(self, algo):
        return [CtrlCInAFinalizer()]

try:
    Trainer(OmegaConf.from_dotlist(sys.argv[1:])).fit()
except RunStopped as exc:
    print(f"stopped {int(exc.signum)}: {exc}")
else:
    print("not stopped")
"""


def test_a_ctrl_c_python_reports_as_ignored_still_stops_the_run_after_the_step(world, tmp_path):
    """The interrupt raised inside a finalizer is lost to the training code (Python prints
    "Exception ignored"); the loop remembers the Ctrl-C and stops after that step."""
    root, vocab = world
    run = tmp_path / "swallowed"
    out = pyproc.run([sys.executable, "-W", "ignore", "-c", SWALLOWED_CTRL_C, f"data.train={root / 'sft.jsonl'}",
                      f"data.tokenizer={root / 'tok'}", "trainer.max_steps=8", "trainer.save_interval=0",
                      f"trainer.out_dir={run}", *_tiny(vocab)], cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KeyboardInterrupt" in out.stderr and "Exception ignored" in out.stderr, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == ("stopped 2: interrupted (Ctrl-C) at step 3; no checkpoint was"
                                                   " written yet: the same command starts the run again"), out.stdout
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("split") == "train"]
    assert steps == [1, 2, 3]
