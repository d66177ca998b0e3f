"""DPO's reference over several epochs: the precomputed table covers every training pair
(epoch 0's batches and its unused tail), so 3 epochs of 26 pairs at global batch 8 (2 pairs
per epoch beyond the last full batch, trained in later epochs after the reshuffle) log the
same metrics step for step as the resident reference, which recomputes the reference
log-probs of each step's own pairs (1e-6). The resident reference is the initial policy
after a resume too: a run stopped at step 4 and resumed logs what the whole run logs."""
import json
from pathlib import Path

import pytest

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from aligner.runtime import UserError

PAIRS, GBS, EPOCHS = 26, 8, 3
TIMING = ("step_time", "tokens_per_s")


def run_all(out_dir):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models.gpt import build_model
    from aligner.parallel import get_device, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.test_parallel_equivalence import _model_cfg, _samples

    initialize(ParallelConfig(seed=5))

    def fit(reference, out, max_steps=-1):
        set_seed(5)  # the initial weights, rebuilt alike for every run
        model = build_model(_model_cfg()).to(get_device())
        algo = DPOAlgorithm(0, beta=0.5, reference=reference)
        loop = TrainingLoop(
            algo, [model], _samples("pairs", n=PAIRS),
            optim=OptimSection(lr=1e-2, clip_grad=1.0),
            trainer=TrainerSection(max_epochs=EPOCHS, max_steps=max_steps, global_batch_size=GBS, micro_batch_size=2,
                                   out_dir=f"{out_dir}/{out}", export_hf=False, progress=False, tensorboard=False,
                                   resume=True, log_interval=1),
        )
        loop.fit()
        metrics = [json.loads(line) for line in (Path(out_dir) / out / "metrics.jsonl").read_text().splitlines()]
        return {"metrics": metrics, "table": algo._ref.clone(), "unused": loop.unused_per_epoch,
                "steps_per_epoch": loop.steps_per_epoch, "state": json.loads(json.dumps(algo.state_dict()))}

    out = {"precompute": fit("precompute", "precompute"), "resident": fit("resident", "resident")}
    fit("resident", "resumed", max_steps=4)  # stops at step 4 with a checkpoint
    out["resumed"] = fit("resident", "resumed")  # the same run again: resumes at step 4
    out["short"] = fit("precompute", "short", max_steps=2)  # ends within epoch 0: its own pairs only
    out["extended"] = fit("precompute", "short")  # the same folder for all its epochs: resumed at step 2
    # a checkpoint as it was written before tables recorded their coverage: every pair's totals
    fit("precompute", "legacy", max_steps=1)
    extra = Path(out_dir) / "legacy" / "checkpoints" / "step_0000001" / "extra.json"
    saved = json.loads(extra.read_text())
    whole = out["precompute"]["state"]["reference_table"]["training"]
    saved["algorithm"]["reference_table"]["training"] = {k: whole[k] for k in ("pairs", "tokens", "abs_logps")}
    extra.write_text(json.dumps(saved))
    out["legacy"] = fit("precompute", "legacy", max_steps=2)  # within epoch 0, but resumes that table: whole
    return out


def _assert_same(a, b):
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key in sorted(set(ra) - set(TIMING) - {"split"}):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key, ra[key], rb[key])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return spawn_local(run_all, 1, str(tmp_path_factory.mktemp("dpo_ref")), timeout=900)[0]


def test_precompute_equals_resident_over_epochs(out):
    pre, res = out["precompute"], out["resident"]
    assert (pre["steps_per_epoch"], pre["unused"]) == (3, 2)
    assert [r["step"] for r in pre["metrics"]] == list(range(1, EPOCHS * 3 + 1))
    _assert_same(pre["metrics"], res["metrics"])
    # every training pair has its reference (token counts > 0), the unused tail included
    assert bool((pre["table"][:PAIRS, 2:] > 0).all())
    assert pre["metrics"][0]["rewards/margins"] == 0.0 and pre["metrics"][-1]["rewards/margins"] > 0.1
    _assert_same(out["resumed"]["metrics"], res["metrics"])


def test_resume_refuses_a_reference_of_other_weights_or_data(out):
    """The checkpoint's algorithm state records what the reference covered; a resume whose
    recomputed reference differs (other initial weights, other data) is refused by name."""
    from aligner.algorithms.dpo import DPOAlgorithm

    state = out["precompute"]["state"]
    table = state["reference_table"]["training"]
    assert state["reference"] == "precompute" and table["pairs"] == PAIRS and table["tokens"] > 0
    assert abs(table["abs_logps"] - float(out["precompute"]["table"][:PAIRS, :2].abs().sum())) < 1e-9

    assert len(table["per_step"]) == 3 and table["tail"][0] > 0  # every step of epoch 0 and its unused tail
    assert sum(v[0] for v in table["per_step"]) + table["tail"][0] == table["tokens"]

    def resumed_with(saved=state, abs_scale=1.0, first_tokens=0, **changes):
        algo = DPOAlgorithm(0)
        mine = json.loads(json.dumps(dict(table, **changes)))
        if "per_step" in mine:
            mine["per_step"] = [[t + (first_tokens if i == 0 else 0), a * abs_scale]
                                for i, (t, a) in enumerate(mine["per_step"])]
        algo._summary = {"training": mine}  # what setup() computed in the new process
        algo.load_state_dict(json.loads(json.dumps(saved)))

    resumed_with()  # the same reference: accepted
    resumed_with(abs_scale=1 + 1e-5)  # layout round-off: accepted
    resumed_with(per_step=table["per_step"][:2], tail=None)  # a run that ends within epoch 0: its steps compared
    with pytest.raises(UserError, match="initial weights .* changed since the run began"):
        resumed_with(abs_scale=1.01)
    with pytest.raises(UserError, match="training data differ from the checkpoint.s run .the rows of step 1: "):
        resumed_with(first_tokens=1)
    with pytest.raises(UserError, match="training data differ from the checkpoint's run .26 pairs then, 27 now"):
        resumed_with(pairs=PAIRS + 1)
    # a checkpoint recorded without its coverage (every pair covered): the totals compared, as then
    old = json.loads(json.dumps(state))
    for key in ("per_step", "tail"):
        del old["reference_table"]["training"][key]
    resumed_with(saved=old)
    with pytest.raises(UserError, match="initial weights .* changed since the run began"):
        resumed_with(saved=old, abs_logps=table["abs_logps"] * 1.01)
    with pytest.raises(UserError, match="training data differ from the checkpoint's run"):
        resumed_with(saved=old, tokens=table["tokens"] + 1)


def test_a_run_within_epoch_0_computes_its_own_pairs_and_is_extended(out):
    """A run of 2 steps (3 per epoch) precomputes the reference of those steps' pairs only,
    equal to the whole table's; the same folder run for all its epochs resumes at step 2 (the
    first 2 steps' pairs compared) and covers every pair."""
    import torch

    short, full, extended = out["short"], out["precompute"], out["extended"]
    covered = short["table"][:PAIRS, 2] > 0
    assert int(covered.sum()) == 2 * GBS
    assert torch.equal(short["table"][:PAIRS][covered], full["table"][:PAIRS][covered])
    table = short["state"]["reference_table"]["training"]
    assert len(table["per_step"]) == 2 and table["tail"] is None and table["pairs"] == PAIRS
    assert table["per_step"] == full["state"]["reference_table"]["training"]["per_step"][:2]
    # step 1 reads only the initial weights and the reference: the same as the whole run's
    _assert_same(short["metrics"][:1], full["metrics"][:1])
    assert [r["step"] for r in extended["metrics"]] == list(range(1, EPOCHS * 3 + 1))
    assert bool((extended["table"][:PAIRS, 2:] > 0).all())  # every pair, the unused tail included
    assert extended["state"]["reference_table"]["training"] == full["state"]["reference_table"]["training"]
    # a checkpoint without the record: the whole table computed again, as it was, and compared whole
    legacy = out["legacy"]
    assert [r["step"] for r in legacy["metrics"]] == [1, 2]
    assert bool((legacy["table"][:PAIRS, 2:] > 0).all())
