"""KTO end to end against TRL's ``KTOTrainer`` (installed in the test extra).

The same tiny random HF Llama and the same unpaired rows (prompt, completion, label; ragged
lengths, desirable and undesirable mixed) go (a) through ``aligner``'s KTO trainer
(``data.template=raw``, one global batch of every row in micro-batches of 2) and (b) through
TRL's ``KTOTrainer`` (its own tokenisation, KL completions rotated by one within its batch,
sequential sampling, one batch of every row): the same β, weights, Adam at a constant
learning rate. λ_D = 3 (outside the paper's balance on purpose): desirable-led updates raise
the log-probs of the mismatched sequences too, so that z_ref is positive by step 3. Step
1's loss, mean chosen / rejected log-probs and gradient norm agree within 1e-5; steps 2
and 3, where the policy has moved, agree on the loss and on ``kl`` (z_ref, positive at
step 3) within 1e-5.

The rows are pairs unpaired as TRL unpairs them (every chosen response, then every rejected
one); the pair file itself, split by aligner, gives the same step 1. The same job runs
``aligner train kto`` with Hydra overrides (resident reference) for 2 steps.
"""
import json
from pathlib import Path

import torch

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import adam_run, write_jsonl

PAIRS = [
    {"prompt": "what is the sum of two and three", "chosen": "five", "rejected": "four i think"},
    {"prompt": "tell me a story", "chosen": "once upon a time there was a cat", "rejected": "no"},
    {"prompt": "is it a dog", "chosen": "yes it is", "rejected": "maybe a cat"},
]
# the pairs unpaired as TRL unpairs them: every chosen response (desirable), then every rejected one
ROWS = ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS]
        + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in PAIRS])
BETA, LR, STEPS, WD, WU = 0.5, 5e-2, 3, 3.0, 1.0


def kto_config(hf_dir, train, out_dir, steps, **kto):
    return {"algorithm": "kto", "init": {"hf": hf_dir}, "data": {"train": train, "template": "raw", "max_length": 64},
            **adam_run(out_dir, LR, max_steps=steps, global_batch_size=len(ROWS), micro_batch_size=2),
            "kto": {"beta": BETA, "desirable_weight": WD, "undesirable_weight": WU, **kto}}


def run_aligner(hf_dir, files, out_dir):
    from aligner.algorithms.kto import KTOTrainer
    from aligner.cli.main import main

    out = {}
    for name, (train, gbs, mbs) in files.items():
        cfg = kto_config(hf_dir, train, f"{out_dir}/{name}", STEPS)
        cfg["trainer"].update(global_batch_size=gbs, micro_batch_size=mbs)
        KTOTrainer(cfg).fit()
        lines = (Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()
        out[name] = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    # `aligner train kto` with Hydra overrides, in this job (its process group is this one's)
    out["cli_status"] = main(["train", "kto", f"init.hf={hf_dir}", f"data.train={files['pairs'][0]}",
                              "data.template=raw", "data.max_length=64", "trainer.max_steps=2",
                              "trainer.global_batch_size=2", "trainer.micro_batch_size=1", f"trainer.out_dir={out_dir}/cli",
                              "trainer.export_hf=false", "trainer.progress=false", "kto.beta=0.2",
                              "kto.desirable_weight=1.1", "kto.reference=resident"])
    lines = (Path(out_dir) / "cli" / "metrics.jsonl").read_text().splitlines()
    out["cli"] = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    return out


def trl_steps(hf_dir):
    """TRL's KTOTrainer for STEPS steps of one batch of every row: its logged metrics per step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.bos_token = None  # aligner's raw template adds no BOS; TRL adds one when the tokenizer has it
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    # TRL joins prompt and completion as strings: the space keeps the word tokenizer's tokens apart
    rows = [dict(r, prompt=r["prompt"] + " ") for r in ROWS]
    args = KTOConfig(output_dir=str(Path(hf_dir).parent / "trl_kto"), per_device_train_batch_size=len(rows),
                     max_length=64, report_to=[], use_cpu=True, learning_rate=LR, lr_scheduler_type="constant",
                     weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1e9,
                     max_steps=STEPS, logging_steps=1, beta=BETA, desirable_weight=WD, undesirable_weight=WU,
                     train_sampling_strategy="sequential", save_strategy="no", seed=0,
                     bf16=False)  # TRL turns bf16 autocast on by default
    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.append(dict(logs))

    record = logs
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Keep()])
    model.config.dropout = 0.0
    trainer.train()
    return logs


def test_kto_matches_trl(tiny_hf, tmp_path):
    files = {"unpaired": (write_jsonl(tmp_path / "unpaired.jsonl", ROWS), len(ROWS), 2),
             "pairs": (write_jsonl(tmp_path / "pairs.jsonl", PAIRS), len(PAIRS), 1)}
    ours = spawn_local(run_aligner, 1, str(tiny_hf["dir"]), files, str(tmp_path / "run"), timeout=600)[0]
    want = trl_steps(str(tiny_hf["dir"]))
    assert len(want) == STEPS and len(ours["unpaired"]) == STEPS
    keys = {"loss": "loss", "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected",
            "grad_norm": "grad_norm", "kl": "kl"}
    for step in range(STEPS):
        for key, trl_key in keys.items():
            print(f"step {step + 1} {key}: aligner {ours['unpaired'][step][key]:.9g} trl {want[step][trl_key]:.9g}"
                  f" diff {abs(ours['unpaired'][step][key] - want[step][trl_key]):.2e}")
    first = ours["unpaired"][0]
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert abs(first[key] - want[0][keys[key]]) <= 1e-5, (key, first[key], want[0][keys[key]])
    assert want[0]["grad_norm"] > 1e-3  # a gradient worth comparing
    for step in (1, 2):  # the policy has moved: z_ref is the mismatched pairs' KL estimate
        for key in ("loss", "kl"):
            assert abs(ours["unpaired"][step][key] - want[step][key]) <= 1e-5, (step, key)
    assert max(w["kl"] for w in want[1:]) > 1e-3, "the comparison must be made on a positive reference point"
    # the pair file split in two: the same responses, so step 1 (z_ref = 0) is the same; later the
    # mismatched pairs differ (the two halves of a pair sit side by side and are passed over)
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert abs(ours["pairs"][0][key] - first[key]) <= 1e-6, key
    # the command line: 2 steps of 2 pairs (4 responses); at step 1 each is worth λ/2
    assert ours["cli_status"] == 0 and [r["step"] for r in ours["cli"]] == [1, 2]
    assert abs(ours["cli"][0]["loss"] - (1.1 + 1.0) / 4) <= 1e-6
