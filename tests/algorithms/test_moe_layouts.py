"""An MoE policy (the family harness's tiny Qwen2-MoE: 4 experts, top 2, a shared expert)
trained with the router's load-balancing loss and z-loss: one SFT, DPO and GRPO step at
TP=2 (sequence parallel: the rollout engine generates under it) and PP=2 give the loss,
gradient norm and router metrics of one process. The micro-batches hold one sequence padded
to a multiple of 16 positions, so the two sequence-parallel ranks hold different numbers of
non-padding tokens (the case where megatron-core's per-rank z-loss mean differs from one
process's, docs/moe.md). The one-process and the TP=2 job also run a PPO step with routing
replay and a critic initialised from the MoE policy.

Jobs: one process, and one two-process job that runs TP=2 and then PP=2 (megatron-core's
parallel state re-initialised between them)."""
import json
from pathlib import Path

import pytest

from aligner.parallel.spawn import spawn_local
from tests.layouts import in_turn
from tests.models import families as fam

MOE = {"aux_loss_coeff": 0.05, "z_loss_coeff": 0.05}
TOL = 1e-5
NAME = "qwen2_moe"


def _run(path: Path, algorithm: str, out: Path, tp: int, pp: int) -> dict:
    """Step 1's metrics of one step of ``algorithm`` at TP x PP (world = tp x pp)."""
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.pg import PGTrainer
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.algorithms.sft import SFTTrainer

    data = {"sft": "sft.jsonl", "dpo": "pairs.jsonl", "pg": "prompts.jsonl", "ppo": "prompts.jsonl"}[algorithm]
    cfg = {"init": {"hf": str(path)}, "parallel": {"tp": tp, "pp": pp, "sequence_parallel": tp > 1},
           "data": {"train": str(path / data), "template": "raw", "max_length": 64},
           "optim": {"name": "sgd", "lr": 0.01, "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 0},
           "trainer": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 1, "out_dir": str(out),
                       "export_hf": False, "progress": False, "tensorboard": False, "resume": False},
           "moe": dict(MOE, routing_replay=algorithm in ("pg", "ppo"))}
    if algorithm == "dpo":
        cfg["dpo"] = {"beta": 0.5, "loss_type": "dpo", "sft_weight": 0.0}
    if algorithm == "pg":
        cfg["trainer"]["micro_batch_size"] = 2
        cfg["pg"] = {"advantage": "grpo", "samples_per_prompt": 2, "kl_coef": 0.0,
                     "reward": {"kind": "function", "function": "tests.algorithms.pg_setup:length_reward"},
                     "generation": {"max_new_tokens": 4, "temperature": 1.0}}
    if algorithm == "ppo":  # the critic starts from the MoE policy and routes by itself
        cfg["trainer"]["micro_batch_size"] = 2
        cfg["ppo"] = {"reward": {"kind": "function", "function": "tests.algorithms.pg_setup:length_reward"},
                      "critic_init": "policy", "kl_coef": 0.0, "generation": {"max_new_tokens": 4}}
    trainer = {"sft": SFTTrainer, "dpo": DPOTrainer, "pg": PGTrainer, "ppo": PPOTrainer}[algorithm](cfg)
    trainer.fit()
    import torch

    torch.distributed.barrier()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][0]


def _world(root, tp, pp, algorithms):
    root = Path(root)
    return {a: _run(root / NAME, a, root / f"{a}_tp{tp}pp{pp}", tp, pp) for a in algorithms}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_layouts")
    path = fam.make_checkpoint(root, NAME)
    (path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": fam._words(6 + i, 70 + i)}) + "\n"
                                                for i in range(2)))
    one = spawn_local(_world, 1, str(root), 1, 1, ("sft", "dpo", "pg", "ppo"), timeout=600)[0]
    # TP=2: generation first, its megatron-core buffers must not reach the training passes
    two = spawn_local(in_turn, 2, _world, [("tp2", str(root), 2, 1, ("pg", "ppo", "sft", "dpo")),
                                           ("pp2", str(root), 1, 2, ("sft", "dpo", "pg"))], timeout=900)
    return one, {tag: [rank[tag] for rank in two] for tag in ("tp2", "pp2")}


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "pg"])
def test_one_step_at_tp2_and_pp2_equals_one_process(runs, algorithm):
    one, layouts = runs
    want = one[algorithm]
    loss, norm = ("loss/policy", "grad_norm/policy") if algorithm == "pg" else ("loss", "grad_norm")
    assert want["moe/load_balancing_loss"] > 0.5 and want["moe/z_loss"] > 0.1
    checked = 0
    for layout, ranks in layouts.items():
        if algorithm not in ranks[0]:
            continue
        for rank, out in enumerate(ranks):
            got = out[algorithm]
            for key in (loss, norm, "moe/load_balancing_loss", "moe/z_loss"):
                assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (layout, rank, key, got[key], want[key])
            for key in ("moe/tokens_per_expert_max", "moe/tokens_per_expert_min", "moe/tokens_per_expert_mean"):
                assert got[key] == want[key], (layout, rank, key)
            checked += 1
    assert checked == 4
    if algorithm == "pg":  # replayed routing: the rollout's log-probs to rounding
        assert all(m["logprob_mismatch"] < 1e-6 for m in [want] + [out["pg"] for out in layouts["pp2"]])
        # at TP=2 the TP ranks' partial sums add up in another order than in the training pass
        assert all(out["pg"]["logprob_mismatch/max_abs"] < TOL for out in layouts["tp2"])


def test_ppo_with_routing_replay_and_a_critic_from_the_moe_policy(runs):
    """PPO's update micro-batches carry the rollout's routing for the policy only: the
    critic (initialised from the MoE policy) routes its own tokens."""
    got = runs[0]["ppo"]
    assert got["logprob_mismatch"] < 1e-6 and got["moe/load_balancing_loss"] > 0.5
    assert got["grad_norm/critic"] > 0 and got["grad_norm/policy"] > 0


def test_ppo_at_tp2_equals_one_process(runs):
    """The PPO step at TP=2 with sequence parallelism (generation included) gives one
    process's losses and gradient norms of the policy and of the critic."""
    want = runs[0]["ppo"]
    for rank, out in enumerate(runs[1]["tp2"]):
        got = out["ppo"]
        assert got["logprob_mismatch"] < 1e-6, rank
        for key in ("loss/policy", "grad_norm/policy", "loss/value", "grad_norm/critic", "moe/load_balancing_loss"):
            assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (rank, key, got[key], want[key])
