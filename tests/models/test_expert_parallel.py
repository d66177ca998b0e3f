"""Expert parallelism (EP=2: two processes, each holding half the experts of every MoE layer,
the two being the data-parallel group) against one process, on the families harness's tiny
Mixtral (tests/models/families.py: 4 experts, top-2).

- One step of the SFT, DPO and GRPO trainers (fp32, ``init.hf``): the loss and the gradient
  norm equal one process's (1e-5). GRPO generates on both ranks with sampling, so the ranks'
  responses end at different steps and their MoE layers keep in step through the rollout
  engine's expert-parallel idling. GRPO with dynamic sampling, where one rank generates a
  second round alone (the other keeps its experts in step), equals EP=1 at the same
  data-parallel size (its extra rounds depend on how the prompts split over ranks).
  GRPO with 2 epochs of 2 mini-batches: the second epoch's order gives one rank 3 rows of
  a mini-batch and the other 1, so the short rank runs fillers that count for nothing
  (the update micro-batches in step); loss and gradient norms equal one process's.
- Validation whose last global batch leaves one rank without a row: that rank runs a
  zero-weight micro-batch so the other's MoE layers can exchange tokens; the validation
  loss equals one process's.
- Resume at another EP layout: an SFT run (Adam, 2 steps, a checkpoint after step 1)
  written at EP=2 resumes in one process, and one written in one process resumes at EP=2;
  step 2's loss equals the uninterrupted run's (1e-6). Likewise a GRPO run of the MoE policy
  (step 2's loss, gradient norm and rewards, 1e-5). Model, optimizer moments, schedule
  and data position travel through megatron-core's dist_checkpointing, which maps each
  rank's local experts to their global index.

Jobs: one process (references, then the resume of the EP=2 checkpoint), two processes (EP=2,
then the resume of the one-process checkpoint).
"""
import json
import shutil
from pathlib import Path

import pytest

from aligner.parallel.spawn import spawn_local
from tests.models import families as fam

TOL = 1e-5
RESUME_TOL = 1e-6
# tests.algorithms.pg_setup:target_reward scores every response to an "ok" prompt 0: its group
# has no signal, so with dynamic sampling its rank generates a second round alone
PROMPTS = [{"prompt": fam._words(6 + i, 60 + i), "target": target} for i, target in enumerate(("good", "ok"))]


def response_length_reward(prompts, responses, metadata):
    """The response's length in characters: rewards that differ within a group."""
    return [float(len(r)) for r in responses]


def _config(root, algorithm, run, ep, steps=1, save_interval=0, resume=False):
    path = Path(root) / "mixtral"
    data = {"sft": "sft.jsonl", "dpo": "pairs.jsonl", "pg": "prompts.jsonl", "pg_dynamic": "prompts.jsonl",
            "pg_epochs": "prompts.jsonl"}[algorithm]
    cfg = {"init": {"hf": str(path)}, "parallel": {"ep": ep},
           "data": {"train": str(path / data), "template": "raw", "max_length": 64},
           "optim": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 0,
                     "schedule": "constant"},
           "trainer": {"max_steps": steps, "global_batch_size": 2, "micro_batch_size": 1,
                       "out_dir": str(Path(root) / run), "export_hf": False, "progress": False,
                       "tensorboard": False, "resume": resume, "save_interval": save_interval, "seed": 3}}
    if algorithm == "sft" and steps > 1:  # validated at the end: 3 rows, the last global batch split 1 / 0
        cfg["data"]["validation"] = str(path / "val.jsonl")
    if algorithm == "dpo":
        cfg["dpo"] = {"beta": fam.BETA, "loss_type": "dpo", "sft_weight": 0.0}
    if algorithm.startswith("pg"):
        cfg["data"]["tokenizer"] = str(path)
        cfg["pg"] = {"advantage": "grpo", "loss": "clipped", "samples_per_prompt": 2, "kl_coef": 0.0,
                     "generation": {"max_new_tokens": 12},
                     "reward": {"kind": "function",
                                "function": "tests.models.test_expert_parallel:response_length_reward"}}
    if algorithm == "pg_dynamic":
        cfg["pg"].update(dynamic_sampling=True, max_generation_rounds=2,
                         reward={"kind": "function", "function": "tests.algorithms.pg_setup:target_reward"})
    if algorithm == "pg_epochs":  # 8 rows, 2 mini-batches of 4, micro-batches of 1 row: see EPOCHS_SPLIT
        cfg["pg"].update(samples_per_prompt=4, epochs=2, mini_batch_size=4)
    return cfg


def _fit(root, algorithm, run, ep, **kw):
    """The train metrics of a run of the ``algorithm`` trainer."""
    import torch

    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.pg import PGTrainer
    from aligner.algorithms.sft import SFTTrainer

    trainer = {"sft": SFTTrainer, "dpo": DPOTrainer, "pg": PGTrainer, "pg_dynamic": PGTrainer,
               "pg_epochs": PGTrainer}[algorithm]
    job = trainer(_config(root, algorithm, run, ep, **kw))
    job.fit()
    torch.distributed.barrier()
    rows = [json.loads(line) for line in (Path(root) / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    if algorithm.startswith("pg"):  # whether the MoE policy's passes may pack their rows (they must not)
        algo = job.trainer.algorithm
        for r in train:
            r["passes_packed"] = float(algo.packed or algo.maker.packed)
    return train


def _validation(root, run):
    """The last validation metrics of ``run``."""
    rows = [json.loads(line) for line in (Path(root) / run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] not in ("train",)][-1]


def _checkpoint_after_step1(root, whole, run):
    """A copy of run ``whole`` as it stood when step 1's checkpoint was written."""
    root = Path(root)
    shutil.copytree(root / whole, root / run)
    shutil.rmtree(root / run / "checkpoints" / "step_0000002")
    (root / run / "checkpoints" / "latest").write_text(json.dumps({"step": 1, "dir": "step_0000001"}))


def _switch(ep):
    from megatron.core import parallel_state as ps

    from aligner.parallel import ParallelConfig, initialize

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(ParallelConfig(ep=ep, seed=1))


def run(root, ep, resume_from):
    """At EP=ep: one step of SFT, DPO and GRPO (at EP=2 also GRPO with dynamic sampling, at EP=1
    and at EP=2 over the same two ranks), GRPO with uneven update micro-batch counts, 2-step
    SFT and GRPO runs checkpointed after step 1 (``whole_ep<ep>``, ``pg_whole_ep<ep>``), and
    the resumes of runs ``resume_from``'s and ``pg_<resume_from>``'s step-1 checkpoints (None: none)."""
    out = {}
    if ep > 1:  # dynamic sampling's extra rounds depend on the data-parallel size: its reference is EP=1 at DP=2
        _switch(1)
        out["pg_dynamic_ep1"] = _fit(root, "pg_dynamic", "pg_dynamic_ep1_dp2", 1)
    _switch(ep)
    algorithms = ("dpo", "pg_epochs") + (("pg_dynamic",) if ep > 1 else ())
    out.update({alg: _fit(root, alg, f"{alg}_ep{ep}", ep) for alg in algorithms})
    out["whole"] = _fit(root, "sft", f"whole_ep{ep}", ep, steps=2, save_interval=1)
    out["validation"] = _validation(root, f"whole_ep{ep}")
    out["sft"] = out["whole"][:1]  # its first step is SFT's one step (constant LR)
    out["pg_whole"] = _fit(root, "pg", f"pg_whole_ep{ep}", ep, steps=2, save_interval=1)
    out["pg"] = out["pg_whole"][:1]  # likewise GRPO's
    if resume_from is not None:
        out.update(resume_only(root, ep, resume_from))
    return out


def resume_only(root, ep, resume_from):
    """The SFT run ``resume_from`` and the GRPO run ``pg_<resume_from>``, each from its step-1
    checkpoint, resumed at EP=ep: ``{"resumed": .., "pg_resumed": ..}`` (their train metrics)."""
    import torch

    _switch(ep)
    out = {}
    for algorithm, whole, key in (("sft", resume_from, "resumed"), ("pg", f"pg_{resume_from}", "pg_resumed")):
        if torch.distributed.get_rank() == 0:
            _checkpoint_after_step1(root, whole, f"resume_{whole}_at_ep{ep}")
        torch.distributed.barrier()
        out[key] = _fit(root, algorithm, f"resume_{whole}_at_ep{ep}", ep, steps=2, save_interval=1, resume=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_parallel")
    path = fam.make_checkpoint(root, "mixtral")
    (path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fam.SFT_ROWS + fam.SFT_ROWS[:1]))
    one = spawn_local(run, 1, str(root), 1, None, timeout=600)[0]
    two = spawn_local(run, 2, str(root), 2, "whole_ep1", timeout=600)
    one.update(spawn_local(resume_only, 1, str(root), 1, "whole_ep2", timeout=300)[0])
    return one, two


KEYS = {"sft": ("loss", "grad_norm"), "dpo": ("loss", "grad_norm", "logps/chosen", "logps/rejected"),
        "pg": ("loss/policy", "grad_norm/policy", "reward/mean"),
        "pg_dynamic": ("loss/policy", "grad_norm/policy", "reward/mean", "pg/generation_rounds", "pg/groups_short"),
        "pg_epochs": ("loss/policy", "grad_norm/policy", "grad_norm/policy_first", "reward/mean", "updates",
                      "policy/approx_kl")}
# rows of each of pg_epochs' second-epoch mini-batches on DP rank 0 and 1 (seed 3, step 0)
EPOCHS_SPLIT = [[3, 1], [1, 3]]


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "pg"])
def test_one_step_at_expert_parallel_size_two_equals_one_process(runs, algorithm):
    one, two = runs
    want = one[algorithm][0]
    assert abs(want[KEYS[algorithm][1]]) > 1e-3  # a gradient flowed: the comparison means something
    if algorithm == "pg":  # an MoE policy's log-prob and update passes run on padded rows, never packed
        assert want["passes_packed"] == 0.0 and all(out["pg"][0]["passes_packed"] == 0.0 for out in two)
    for rank, out in enumerate(two):
        got = out[algorithm][0]
        assert got["step"] == 1
        for key in KEYS[algorithm]:
            assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (algorithm, rank, key, got, want)


def test_uneven_update_micro_batch_counts_at_expert_parallel_size_two(runs):
    """Epoch 2's mini-batches split 3 / 1 rows over the two ranks (one row per micro-batch):
    the short rank runs fillers in step with the other's expert exchanges, and they count
    for nothing: every update's loss and gradient norm equal one process's."""
    import torch

    from aligner.parallel.seeds import minibatch_order_generator

    order = torch.randperm(8, generator=minibatch_order_generator(3, 0, 1))
    position = torch.empty_like(order)
    position[order] = torch.arange(8)
    split = [[sum(int(p) % 2 == k for p in position[4 * r:4 * r + 4]) for r in range(2)] for k in range(2)]
    assert split == EPOCHS_SPLIT  # the uneven case this test is about
    one, two = runs
    want = one["pg_epochs"][0]
    assert want["updates"] == 4 and abs(want["grad_norm/policy"]) > 1e-3
    for rank, out in enumerate(two):
        got = out["pg_epochs"][0]
        for key in KEYS["pg_epochs"]:
            assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (rank, key, got[key], want[key])


def test_a_round_of_generation_one_rank_skips_keeps_the_experts_in_step(runs):
    """GRPO with dynamic sampling: the "ok" prompt's group has no signal, so its rank alone
    generates a second round; at EP=2 the other rank's MoE layers take part in that
    round's forwards (without, the first rank would wait for ever)."""
    _, two = runs
    for rank, out in enumerate(two):
        want, got = out["pg_dynamic_ep1"][0], out["pg_dynamic"][0]
        assert got["pg/generation_rounds"] == 2 and got["pg/groups_short"] == want["pg/groups_short"] == 1, got
        assert abs(want["grad_norm/policy"]) > 1e-3
        for key in KEYS["pg_dynamic"]:
            assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (rank, key, got, want)


def test_validation_with_an_uneven_last_batch_at_expert_parallel_size_two(runs):
    """3 validation rows in global batches of 2: the last batch's row goes to rank 0 and
    rank 1 has none, yet runs a zero-weight micro-batch so rank 0's forward can exchange
    its tokens; the validation loss equals one process's."""
    one, two = runs
    want = one["validation"]
    assert want["split"] != "train" and want["step"] == 2
    for out in two:
        got = out["validation"]
        assert (got["split"], got["step"]) == (want["split"], want["step"])
        assert abs(got["loss"] - want["loss"]) <= TOL, (got, want)


def test_a_checkpoint_resumes_at_another_expert_parallel_size(runs):
    one, two = runs
    whole = one["whole"]
    assert [r["step"] for r in whole] == [1, 2]
    assert abs(whole[1]["loss"] - whole[0]["loss"]) > 1e-3  # step 2 is a different point
    for out in two:  # the uninterrupted run at EP=2 is the same run
        assert abs(out["whole"][1]["loss"] - whole[1]["loss"]) <= TOL
    ep2_from_ep1 = [out["resumed"] for out in two]
    ep1_from_ep2 = one["resumed"]
    for got, want in [(ep1_from_ep2, two[0]["whole"])] + [(r, whole) for r in ep2_from_ep1]:
        assert [r["step"] for r in got] == [1, 2]
        assert abs(got[1]["loss"] - want[1]["loss"]) <= RESUME_TOL, (got[1]["loss"], want[1]["loss"])


def test_a_grpo_checkpoint_of_the_moe_policy_resumes_at_another_expert_parallel_size(runs):
    """GRPO (Adam, 2 steps, a checkpoint after step 1): written at EP=1 and resumed at EP=2,
    and the reverse; step 2 (generation from the resumed weights and RNG, then the update)
    equals the uninterrupted run's at the other layout."""
    one, two = runs
    whole = one["pg_whole"]
    assert [r["step"] for r in whole] == [1, 2]
    assert abs(whole[1]["grad_norm/policy"] - whole[0]["grad_norm/policy"]) > 1e-4  # step 2 is a different point
    pairs = [(one["pg_resumed"], two[0]["pg_whole"])] + [(out["pg_resumed"], whole) for out in two]
    for got, want in pairs:
        assert [r["step"] for r in got] == [1, 2]
        for key in KEYS["pg"]:
            assert abs(got[1][key] - want[1][key]) <= TOL * max(1.0, abs(want[1][key])), (key, got[1], want[1])
