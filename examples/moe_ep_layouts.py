"""Expert parallelism composed with tensor and pipeline parallelism, on four local ranks,
against transformers and against one process (a hand-run check; the test suite covers EP=2
on two ranks, tests/models/test_families.py and tests/models/test_expert_parallel.py).

    OMP_NUM_THREADS=1 python examples/moe_ep_layouts.py [--work DIR]

On the families harness's tiny Mixtral (tests/models/families.py: 4 experts, top-2):

- EP=2 x TP=2 and EP=2 x PP=2 (world 4, DP=2): the last position's logits against
  transformers (max |difference|), greedy decoding of 32 tokens with both decode paths
  identical to ``transformers.generate``, and export equal to the source tensors;
- EP=2 x TP=2 with sequence parallelism: one step of the SFT and the DPO trainer, loss and
  gradient norm against one process.

Prints one line per check (the figures in docs/moe.md).
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests' tiny-model harness

from aligner.parallel.spawn import spawn_local  # noqa: E402
from tests.models import families as fam  # noqa: E402
from tests.models import test_expert_parallel as ep_tests  # noqa: E402


def inference(root, tp, pp, ep):
    from aligner.models import export_hf, from_pretrained
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(tp=tp, pp=pp, ep=ep, seed=1))
    models, cfg = from_pretrained(Path(root) / "mixtral")
    out = {"logits": fam._last_logits(models), **fam._generate(models, cfg)}
    export_hf(models, cfg, Path(root) / f"export_tp{tp}_pp{pp}_ep{ep}", tokenizer_dir=Path(root) / "mixtral")
    return out


def one_step(root, parallel, tag):
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.sft import SFTTrainer

    out = {}
    for algorithm, trainer in (("sft", SFTTrainer), ("dpo", DPOTrainer)):
        cfg = ep_tests._config(root, algorithm, f"{algorithm}_{tag}", 1)
        cfg["parallel"] = parallel
        trainer(cfg).fit()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        rows = [json.loads(line) for line in (Path(root) / f"{algorithm}_{tag}" / "metrics.jsonl").read_text().splitlines()]
        out[algorithm] = next(r for r in rows if r["split"] == "train")
    return out


def main():
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = p.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="moe_ep_layouts_"))
    shutil.rmtree(root / "mixtral", ignore_errors=True)
    fam.make_checkpoint(root, "mixtral")
    model = fam.hf_model(root / "mixtral")
    logits, greedy = fam.hf_last_logits(model), fam.hf_greedy(model)
    source = load_file(str(root / "mixtral" / "model.safetensors"))
    for tp, pp in ((2, 1), (1, 2)):
        ranks = spawn_local(inference, 4, str(root), tp, pp, 2, timeout=1800)
        diff = max(float((r["logits"] - logits).abs().max()) for r in ranks if r["logits"] is not None)
        same = all(r[impl] == greedy for r in ranks for impl in ("fused", "megatron"))
        exported = {}
        for f in (root / f"export_tp{tp}_pp{pp}_ep2").glob("*.safetensors"):
            exported.update(load_file(str(f)))
        equal = sorted(exported) == sorted(source) and all(torch.equal(exported[k], source[k]) for k in source)
        print(f"EP=2 x TP={tp} x PP={pp}: logits max |diff| {diff:.2e}, greedy identical {same},"
              f" export equal {equal}", flush=True)
    one = spawn_local(one_step, 1, str(root), {"ep": 1}, "one", timeout=1800)[0]
    four = spawn_local(one_step, 4, str(root), {"ep": 2, "tp": 2, "sequence_parallel": True}, "ep2_tp2",
                       timeout=1800)
    for algorithm in ("sft", "dpo"):
        want = one[algorithm]
        loss = max(abs(r[algorithm]["loss"] - want["loss"]) for r in four)
        norm = max(abs(r[algorithm]["grad_norm"] - want["grad_norm"]) / want["grad_norm"] for r in four)
        print(f"{algorithm} one step, EP=2 x TP=2 (sequence parallel) vs one process: loss |diff| {loss:.2e},"
              f" grad norm relative diff {norm:.2e}", flush=True)


if __name__ == "__main__":
    main()
