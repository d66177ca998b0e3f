"""SPIN end to end on a tiny random HF Llama and prompt/completion rows (2 iterations of one
step each).

- Iteration 0 against transformers: the generations written to the run folder are scored
  by transformers (the initial model is iteration 0's reference): their log-probs equal the
  file's reference log-probs, and step 1's loss and gradient norm equal the DPO loss
  ``−logσ(β[(log π(y) − log π_t(y)) − (log π(y') − log π_t(y'))])`` (ln 2: policy =
  reference) plus ``spin.sft_weight`` times the SFT response's NLL per token, computed by
  transformers on those pairs (1e-5).
- Iteration 1 against transformers: the model iteration 0 ended with (the same run cut
  short after its one step, exported) is iteration 1's reference and generator: its
  transformers log-probs of iteration 1's pairs equal the file's reference log-probs, and
  they differ from the initial model's (1e-5).
- Under every layout: TP=2, PP=2 and DP=2 generate the same responses and log the same
  loss, gradient norm and reference log-probs as one process, at the 4 steps of both
  iterations (1e-5).
"""
import json
import math
from pathlib import Path

import torch

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import COMPLETION_ROWS as ROWS, adam_run, write_jsonl
from tests.layouts import in_turn

BETA, LR, SFT_WEIGHT = 0.5, 5e-3, 0.25


def spin_config(hf, train, out_dir, sft_weight=0.0, **trainer):
    return {
        "algorithm": "spin",
        "init": {"hf": hf},
        "data": {"train": train, "template": "raw", "max_length": 64},
        **adam_run(out_dir, LR, **trainer),
        "spin": {"iterations": 2, "epochs": 1, "beta": BETA, "sft_weight": sft_weight,
                 "generation": {"max_new_tokens": 6}},
    }


def run_aligner(cfg):
    from aligner.algorithms.spin import SPINTrainer

    SPINTrainer(cfg).fit()
    out = Path(cfg["trainer"]["out_dir"])
    rows = [[json.loads(line) for line in (out / "spin_samples" / f"iteration_{k}.jsonl").read_text().splitlines()]
            for k in range(2)]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], rows


def run_full_and_first_iteration(cfg):
    """The 2-iteration run, then the same run cut short after iteration 0's one step and
    exported (the model iteration 1 starts from), in one process."""
    from megatron.core import parallel_state as ps

    full = run_aligner(cfg)
    ps.destroy_model_parallel()
    first = dict(cfg, trainer=dict(cfg["trainer"], out_dir=cfg["trainer"]["out_dir"] + "_first", max_steps=1,
                                   export_hf=True))
    from aligner.algorithms.spin import SPINTrainer

    SPINTrainer(first).fit()
    return full, str(Path(first["trainer"]["out_dir"]) / "hf")


def transformers_logps(hf_dir, pairs):
    """Summed response log-probs of every ``(prompt, chosen, rejected)`` under the HF model:
    ``(chosen, rejected)`` lists."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()

    def logp(prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(lp[len(prompt) - 1:].sum())

    return [logp(p, c) for p, c, _ in pairs], [logp(p, r) for p, _, r in pairs]


def transformers_step(hf_dir, pairs, sft_weight):
    """Log-probs of every (prompt, response) under the HF model, the loss at policy =
    reference (the DPO loss plus ``sft_weight`` x the chosen responses' mean NLL per token),
    its gradient norm and the NLL term alone."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()

    def logp(prompt, response):
        ids = torch.tensor([prompt + response])
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp[len(prompt) - 1:].sum()

    chosen = torch.stack([logp(p, c) for p, c, _ in pairs])
    rejected = torch.stack([logp(p, r) for p, _, r in pairs])
    ref_c, ref_r = chosen.detach(), rejected.detach()
    nll = torch.stack([-c / len(response) for c, (_, response, _) in zip(chosen, pairs)]).mean()
    loss = (-F.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r)))).mean() + sft_weight * nll
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    return ref_c.tolist(), ref_r.tolist(), loss.item(), norm.item(), nll.item()


def test_iteration_zero_matches_transformers(tiny_hf, tmp_path):
    from transformers import AutoTokenizer

    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = spin_config(str(tiny_hf["dir"]), train, str(tmp_path / "run"), sft_weight=SFT_WEIGHT)
    (metrics, rows), first_hf = spawn_local(run_full_and_first_iteration, 1, cfg, timeout=600)[0]
    assert [m["iteration"] for m in metrics] == [0.0, 1.0]
    tok = AutoTokenizer.from_pretrained(tiny_hf["dir"])

    def file_pairs(k):
        pairs = []
        for row in sorted(rows[k], key=lambda r: r["index"]):
            r = ROWS[row["index"]]
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            chosen = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            pairs.append((prompt, chosen, row["rejected_tokens"]))
        return pairs

    pairs = file_pairs(0)
    assert any(c != r for _, c, r in pairs)  # the generations are not the SFT responses
    ref_c, ref_r, loss, norm, nll = transformers_step(str(tiny_hf["dir"]), pairs, SFT_WEIGHT)
    file_c = [r["ref_chosen"] for r in sorted(rows[0], key=lambda r: r["index"])]
    file_r = [r["ref_rejected"] for r in sorted(rows[0], key=lambda r: r["index"])]
    assert max(abs(a - b) for a, b in zip(file_c + file_r, ref_c + ref_r)) <= 1e-5
    print(f"step 1: loss {metrics[0]['loss']:.9g} (ln 2 {math.log(2):.9g}), grad_norm {metrics[0]['grad_norm']:.9g}"
          f" transformers {norm:.9g}")
    assert abs(metrics[0]["loss"] - loss) <= 1e-5 and abs(loss - SFT_WEIGHT * nll - math.log(2)) < 1e-12
    assert abs(metrics[0]["loss/sft"] - nll) <= 1e-5 and abs(metrics[0]["loss/preference"] - math.log(2)) <= 1e-6
    assert abs(metrics[0]["grad_norm"] - norm) <= 1e-5 and norm > 1e-3
    # iteration 1 trains against the model iteration 0 ended with, not the initial one
    pairs1 = file_pairs(1)
    want_c, want_r = transformers_logps(first_hf, pairs1)
    init_c, _ = transformers_logps(str(tiny_hf["dir"]), pairs1)
    rows1 = sorted(rows[1], key=lambda r: r["index"])
    got_c, got_r = [r["ref_chosen"] for r in rows1], [r["ref_rejected"] for r in rows1]
    print(f"iteration 1 reference: {got_c} vs transformers {want_c} (initial model {init_c})")
    assert max(abs(a - b) for a, b in zip(got_c + got_r, want_c + want_r)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(got_c, init_c)) > 1e-3


LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2), (1, 1)]}  # (tp, pp); (1, 1) on 2 ranks is DP=2


def run_at(cfg, tp, pp):
    """:func:`run_aligner` on ``cfg`` at TP ``tp`` x PP ``pp`` (DP: the rest of the ranks)."""
    return run_aligner(dict(cfg, parallel={"tp": tp, "pp": pp}))


def layout_calls(config, workdir, world, layouts):
    """:func:`tests.layouts.in_turn`'s calls of :func:`run_at`: ``config(out_dir)`` at each
    ``(tp, pp)`` of ``layouts``, each in its own run folder, tagged ``(tp, pp)``."""
    return [((tp, pp), config(f"{workdir}/{world}_{tp}_{pp}"), tp, pp) for tp, pp in layouts]


def test_every_layout_equals_one_process(tiny_hf, tmp_path):
    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    def config(out_dir):  # 2 steps per iteration: the second trains a moved policy against the iteration's reference
        return spin_config(str(tiny_hf["dir"]), train, out_dir, global_batch_size=2, micro_batch_size=1)

    want_metrics, want_rows = spawn_local(in_turn, 1, run_at, layout_calls(config, tmp_path, 1, LAYOUTS[1]),
                                          timeout=600)[0][(1, 1)]
    two = spawn_local(in_turn, 2, run_at, layout_calls(config, tmp_path, 2, LAYOUTS[2]), timeout=900)[0]
    for (tp, pp), (metrics, rows) in two.items():
        for k in range(2):
            assert [r["rejected_tokens"] for r in rows[k]] == [r["rejected_tokens"] for r in want_rows[k]], (tp, pp, k)
            for key in ("ref_chosen", "ref_rejected"):
                assert max(abs(a[key] - b[key]) for a, b in zip(rows[k], want_rows[k])) <= 1e-5, (tp, pp, k, key)
        for got, want in zip(metrics, want_metrics):
            for key in ("loss", "grad_norm", "rewards/margins", "sampling/response_tokens"):
                print(f"tp{tp} pp{pp} step {got['step']} {key}: {got[key]:.9g} vs {want[key]:.9g}")
                assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (tp, pp, got["step"], key)
