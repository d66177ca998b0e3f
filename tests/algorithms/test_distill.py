"""Knowledge distillation end to end.

- Against TRL: the same tiny random HF student and a tiny HF teacher (another
  architecture, the same vocabulary) and prompt/completion rows go (a) through ``aligner``'s
  distill trainer (``data.template=raw``) and (b) through transformers with TRL's GKD loss
  (``GKDTrainer.generalized_jsd_loss``, β = 0.5, labels -100 on prompts and padding) and
  torch's Adam; step 1's loss and gradient norm agree within 1e-5, step 3's loss within 1e-4.
- Under every layout: step 1's loss and gradient norm at TP=2, PP=2 and DP=2 equal one
  process (1e-5), for the full-vocabulary JSD (vocab-parallel, never gathered), the
  on-the-fly top-k forward KL with an SFT term, the top-k reverse KL with the tail bucket,
  and both precomputed to the run folder first (each equal to its on-the-fly top-k); and
  sequence-level distillation on the teacher's responses (pure, on greedy responses; reverse
  KL with the NLL, on sampled ones): every layout writes the same responses file, byte for
  byte, the greedy responses are transformers' greedy decoding of the HF teacher and step 1's
  loss the HF student's NLL of them (1e-5).
- A teacher with another vocabulary is refused in one line naming both sizes.
"""
import json
from pathlib import Path

import pytest
import torch

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import COMPLETION_ROWS as ROWS, VOCAB, adam_run, write_jsonl

BETA, LR, STEPS = 0.5, 5e-3, 3


def distill_config(student, teacher, train, out_dir, **distill):
    return {
        "algorithm": "distill",
        "init": {"hf": student},
        "data": {"train": train, "template": "raw", "max_length": 64},
        "distill": dict({"teacher": teacher}, **distill),
        **adam_run(out_dir, LR, max_steps=STEPS),
    }


def run_aligner(cfg):
    from aligner.algorithms.distill import DistillTrainer

    DistillTrainer(cfg).fit()
    return [json.loads(line) for line in (Path(cfg["trainer"]["out_dir"]) / "metrics.jsonl").read_text().splitlines()]


def trl_gkd(student_dir, teacher_dir):
    """Per step (before its update): TRL's generalised JSD loss and the gradient norm."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = LlamaForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32, attn_implementation="eager")
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32, attn_implementation="eager")
    student.eval()  # no dropout in either implementation
    teacher.eval()
    seqs = []
    for r in ROWS:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        attention[i, :len(p) + len(c)] = 1
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=attention).logits
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = []
    for _ in range(STEPS):
        logits = student(input_ids=ids, attention_mask=attention).logits
        loss = GKDTrainer.generalized_jsd_loss(logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], beta=BETA)
        opt.zero_grad()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters()))
        steps.append({"loss": loss.item(), "grad_norm": norm.item()})
        opt.step()
    return steps


def test_gkd_loss_matches_trl(tiny_hf, teacher_hf, tmp_path):
    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = distill_config(str(tiny_hf["dir"]), teacher_hf, train, str(tmp_path / "run"), divergence="jsd", beta=BETA)
    ours = [r for r in spawn_local(run_aligner, 1, cfg, timeout=600)[0] if r["split"] == "train"]
    ref = trl_gkd(str(tiny_hf["dir"]), teacher_hf)
    assert len(ours) == STEPS
    for key in ("loss", "grad_norm"):
        print(f"step 1 {key}: aligner {ours[0][key]:.9g} trl {ref[0][key]:.9g}")
        assert abs(ours[0][key] - ref[0][key]) <= 1e-5, (key, ours[0][key], ref[0][key])
    assert ref[0]["grad_norm"] > 1e-3 and ref[0]["loss"] > 1e-2  # a divergence worth comparing
    assert abs(ours[2]["loss"] - ref[2]["loss"]) <= 1e-4, (ours[2]["loss"], ref[2]["loss"])
    assert ref[2]["loss"] < ref[0]["loss"] - 1e-3, "the comparison must be made on a moving loss"


def test_a_teacher_with_another_vocabulary_is_refused(tiny_hf, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.algorithms.distill import DistillTrainer
    from aligner.config import ConfigError

    other = tmp_path / "other"  # another vocabulary
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(other)
    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    trainer = DistillTrainer(distill_config(str(tiny_hf["dir"]), str(other), train, str(tmp_path / "run")))
    with pytest.raises(ConfigError) as err:
        trainer.preflight()
    msg = str(err.value)
    assert "\n" not in msg and f"{VOCAB + 8} tokens" in msg and f"student's {VOCAB}" in msg, msg


LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2), (1, 1)]}  # (tp, pp); (1, 1) on 2 ranks is DP=2
TOPK = {"divergence": "forward_kl", "top_k": 5, "sft_weight": 0.5}
TAIL = {"divergence": "reverse_kl", "top_k": 5, "top_k_tail": True, "temperature": 1.5}
# sequence-level: pure (the NLL of the teacher's greedy responses), and reverse KL + NLL on sampled ones
SEQKD = {"responses": "teacher", "kd_weight": 0.0, "sft_weight": 1.0,
         "teacher_generation": {"temperature": 0.0, "max_new_tokens": 6}}
SEQKD_KL = {"responses": "teacher", "divergence": "reverse_kl", "sft_weight": 0.5,
            "teacher_generation": {"temperature": 1.0, "max_new_tokens": 6}}
VARIANTS = {"jsd": {"divergence": "jsd", "beta": 0.3, "temperature": 1.5}, "topk": TOPK,
            "precomputed": dict(TOPK, precompute=True), "tail": TAIL, "tail_precomputed": dict(TAIL, precompute=True),
            "seqkd": SEQKD, "seqkd_kl": SEQKD_KL}


def hf_greedy_and_nll(student_dir, teacher_dir, max_new_tokens):
    """transformers' greedy responses of the teacher to the rows' prompts (up to EOS or
    ``max_new_tokens``), and the student's NLL per token of them (the mean over all of them)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(student_dir)
    models = [LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
              for d in (student_dir, teacher_dir)]
    responses, total, count = [], 0.0, 0
    with torch.no_grad():
        for r in ROWS:
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            ids = list(prompt)
            for _ in range(max_new_tokens):
                ids.append(int(models[1](input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
            responses.append(ids[len(prompt):])
            logps = torch.log_softmax(models[0](input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
            targets = torch.tensor(ids[1:])
            total -= float(logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum())
            count += len(ids) - len(prompt)
    return responses, total / count


def _layouts(student, teacher, train, workdir, world):
    from megatron.core import parallel_state as ps

    out = {}
    for tp, pp in LAYOUTS[world]:
        for name, variant in VARIANTS.items():
            cfg = distill_config(student, teacher, train, f"{workdir}/{world}_{tp}_{pp}_{name}", **variant)
            cfg["parallel"] = {"tp": tp, "pp": pp}
            cfg["trainer"]["max_steps"] = 1
            out[(tp, pp, name)] = [r for r in run_aligner(cfg) if r["split"] == "train"][0]
            ps.destroy_model_parallel()  # the next layout on the same process group
    return out


def test_every_layout_equals_one_process(tiny_hf, teacher_hf, tmp_path):
    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    args = (str(tiny_hf["dir"]), teacher_hf, train, str(tmp_path))
    one = spawn_local(_layouts, 1, *args, 1, timeout=600)[0]
    two = spawn_local(_layouts, 2, *args, 2, timeout=900)[0]
    for name in VARIANTS:
        want = one[(1, 1, name)]
        for tp, pp in LAYOUTS[2]:
            got = two[(tp, pp, name)]
            for key in [k for k in ("loss", "loss/kd", "grad_norm") if k in want]:  # pure seqkd: no loss/kd
                print(f"{name} tp{tp} pp{pp} {key}: {got[key]:.9g} vs {want[key]:.9g}")
                assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (name, tp, pp, key)
    # the top-k precomputed to the run folder trains as the top-k computed on the fly, with its tail too
    for key in ("loss", "loss/kd", "grad_norm"):
        assert abs(one[(1, 1, "precomputed")][key] - one[(1, 1, "topk")][key]) <= 1e-6, key
        assert abs(one[(1, 1, "tail_precomputed")][key] - one[(1, 1, "tail")][key]) <= 1e-6, key
    assert one[(1, 1, "tail")]["loss/kd"] > 1e-4  # a divergence worth comparing
    tail = torch.load(tmp_path / "1_1_1_tail_precomputed" / "teacher_topk.pt", weights_only=True)
    assert tail["temperature"] == 1.5 and all(float(m.max()) < 0 for m in tail["tail"])  # log-masses below 1
    table = torch.load(tmp_path / "1_1_1_precomputed" / "teacher_topk.pt", weights_only=True)
    assert table["k"] == 5 and table["index"] == list(range(len(ROWS)))
    assert all(v.shape[1] == 5 and bool((v[:, :-1] >= v[:, 1:]).all()) for v in table["values"])  # sorted
    # sequence-level: the teacher answered alike at every layout; the greedy answers and the NLL are transformers'
    for name in ("seqkd", "seqkd_kl"):
        want = (tmp_path / f"1_1_1_{name}" / "teacher_responses.jsonl").read_bytes()
        for tp, pp in LAYOUTS[2]:
            assert (tmp_path / f"2_{tp}_{pp}_{name}" / "teacher_responses.jsonl").read_bytes() == want, (name, tp, pp)
    rows = [json.loads(line) for line in (tmp_path / "1_1_1_seqkd" / "teacher_responses.jsonl").read_text().splitlines()]
    greedy, nll = hf_greedy_and_nll(args[0], teacher_hf, SEQKD["teacher_generation"]["max_new_tokens"])
    assert [r["response_tokens"] for r in rows] == greedy
    print(f"seqkd step 1 loss: aligner {one[(1, 1, 'seqkd')]['loss']:.9g} transformers {nll:.9g}")
    assert abs(one[(1, 1, "seqkd")]["loss"] - nll) <= 1e-5 and "loss/kd" not in one[(1, 1, "seqkd")]
    assert one[(1, 1, "seqkd_kl")]["loss/kd"] > 1e-3  # a divergence worth comparing
    assert one[(1, 1, "seqkd")]["teacher/response_tokens"] > 1


def test_a_tail_bucket_without_top_k_is_refused(tmp_path):
    from aligner.algorithms.distill import DistillTrainer
    from aligner.config import ConfigError

    cfg = distill_config("student", "teacher", "rows.jsonl", str(tmp_path / "run"), top_k_tail=True)
    with pytest.raises(ConfigError) as err:
        DistillTrainer(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "distill.top_k_tail = true" in msg and "needs distill.top_k" in msg, msg
    cfg["distill"]["top_k"] = 4
    assert DistillTrainer(cfg).cfg.distill.top_k_tail is True
