"""The REINFORCE family under every layout (fp32): one update on fixed experience gives the
same loss and gradient norm at TP=1 with micro-batches of 4 and of 1, TP=2, PP=2 and DP=2
(1e-5, relative to values above 1), for three configurations whose normalisers are
global-batch quantities: GRPO (clipped, KL as a k3 loss term, seq-mean-token-mean, 2 epochs
x 2 mini-batches, seq-mean-token-sum), RLOO (REINFORCE, KL in the reward, truncated
responses masked, seq-sum-constant) and REINFORCE++ with a group baseline (global
whitening, seq-mean-token-mean; token-mean is PPO's, tests/algorithms/test_ppo_parallel.py), GSPO and
CISPO (2 epochs x 2 mini-batches). Every group's
samples stay on the data-parallel rank of their prompt: at DP=2 each rank generates and
holds whole groups, and its advantages are those of the same rows at DP=1.

GRPO and RLOO run on packed rows (``pack_tokens``: one row of 24 tokens a micro-batch) and,
at TP=1, TP=2 and PP=2, also on padded rows (``packed = false``): loss, gradient norms and
updated weights equal (1e-6). Without pipeline stages the passes take packed rows or rows
cut to their micro-batch's longest by estimated cost
(:func:`aligner.training.forward.length_microbatches`); the fixed rows (9..15 tokens,
S = 24) are such that packing wins clearly on this model (hidden 32: a token position
weighs 176 query-key pairs): the 8 rows pack into 4 rows of 24 (96 positions, ~4.9 MFLOP)
against two micro-batches of 4 rows cut to 16 (128 positions, ~6.0 MFLOP), so the packed
path is what these layouts run (RLOO's update positions asserted below). GRPO's
mini-batches of 4 rows pack where two rows of 24 hold them and are cut where three would
be needed (more positions and pairs than 4 rows of 16).

Without pipeline stages a step's last packed micro-batch holds only its own rows (GRPO:
4 packed rows in micro-batches of 3, so 3 + 1 rows; at PP=2 3 + 3): the same loss, gradient
norms and weights as padded rows (1e-6).

GRPO and RLOO with one update per rollout (KL as a loss term) take the old log-probs from
the update's own forward (no pass before it): at TP=1 and PP=2 the loss, gradient norms,
updated weights and every metric equal those of the same step with the pass
(``old_logps_pass = always``), 1e-6.

One spawned job per world size runs every layout of that size (megatron-core's parallel
state re-initialised between layouts), so the module stays fast."""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

TOL = 1e-5
G = 4
CONFIGS = {
    "grpo": {"advantage": "grpo", "loss": "clipped", "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.05,
             "aggregation": "seq_mean_token_sum", "epochs": 2, "mini_batch_size": 4, "entropy_coef": 0.01,
             "clip_eps_high": 0.28, "pack_tokens": 24},
    "rloo": {"advantage": "rloo", "loss": "reinforce", "kl_mode": "reward", "kl_estimator": "k1", "kl_coef": 0.05,
             "truncated": "mask", "aggregation": "seq_sum_constant", "aggregation_constant": 6.0,
             "pack_tokens": 24},
    "rpp": {"advantage": "reinforce_pp_baseline", "loss": "clipped", "kl_mode": "reward", "kl_coef": 0.05,
            "aggregation": "seq_mean_token_mean", "dual_clip": 3.0},
    # the sequence-level and clipped-weight objectives: their second mini-batch is off-policy
    "gspo": {"advantage": "grpo", "loss": "gspo", "kl_mode": "reward", "kl_coef": 0.05,
             "aggregation": "seq_mean_token_mean", "epochs": 2, "mini_batch_size": 4},
    "cispo": {"advantage": "grpo", "loss": "cispo", "kl_mode": "reward", "kl_coef": 0.05, "clip_eps_high": 0.01,
              "aggregation": "token_mean", "epochs": 2, "mini_batch_size": 4},
}
KEYS = ("loss/policy", "grad_norm/policy_first", "grad_norm/policy", "policy/entropy", "kl_ref")
# packed update passes (one row of S = 24 tokens per micro-batch) against padded rows: the
# same step on the same layout
UNPACKED = ("grpo", "rloo")
PACKED_LAYOUTS = ("tp1_mbs4", "tp2", "pp2")
# one update per rollout: the old log-probs from the update's forward (packed / padded rows)
# (GRPO: the 8 samples pack into 4 rows of 24 tokens, micro-batches of 3 rows: 3 + 1 rows
# without pipeline stages, 3 + 3 with; RLOO: one row per micro-batch)
ONE_UPDATE = {
    "grpo_one": {"advantage": "grpo", "loss": "clipped", "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.05,
                 "aggregation": "token_mean", "entropy_coef": 0.01, "clip_eps_high": 0.28, "pack_tokens": 72},
    "rloo_one": {"advantage": "rloo", "loss": "reinforce", "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.05,
                 "truncated": "mask", "aggregation": "seq_sum_constant", "aggregation_constant": 6.0,
                 "pack_tokens": 24},
}
ONE_UPDATE_LAYOUTS = ("tp1_mbs4", "pp2")


def _fixed_experience(context, vocab):
    """8 fixed prompt + response rows in 2 groups of 4 (the same on every layout); row 5 ends
    without EOS; this DP rank's share (whole groups)."""
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
                     rewards=torch.tensor([1.0, 0.0, 2.5, 1.0, -1.0, 3.0, 0.5, 0.25], dtype=torch.float64),
                     truncated=torch.tensor([False] * 5 + [True] + [False] * 2),
                     group=torch.arange(8) // G, sample_index=torch.arange(8))
    share = 8 // context.dp_size
    return exp.select(range(context.dp_rank * share, (context.dp_rank + 1) * share))


def _one_update(workdir, assets, tag, tp, pp, micro_batch_size, pg):
    from aligner.algorithms.pg import PGTrainer
    from tests.algorithms.pg_setup import pg_config
    from tests.algorithms.ppo_setup import first_step

    cfg = pg_config(assets, f"{workdir}/{tag}", parallel={"tp": tp, "pp": pp}, optim={"lr": 1e-4},
                    trainer={"global_batch_size": 2, "micro_batch_size": 1}, pg=dict(pg, reference="model"))
    roles, algo, context = first_step(PGTrainer(cfg), cfg, assets, micro_batch_size)
    skipped = algo.old_logps_from_update()
    exp = algo.maker.score_passes(context, _fixed_experience(context, assets["vocab"]), old_logps=not skipped)
    extra = algo.advantages(context, exp)
    metrics = algo.update(context, exp, extra)  # without the pass: sets exp.old_logps
    metrics.update(algo.experience_metrics(context, exp, extra))  # as the step orders them
    out = {k: metrics[k] for k in KEYS}
    out["skipped"], out["metrics"] = skipped, {k: v for k, v in metrics.items() if not k.startswith("time/")}
    out["advantages"] = extra["advantages"].double()
    out["update_positions"] = metrics["update_positions"]
    out["weights"] = torch.cat([p.detach().double().flatten() for m in roles["policy"].modules
                                for p in m.parameters()])
    if "loss/kl" in metrics:
        out["loss/kl"] = metrics["loss/kl"]
    return out


def _groups_of_a_step(workdir, assets):
    """Generate one step (2 prompts x G samples) and report which groups this rank holds."""
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.algorithm import StepContext
    from aligner.training.loop import TrainingLoop
    from tests.algorithms.pg_setup import pg_config

    cfg = pg_config(assets, f"{workdir}/groups", trainer={"global_batch_size": 2, "micro_batch_size": 1})
    trainer = PGTrainer(cfg)
    trainer.init_parallel()
    train = trainer.load_data(cfg["data"]["train"])
    policy = trainer.build_models()
    roles, algo = trainer.build_roles(policy, len(train))
    loop = TrainingLoop(algo, policy, train, optim=trainer.cfg.optim, trainer=trainer.cfg.trainer, roles=roles)
    samples = loop.global_batch(0)
    context = StepContext(roles=loop.roles, step=0, samples=samples, local_samples=loop.local_share(samples),
                          micro_batch_size=1, seed=7)
    exp = algo.maker.generate(context)
    return {"group": exp.group.tolist(), "sample_index": exp.sample_index.tolist(), "texts": exp.texts}


def run_world(workdir, assets, layouts):
    from megatron.core import parallel_state as ps

    out = {}
    for tag, tp, pp, mbs in layouts:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
        for name, pg in CONFIGS.items():
            out[f"{tag}/{name}"] = _one_update(workdir, assets, f"{tag}_{name}", tp, pp, mbs, pg)
            if name in UNPACKED and tag in PACKED_LAYOUTS:
                out[f"{tag}/{name}/unpacked"] = _one_update(workdir, assets, f"{tag}_{name}_unpacked", tp, pp, mbs,
                                                            dict(pg, packed=False))
        for name, pg in (ONE_UPDATE.items() if tag in ONE_UPDATE_LAYOUTS else ()):
            for mode in ("auto", "always"):
                out[f"{tag}/{name}/{mode}"] = _one_update(workdir, assets, f"{tag}_{name}_{mode}", tp, pp, mbs,
                                                          dict(pg, old_logps_pass=mode))
        if tag in ONE_UPDATE_LAYOUTS:
            out[f"{tag}/grpo_one/unpacked"] = _one_update(workdir, assets, f"{tag}_grpo_one_unpacked", tp, pp, mbs,
                                                          dict(ONE_UPDATE["grpo_one"], packed=False))
        if tag in ("tp1_mbs4", "dp2"):
            out[f"{tag}/groups"] = _groups_of_a_step(workdir, assets)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    w = tmp_path_factory.mktemp("pg_layouts")
    assets = make_assets(w / "assets")
    one = spawn_local(run_world, 1, str(w / "w1"), assets, [("tp1_mbs4", 1, 1, 4), ("tp1_mbs1", 1, 1, 1)],
                      timeout=600)
    two = spawn_local(run_world, 2, str(w / "w2"), assets, [("tp2", 2, 1, 4), ("pp2", 1, 2, 4), ("dp2", 1, 1, 4)],
                      timeout=600)
    return one, two


@pytest.mark.parametrize("layout", ["tp1_mbs1", "tp2", "pp2", "dp2"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_update_on_fixed_experience_agrees(runs, layout, config):
    one, two = runs
    ref = one[0][f"tp1_mbs4/{config}"]
    assert abs(ref["kl_ref"]) > 1e-4 and ref["grad_norm/policy_first"] > 0 and abs(ref["loss/policy"]) > 1e-6
    ranks = one if layout == "tp1_mbs1" else two
    keys = [k for k in ref if k not in ("advantages", "weights", "update_positions", "skipped", "metrics")]
    for rank, rank_out in enumerate(ranks):
        got = rank_out[f"{layout}/{config}"]
        for key in keys:
            assert abs(got[key] - ref[key]) <= TOL * max(1.0, abs(ref[key])), (layout, config, key, got[key], ref[key])
        # advantages of this rank's rows: those of the same rows at DP=1 (groups whole on a rank)
        rows = slice(4 * rank, 4 * rank + 4) if layout == "dp2" else slice(0, 8)
        assert torch.allclose(got["advantages"], ref["advantages"][rows], atol=1e-6, rtol=0), (layout, config)


def test_each_group_is_generated_and_held_by_one_data_parallel_rank(runs):
    one, two = runs
    whole = one[0]["tp1_mbs4/groups"]
    assert whole["group"] == [0] * G + [1] * G and whole["sample_index"] == list(range(2 * G))
    for rank in (0, 1):
        part = two[rank]["dp2/groups"]
        assert part["group"] == [rank] * G
        assert part["sample_index"] == whole["sample_index"][rank * G:(rank + 1) * G]
        assert part["texts"] == whole["texts"][rank * G:(rank + 1) * G]  # the same responses at any DP size


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
@pytest.mark.parametrize("config", UNPACKED)
def test_packed_updates_equal_padded_rows(runs, layout, config):
    """Packed update passes (log-prob passes and training micro-batches) give the padded
    rows' loss, gradient norms and updated weights (1e-6), over fewer token positions."""
    one, two = runs
    for rank_out in (one if layout.startswith("tp1") else two):
        packed, padded = rank_out[f"{layout}/{config}"], rank_out[f"{layout}/{config}/unpacked"]
        assert packed["update_positions"] < padded["update_positions"], (layout, config)
        if config == "rloo":  # one update over the 8 rows: 4 packed rows of 24 (cut rows: 2 x 4 x 16)
            assert packed["update_positions"] == 4 * 24, (layout, packed["update_positions"])
        for key in KEYS:
            assert abs(packed[key] - padded[key]) <= 1e-6 * max(1.0, abs(padded[key])), (layout, config, key)
        assert torch.allclose(packed["weights"], padded["weights"], atol=1e-6, rtol=0), (layout, config)


@pytest.mark.parametrize("layout", ONE_UPDATE_LAYOUTS)
@pytest.mark.parametrize("config", list(ONE_UPDATE))
def test_old_logps_from_the_update_equal_the_pass(runs, layout, config):
    """One update per rollout: the old log-probs from the update's own forward (no pass
    before it) give the loss, gradient norms, updated weights and every metric of the step
    with the pass (1e-6); the ratio is exactly 1."""
    one, two = runs
    for rank_out in (one if layout.startswith("tp1") else two):
        own, pass_ = rank_out[f"{layout}/{config}/auto"], rank_out[f"{layout}/{config}/always"]
        assert own["skipped"] and not pass_["skipped"], (layout, config)
        assert own["metrics"]["policy/ratio"] == 1.0 and own["metrics"]["policy/approx_kl"] == 0.0
        assert abs(own["kl_ref"]) > 1e-4 and own["grad_norm/policy"] > 0
        assert own["metrics"].keys() == pass_["metrics"].keys()
        for key, value in pass_["metrics"].items():
            assert abs(own["metrics"][key] - value) <= 1e-6 * max(1.0, abs(value)), (layout, config, key)
        assert torch.allclose(own["weights"], pass_["weights"], atol=1e-6, rtol=0), (layout, config)


@pytest.mark.parametrize("layout", ONE_UPDATE_LAYOUTS)
def test_short_last_packed_microbatch_equals_padded_rows(runs, layout):
    """Without pipeline stages the last packed micro-batch holds only its own rows: 4 rows
    of 24 positions (PP=2: 6, the last micro-batch filled; padded rows: 8), the same loss,
    gradient norms and weights as padded rows (1e-6)."""
    one, two = runs
    for rank_out in (one if layout.startswith("tp1") else two):
        packed, padded = rank_out[f"{layout}/grpo_one/auto"], rank_out[f"{layout}/grpo_one/unpacked"]
        assert padded["update_positions"] == 8 * 24
        assert packed["update_positions"] == (4 if layout.startswith("tp1") else 6) * 24, packed["update_positions"]
        for key in KEYS:
            assert abs(packed[key] - padded[key]) <= 1e-6 * max(1.0, abs(padded[key])), (layout, key)
        assert torch.allclose(packed["weights"], padded["weights"], atol=1e-6, rtol=0), layout
