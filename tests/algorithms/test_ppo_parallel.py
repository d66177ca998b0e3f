"""PPO under every layout (fp32): one PPO step on fixed experience gives the same policy and
critic losses and gradient norms at TP=1, TP=2, PP=2 and DP=2 (1e-5, relative to values
above 1), and on packed rows the padded rows' losses, gradient norms and updated weights
(1e-6) at TP=1, TP=2 and PP=2; a whole 3-step run
(generation, scoring, experience passes, updates; fixed seeds) gives the same metrics at
TP=1, TP=2 and DP=2.

Jobs: one process (TP=1), and one two-process job that runs TP=2, PP=2 and DP=2 in turn
(megatron-core's parallel state re-initialised between them)."""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.layouts import in_turn

TOL = 1e-5
FIXED_KEYS = ("loss/policy", "loss/value", "grad_norm/policy_first", "grad_norm/critic_first", "grad_norm/policy",
              "grad_norm/critic", "policy/clipfrac", "policy/approx_kl", "kl_ref", "explained_variance")
RUN_KEYS = ("reward/mean", "response_length/mean", "loss/policy", "loss/value", "grad_norm/policy",
            "grad_norm/critic", "kl_ref", "policy/entropy", "policy/ratio")


def _fixed_experience(context, vocab):
    """8 fixed prompt + response rows (the same on every layout); this DP rank's share."""
    from aligner.algorithms.online import Experience

    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(8):
        prompt = torch.randint(7, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        response = torch.randint(7, vocab, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g)
        rows.append((prompt, response))
    S = 24
    tokens = torch.zeros(8, S, dtype=torch.long)
    mask = torch.zeros(8, S)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p)] = p
        tokens[i, len(p):len(p) + len(r)] = r
        mask[i, len(p):len(p) + len(r)] = 1.0
    exp = Experience(tokens=tokens, response_mask=mask, prompt_lengths=torch.tensor([len(p) for p, _ in rows]),
                     response_lengths=torch.tensor([len(r) for _, r in rows]), rollout_logps=torch.zeros(8, S),
                     rewards=torch.randn(8, generator=g, dtype=torch.float64), truncated=torch.zeros(8, dtype=torch.bool),
                     group=torch.arange(8), sample_index=torch.arange(8))
    share = 8 // context.dp_size
    return exp.select(range(context.dp_rank * share, (context.dp_rank + 1) * share))


def run_layout(workdir, assets, tp, pp, with_run):
    from aligner.algorithms.ppo import PPOTrainer
    from tests.algorithms.ppo_setup import ppo_config

    initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
    out = {"fixed": _fixed_step(f"{workdir}/fixed", assets, tp, pp, packed=True)}
    if dp_size() == 1:  # packed update passes against padded rows on the same layout
        out["fixed_unpacked"] = _fixed_step(f"{workdir}/fixed_unpacked", assets, tp, pp, packed=False)
    if with_run:
        from pathlib import Path
        import json

        run_dir = f"{workdir}/run"
        PPOTrainer(ppo_config(assets, run_dir, parallel={"tp": tp, "pp": pp}, trainer={"max_steps": 3},
                              ppo={"epochs": 2, "mini_batch_size": 4})).fit()
        import torch.distributed as dist

        if dist.get_rank() == 0:
            out["run"] = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return out


def dp_size():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _fixed_step(out_dir, assets, tp, pp, packed):
    """One PPO step (2 epochs x 2 mini-batches) on fixed experience: its metrics, the update
    passes' token positions and the updated policy and critic weights of this rank.
    packed: micro-batches of one packed row of S = 24 tokens, else padded rows. Both roles
    step with SGD, whose update is the gradient's: Adam scales a gradient element near 0 up
    to a step of the learning rate, so rounding-level differences of such an element (of
    any two summation orders) would move it by up to lr per update."""
    from aligner.algorithms.ppo import PPOTrainer
    from tests.algorithms.ppo_setup import first_step, ppo_config

    sgd = {"name": "sgd", "lr": 1e-2}
    cfg = ppo_config(assets, out_dir, parallel={"tp": tp, "pp": pp}, optim=sgd,
                     ppo={"epochs": 2, "mini_batch_size": 4, "kl_coef": 0.05, "entropy_coef": 0.01,
                          "reference": "model", "packed": packed, "pack_tokens": 24, "critic_optim": dict(sgd)})
    roles, algo, context = first_step(PPOTrainer(cfg), cfg, assets, micro_batch_size=4)
    exp = algo.maker.score_passes(context, _fixed_experience(context, assets["vocab"]))
    extra = algo.advantages(context, exp)
    metrics = algo.experience_metrics(context, exp, extra)
    metrics.update(algo.update(context, exp, extra))
    out = {k: metrics[k] for k in FIXED_KEYS + ("update_positions",)}
    for role in ("policy", "critic"):
        out[f"weights/{role}"] = torch.cat([p.detach().double().flatten() for m in roles[role].modules
                                            for p in m.parameters()])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    w = tmp_path_factory.mktemp("ppo_layouts")
    assets = make_assets(w / "assets")
    one = spawn_local(run_layout, 1, str(w / "tp1"), assets, 1, 1, True, timeout=600)
    # one two-process job for the three layouts of two ranks
    two = spawn_local(in_turn, 2, run_layout, [(tag, f"{w}/{tag}", assets, tp, pp, with_run) for tag, tp, pp, with_run
                                              in (("tp2", 2, 1, True), ("pp2", 1, 2, False), ("dp2", 1, 1, True))],
                      timeout=900)
    return {"tp1": one, **{tag: [rank[tag] for rank in two] for tag in ("tp2", "pp2", "dp2")}}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_one_step_on_fixed_experience_agrees(runs, layout):
    ref = runs["tp1"][0]["fixed"]
    assert abs(ref["kl_ref"]) > 1e-4 and ref["grad_norm/policy_first"] > 0 and ref["grad_norm/critic_first"] > 0
    for rank_out in runs[layout]:
        for key in FIXED_KEYS:
            got = rank_out["fixed"][key]
            assert abs(got - ref[key]) <= TOL * max(1.0, abs(ref[key])), (layout, key, got, ref[key])


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_three_step_run_agrees(runs, layout):
    ref = runs["tp1"][0]["run"]
    other = runs[layout][0]["run"]
    assert [r["step"] for r in ref] == [r["step"] for r in other] == [1, 2, 3]
    for a, b in zip(ref, other):
        for key in RUN_KEYS:
            assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(a[key])), (layout, a["step"], key, a[key], b[key])


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_packed_updates_equal_padded_rows(runs, layout):
    """Packed update passes (log-prob and value passes, policy and critic micro-batches)
    give the padded rows' losses, gradient norms and updated weights (1e-6), over fewer
    token positions."""
    for rank_out in runs[layout]:
        packed, padded = rank_out["fixed"], rank_out["fixed_unpacked"]
        assert packed["update_positions"] < padded["update_positions"], layout
        for key in FIXED_KEYS:
            assert abs(packed[key] - padded[key]) <= 1e-6 * max(1.0, abs(padded[key])), (layout, key)
        for role in ("policy", "critic"):
            assert torch.allclose(packed[f"weights/{role}"], padded[f"weights/{role}"], atol=1e-6, rtol=0), role
