"""The online core's speed paths against the paths they replace (fp32).

- Log-probs and entropy from one ``log_softmax`` at TP=1
  (:func:`aligner.models.logprobs.shifted_logprobs_entropy`; without the entropy, its
  :func:`token_logprobs`) equal megatron-core's
  vocab-parallel cross-entropy and :func:`token_entropy` (values and gradients, 1e-6; padded
  vocabulary rows at ``finfo.min``); the entropy carries no autograd graph unless it is in
  the loss.
- Rows sorted by length, each micro-batch cut to its longest row
  (:func:`aligner.training.forward.trimmed_rows`): micro-batches and widths by hand, and
  :func:`length_microbatches` takes them or packed rows, whichever its
  :class:`~aligner.training.forward.PassCost` estimates cheaper (costs by hand: packed rows
  count every query-key pair, cut rows the causal half); :func:`pass_cost` of a built model
  equals ``benchmarks/flops.py``'s model FLOPs on causal rows.
- GRPO on 8 fixed rows of 13..23 tokens (S = 24: no two pack) in micro-batches of 4: with
  ``packed = true`` the passes run on cut rows (16 + 24 columns: 160 update positions
  against 192 padded), and give the padded rows' loss, KL, entropy, gradient norms, every
  metric, old and reference log-probs (at the rows' tokens) and updated weights (1e-6), with one update per rollout (old
  log-probs from the update's forward) and with 2 epochs x 2 mini-batches (the
  old-log-prob pass on cut rows); PPO's critic values and update alike.
- The fused spec's rotary embedding from tables (:func:`aligner.models.layer_spec.rotate`)
  equals megatron-core's rotation, full and partial; the tables of one frequency tensor
  are computed once.
"""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

LENGTHS = [14, 22, 13, 16, 21, 15, 23, 20]  # prompt + response tokens of the 8 fixed rows
S = 24
PG = {"advantage": "grpo", "loss": "clipped", "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.05,
      "aggregation": "token_mean", "entropy_coef": 0.0, "clip_eps_high": 0.28}
KEYS = ("loss/policy", "loss/kl", "grad_norm/policy_first", "grad_norm/policy", "policy/entropy", "kl_ref",
        "logprob_mismatch")


# ------------------------------------------------------------------------------ log-probs
def _logprobs_world():
    import torch.nn.functional as F

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from aligner.models.logprobs import shifted_logprobs_entropy, token_entropy

    initialize(ParallelConfig(seed=0))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 12, generator=g) * 3
    logits[..., 10:] = torch.finfo(torch.float32).min  # padded vocabulary rows
    tokens = torch.randint(0, 10, (3, 7), generator=g)
    w = torch.randn(3, 7, generator=g)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    # the reference: megatron-core's vocab-parallel cross-entropy ([s, b] layout, its own copy)
    ce = vocab_parallel_cross_entropy(a[:, :-1].transpose(0, 1).float().contiguous().clone(),
                                      tokens[:, 1:].transpose(0, 1).contiguous())
    lp_ref = F.pad(-ce.transpose(0, 1), (1, 0))
    ent_ref = F.pad(token_entropy(a[:, :-1]), (1, 0))
    lp, ent = shifted_logprobs_entropy(b, tokens, entropy_grad=True)
    ((lp_ref * w).sum() + (ent_ref * w).sum()).backward()
    ((lp * w).sum() + (ent * w).sum()).backward()
    c = logits.clone().requires_grad_(True)
    lp_metric, ent_metric = shifted_logprobs_entropy(c, tokens)  # entropy for metrics only
    only_lp, none = shifted_logprobs_entropy(c, tokens, entropy=False)
    return {"lp": (lp, lp_ref), "ent": (ent, ent_ref), "grad": (b.grad, a.grad),
            "metric": (lp_metric.detach(), ent_metric, lp_ref.detach(), ent_ref.detach()),
            "ent_graph": ent_metric.requires_grad, "lp_graph": lp_metric.requires_grad,
            "only": (only_lp.detach(), none)}


def test_logprobs_and_entropy_from_one_log_softmax_equal_the_vocab_parallel_pair():
    out = spawn_local(_logprobs_world, 1, timeout=300)[0]
    for key in ("lp", "ent", "grad"):
        got, want = out[key]
        assert want.abs().max() > 0.1, key
        torch.testing.assert_close(got.detach(), want.detach(), atol=1e-6, rtol=0, msg=key)
    lp, ent, lp_ref, ent_ref = out["metric"]
    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-6, rtol=0)
    assert out["lp_graph"] and not out["ent_graph"]  # no autograd graph for a logged entropy
    assert out["only"][1] is None
    torch.testing.assert_close(out["only"][0], lp_ref, atol=1e-6, rtol=0)
    assert float(lp[0, 0]) == 0.0 and float(ent[0, 0]) == 0.0  # position 0 scores no token


# ------------------------------------------------------------------------------ cut rows
def _rows_world():
    from aligner.training.forward import PassCost, length_microbatches, packed_rows, trimmed_rows

    initialize(ParallelConfig(seed=0))
    tokens = torch.arange(8 * S).reshape(8, S)
    cut = trimmed_rows(tokens, LENGTHS, 4)
    chosen = length_microbatches(tokens, LENGTHS, 4, cost=PassCost(position=1.0, pair=0.0))
    # 8 rows of 3 tokens: 2 x [4, 8] cut rows (64 positions, 4 x 36 causal pairs each) or one
    # packed [1, 24] row (24 positions, 576 pairs): cut 64a + 288b, packed 24a + 576b
    short = [3] * 8
    by_pairs, by_positions = PassCost(position=1.0, pair=1.0), PassCost(position=10.0, pair=1.0)
    return {"cut": [(b["rows"].tolist(), b["tokens"]) for b in cut], "chosen": chosen,
            "short_pairs": length_microbatches(tokens, short, 4, cost=by_pairs),
            "short_positions": length_microbatches(tokens, short, 4, cost=by_positions),
            "cost_cut": by_positions.microbatches(trimmed_rows(tokens, short, 4)),
            "cost_packed": by_positions.microbatches(packed_rows(tokens, short, 4)),
            "short_cut": trimmed_rows(tokens, short, 4), "none": trimmed_rows(tokens, None, 4)}


def test_rows_sorted_by_length_and_cut_to_each_micro_batch_longest():
    out = spawn_local(_rows_world, 1, timeout=300)[0]
    tokens = torch.arange(8 * S).reshape(8, S)
    # lengths sorted: 13 14 15 16 | 20 21 22 23 -> widths 16 and 24 (multiples of 8)
    assert [rows for rows, _ in out["cut"]] == [[2, 0, 5, 3], [7, 4, 1, 6]]
    for rows, cut in out["cut"]:
        width = 16 if rows[0] == 2 else 24
        assert torch.equal(cut, tokens[rows, :width])
    assert [b["rows"].tolist() for b in out["chosen"]] == [[2, 0, 5, 3], [7, 4, 1, 6]]  # nothing packs
    assert all("unpack_index" not in b and b["attention_mask"] is None for b in out["chosen"])
    assert sum(b["tokens"].numel() for b in out["short_cut"]) == 2 * 4 * 8
    assert out["cost_cut"] == 64 * 10 + 288 and out["cost_packed"] == 24 * 10 + 576  # 928 > 816
    # weights 10 : 1 -> packed (816 < 928): 1 x 24 positions
    assert len(out["short_positions"]) == 1 and "unpack_index" in out["short_positions"][0]
    assert out["short_positions"][0]["tokens"].shape == (1, S)
    # weights 1 : 1 -> cut rows (64 + 288 = 352 < 24 + 576 = 600), fewer positions or not
    assert [b["tokens"].shape for b in out["short_pairs"]] == [(4, 8), (4, 8)]
    assert all("unpack_index" not in b for b in out["short_pairs"])
    assert out["none"] is None


def _cost_world():
    import sys
    from pathlib import Path

    from aligner.models.config import ModelConfig
    from aligner.models.gpt import build_model
    from aligner.training.forward import pass_cost

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from flops import forward_flops

    initialize(ParallelConfig(seed=0))
    cfg = ModelConfig(vocab_size=504, hidden_size=64, ffn_hidden_size=176, num_layers=3, num_attention_heads=4,
                      num_query_groups=2, make_vocab_size_divisible_by=8)
    cost = pass_cost([build_model(cfg)])
    value = pass_cost(build_model(cfg, head="value"))
    cut = {"tokens": torch.zeros(3, 16, dtype=torch.long), "attention_mask": None}
    return {"cost": cost, "value": value, "cut": cost.microbatch(cut), "flops": forward_flops(cfg, [16] * 3)}


def test_pass_cost_is_the_model_flops():
    """position = 2 x the matmul parameters (per layer q/k/v/o 64 x (64 + 2 x 32) + 64 x 64,
    SwiGLU 3 x 64 x 176; the output layer 64 x 504), pair = 4 x layers x heads x head_dim;
    on causal rows the count of benchmarks/flops.py."""
    out = spawn_local(_cost_world, 1, timeout=300)[0]
    layer = 64 * 128 + 64 * 64 + 3 * 64 * 176
    assert out["cost"].position == 2 * (3 * layer + 64 * 504)
    assert out["cost"].pair == 4 * 3 * 64
    assert out["value"].position == 2 * (3 * layer + 64 * 1)  # a value head instead of the vocabulary
    assert out["cut"] == out["flops"]


# ------------------------------------------------------------------------------ updates
def _experience(vocab):
    """8 fixed rows of LENGTHS tokens (prompt 6..9, the rest response) in 2 groups of 4."""
    from aligner.algorithms.online import Experience

    g = torch.Generator().manual_seed(5)
    tokens = torch.zeros(8, S, dtype=torch.long)
    mask = torch.zeros(8, S)
    prompts = []
    for i, length in enumerate(LENGTHS):
        p = 6 + i % 4
        tokens[i, :length] = torch.randint(7, vocab, (length,), generator=g)
        mask[i, p:length] = 1.0
        prompts.append(p)
    return Experience(tokens=tokens, response_mask=mask, prompt_lengths=torch.tensor(prompts),
                      response_lengths=torch.tensor(LENGTHS) - torch.tensor(prompts),
                      rollout_logps=torch.zeros(8, S),
                      rewards=torch.tensor([1.0, 0.0, 2.5, 1.0, -1.0, 3.0, 0.5, 0.25], dtype=torch.float64),
                      truncated=torch.tensor([False] * 5 + [True] + [False] * 2),
                      group=torch.arange(8) // 4, sample_index=torch.arange(8))


def _one_update(workdir, assets, tag, algorithm, section):
    from aligner.algorithms.pg import PGTrainer
    from aligner.algorithms.ppo import PPOTrainer
    from tests.algorithms.pg_setup import pg_config
    from tests.algorithms.ppo_setup import first_step, ppo_config

    if algorithm == "pg":
        cfg = pg_config(assets, f"{workdir}/{tag}", optim={"lr": 1e-4},
                        trainer={"global_batch_size": 2, "micro_batch_size": 4}, pg=dict(section, reference="model"))
        trainer = PGTrainer(cfg)
    else:
        cfg = ppo_config(assets, f"{workdir}/{tag}", optim={"lr": 1e-4},
                         trainer={"global_batch_size": 8, "micro_batch_size": 4},
                         ppo=dict(section, reference="model"))
        trainer = PPOTrainer(cfg)
    roles, algo, context = first_step(trainer, cfg, assets, micro_batch_size=4)
    skipped = algo.old_logps_from_update()
    exp = algo.maker.score_passes(context, _experience(assets["vocab"]), old_logps=not skipped)
    extra = algo.advantages(context, exp)
    metrics = algo.update(context, exp, extra)
    metrics.update(algo.experience_metrics(context, exp, extra))
    weights = torch.cat([p.detach().double().flatten() for name in roles.trainable
                         for m in roles[name].modules for p in m.parameters()])
    return {"skipped": skipped, "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")},
            "old_logps": exp.old_logps, "ref_logps": exp.ref_logps, "values": exp.values, "weights": weights}


RUNS = {
    "one": ("pg", PG),  # one update per rollout: old log-probs from the update's forward
    "epochs": ("pg", dict(PG, epochs=2, mini_batch_size=4, entropy_coef=0.01)),  # the old-log-prob pass
    "ppo": ("ppo", {"kl_coef": 0.05}),  # PPO: the critic's value pass and update too
}


def _updates_world(workdir, assets):
    initialize(ParallelConfig(seed=5))
    out = {}
    for name, (algorithm, section) in RUNS.items():
        for packed in (True, False):
            out[f"{name}/{packed}"] = _one_update(workdir, assets, f"{name}_{packed}", algorithm,
                                                  dict(section, packed=packed))
    return out


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    w = tmp_path_factory.mktemp("pg_fastpath")
    assets = make_assets(w / "assets")
    return spawn_local(_updates_world, 1, str(w / "w1"), assets, timeout=600)[0]


@pytest.mark.parametrize("name", list(RUNS))
def test_updates_on_cut_rows_equal_padded_rows(updates, name):
    cut, padded = updates[f"{name}/True"], updates[f"{name}/False"]
    assert cut["skipped"] == padded["skipped"] == (name == "one")
    m, p = cut["metrics"], padded["metrics"]
    # 8 rows in micro-batches of 4: cut to 16 and 24 columns against 2 x 24
    per_update = (4 * 16 + 4 * 24, 8 * 24) if name != "epochs" else None
    if per_update is not None:
        assert (m["update_positions"], p["update_positions"]) == per_update
    else:  # 2 epochs x 2 mini-batches of 4 rows: every micro-batch at most 24 columns
        assert m["update_positions"] <= p["update_positions"] == 4 * 4 * 24
    assert p["grad_norm/policy"] > 0 and abs(p["kl_ref"]) > 1e-4
    assert m.keys() == p.keys()
    for key, value in p.items():
        if key == "update_positions":
            continue
        assert abs(m[key] - value) <= 1e-6 * max(1.0, abs(value)), (name, key, m[key], value)
    real = torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None]  # a padded row's pads are not read
    for key in ("old_logps", "ref_logps", "values"):
        if padded[key] is not None:
            torch.testing.assert_close(cut[key][real], padded[key][real], atol=1e-6, rtol=0)
    assert (padded["values"] is not None) == (name == "ppo")
    torch.testing.assert_close(cut["weights"], padded["weights"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ rope
@pytest.mark.parametrize("rot", [16, 8])
def test_rope_tables_rotate_as_megatron_core(rot):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from aligner.models.layer_spec import rope_tables, rotate

    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, 4, 16, generator=g)  # [s, b, heads, d]
    positions = torch.randint(0, 40, (11, 3), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    f = positions[..., None] * inv
    freqs = torch.cat((f, f), dim=-1)[:, :, None, :]  # [s, b, 1, rot], as the model builds them
    tables = rope_tables(freqs, x.dtype)
    assert rope_tables(freqs, x.dtype) is tables  # once per frequency tensor
    assert rope_tables(freqs.clone(), x.dtype) is not tables
    got = rotate(x, *tables)
    want = _apply_rotary_pos_emb_bshd(x, freqs)
    assert (got - x).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if rot < 16:
        assert torch.equal(got[..., rot:], x[..., rot:])  # partial rotary: the rest passes
