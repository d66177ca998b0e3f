"""DPO end to end against an independent implementation.

The same tiny random HF Llama and plain prompt/chosen/rejected pairs go (a) through
``aligner``'s DPO trainer (``init.hf``, ``data.template=raw``, the jsonl file read by the data
layer) and (b) through transformers with the DPO loss written out here (Rafailov et al.
2023, eq. 7: ``-logσ(β[(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))])``,
log-probs summed over the response tokens and EOS, the prompt encoded on its own as TRL
does for its "standard" format) and torch's Adam (no weight decay, constant lr, no
clipping). Step 0's loss, chosen / rejected log-probs and gradient norm agree within 1e-5,
and the loss after 3 optimizer steps within 1e-4.
"""
import json
from pathlib import Path

import torch

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import write_jsonl

PAIRS = [
    {"prompt": "what is the sum of two and three", "chosen": "five", "rejected": "four i think"},
    {"prompt": "tell me a story", "chosen": "once upon a time there was a cat", "rejected": "no"},
    {"prompt": "is it a dog", "chosen": "yes it is", "rejected": "maybe a cat"},
    {"prompt": "what is six and seven", "chosen": "i think so", "rejected": "no answer"},
]
BETA, LR, STEPS = 0.1, 5e-3, 4


def dpo_config(hf_dir, train, out_dir, steps, dpo):
    """The DPO trainer's config for the parity tests: plain Adam at constant ``LR``, global
    batch 4 in micro-batches of 2, the ``dpo`` section given."""
    return {
        "algorithm": "dpo",
        "init": {"hf": hf_dir},
        "data": {"train": train, "template": "raw", "max_length": 64},
        "optim": {"name": "adam", "lr": LR, "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 0,
                  "schedule": "constant", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
        "trainer": {"max_steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": out_dir,
                    "export_hf": False, "progress": False, "tensorboard": False, "resume": False},
        "dpo": {"sft_weight": 0.0, **dpo},  # conf/dpo.yaml adds an SFT term
    }


def run_aligner(hf_dir, train, out_dir):
    from aligner.algorithms.dpo import DPOTrainer

    DPOTrainer(dpo_config(hf_dir, train, out_dir, STEPS, {"beta": BETA, "loss_type": "dpo"})).fit()
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def transformers_dpo(hf_dir):
    """Per step (before its update): loss, mean chosen / rejected log-probs, gradient norm."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()  # no dropout in either implementation

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    seqs = []
    for p in PAIRS:
        prompt = encode(p["prompt"])
        for response in (p["chosen"], p["rejected"]):
            seqs.append((prompt, encode(response) + [tok.eos_token_id]))

    def logps():
        out = []
        for prompt, response in seqs:
            ids = torch.tensor([prompt + response])
            logits = model(ids).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(lp[len(prompt) - 1 :].sum())  # the response tokens and EOS
        out = torch.stack(out)
        return out[0::2], out[1::2]

    with torch.no_grad():
        ref_c, ref_r = logps()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = []
    for _ in range(STEPS):
        pc, pr = logps()
        loss = (-F.logsigmoid(BETA * ((pc - ref_c) - (pr - ref_r)))).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        steps.append({"loss": loss.item(), "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item(),
                      "grad_norm": norm.item()})
        opt.step()
    return steps


def test_dpo_matches_transformers_with_a_hand_written_loss(tiny_hf, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ours = spawn_local(run_aligner, 1, str(tiny_hf["dir"]), train, str(tmp_path / "run"), timeout=600)[0]
    ours = [r for r in ours if r["split"] == "train"]
    ref = transformers_dpo(str(tiny_hf["dir"]))
    assert len(ours) == STEPS
    first, want = ours[0], ref[0]
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        print(f"step 1 {key}: aligner {first[key]:.9g} transformers {want[key]:.9g} diff {abs(first[key] - want[key]):.2e}")
    print(f"step 4 loss: aligner {ours[3]['loss']:.9g} transformers {ref[3]['loss']:.9g}"
          f" diff {abs(ours[3]['loss'] - ref[3]['loss']):.2e}")
    assert abs(want["loss"] - 0.6931471805599453) < 1e-12  # policy = reference at step 0
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert abs(first[key] - want[key]) <= 1e-5, (key, first[key], want[key])
    assert want["grad_norm"] > 1e-3  # a gradient worth comparing
    # after 3 optimizer steps (the loss logged at step 4 is computed before the 4th update)
    assert abs(ours[3]["loss"] - ref[3]["loss"]) <= 1e-4, (ours[3]["loss"], ref[3]["loss"])
    assert ref[3]["loss"] < ref[0]["loss"] - 0.01, "the comparison must be made on a moving loss"
    for key in ("logps/chosen", "logps/rejected"):
        assert abs(ours[3][key] - ref[3][key]) <= 1e-4, key


def test_fewer_pairs_than_a_step_is_one_line_before_the_models(tiny_hf, tmp_path):
    import pytest

    from aligner.algorithms.dpo import DPOTrainer
    from aligner.config import ConfigError

    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    trainer = DPOTrainer({"init": {"hf": str(tiny_hf["dir"])},
                          "data": {"train": train, "template": "raw", "max_length": 64},
                          "trainer": {"global_batch_size": 4, "micro_batch_size": 2, "out_dir": str(tmp_path / "run"),
                                      "progress": False, "tensorboard": False}})
    with pytest.raises(ConfigError, match=r"^data.train gives 3 samples, fewer than trainer.global_batch_size = 4"):
        trainer.fit()
    assert not (tmp_path / "run" / "config.yaml").exists()
