"""ORPO and SimPO end to end against TRL (installed in the test extra).

The same tiny random HF Llama and plain prompt/chosen/rejected pairs go (a) through
``aligner``'s DPO trainer with ``dpo.loss_type=orpo`` / ``simpo`` (``data.template=raw``)
and (b) through TRL's ``ORPOTrainer`` and ``CPOTrainer(loss_type="simpo")``: their own
tokenisation, collation, forward, per-token mean log-probs and losses, on one batch of
every pair. Step 1's loss, mean chosen / rejected log-probs and gradient norm agree
within 1e-5.

ORPO: TRL always adds its SFT term, the cross-entropy over the prompt *and* the chosen
response averaged over every token of the batch; aligner's SFT term is the chosen
response's per-token NLL averaged per pair (``dpo.sft_weight``, docs/dpo.md). The two
definitions differ, so the comparison is on the odds-ratio term (``dpo.sft_weight=0``
here, TRL's ``odds_ratio_loss`` on TRL's forward); SimPO runs with ``cpo_alpha=0`` (no
NLL) on both sides.
"""
import json
from pathlib import Path

import torch

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import write_jsonl
from tests.algorithms.test_dpo_against_transformers import LR, PAIRS, dpo_config

RUNS = {"orpo": {"beta": 0.25}, "simpo": {"beta": 2.0, "gamma": 0.7}}


def run_aligner(hf_dir, train, out_dir):
    from aligner.algorithms.dpo import DPOTrainer

    out = {}
    for kind, options in RUNS.items():
        DPOTrainer(dpo_config(hf_dir, train, f"{out_dir}/{kind}", 1,
                              {"loss_type": kind, "sft_weight": 0.0, **options})).fit()
        lines = (Path(out_dir) / kind / "metrics.jsonl").read_text().splitlines()
        out[kind] = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    return out


def trl_step(hf_dir, kind):
    """Step 1 of TRL's trainer for ``kind``: loss, mean chosen / rejected log-probs, gradient norm."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.bos_token = None  # aligner's raw template adds no BOS; TRL adds one when the tokenizer has it
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    # TRL joins prompt and response as strings: the space keeps the word tokenizer's tokens apart
    rows = [dict(p, prompt=p["prompt"] + " ") for p in PAIRS]
    common = dict(output_dir=str(Path(hf_dir).parent / f"trl_{kind}"), per_device_train_batch_size=len(rows),
                  max_length=64, report_to=[], use_cpu=True, learning_rate=LR)
    if kind == "orpo":
        trainer = ORPOTrainer(model=model, args=ORPOConfig(beta=RUNS[kind]["beta"], **common),
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=RUNS[kind]["beta"], simpo_gamma=RUNS[kind]["gamma"],
                         **common)
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout in either implementation
    if kind == "orpo":  # the odds-ratio term alone (module docstring)
        chosen, rejected = trainer.concatenated_forward(model, batch)[:2]
        losses = trainer.odds_ratio_loss(chosen, rejected)[0]
        loss = -losses.mean()
    else:
        chosen, rejected = trainer.concatenated_forward(model, batch)[:2]
        loss = trainer.get_batch_loss_metrics(model, batch)[0]
    model.zero_grad()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {"loss": loss.item(), "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item(),
            "grad_norm": norm.item()}


def test_orpo_and_simpo_match_trl(tiny_hf, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ours = spawn_local(run_aligner, 1, str(tiny_hf["dir"]), train, str(tmp_path / "run"), timeout=600)[0]
    for kind in RUNS:
        first, want = ours[kind][0], trl_step(str(tiny_hf["dir"]), kind)
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            print(f"{kind} step 1 {key}: aligner {first[key]:.9g} trl {want[key]:.9g}"
                  f" diff {abs(first[key] - want[key]):.2e}")
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert abs(first[key] - want[key]) <= 1e-5, (kind, key, first[key], want[key])
        assert want["grad_norm"] > 1e-3  # a gradient worth comparing
