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

    def resumed_with(**changes):
        algo = DPOAlgorithm(0)
        algo._summary = {"training": dict(table, **changes)}  # what setup() computed in the new process
        algo.load_state_dict(json.loads(json.dumps(state)))

    resumed_with()  # the same reference: accepted
    resumed_with(abs_logps=table["abs_logps"] * (1 + 1e-5))  # layout round-off: accepted
    with pytest.raises(ValueError, match="initial weights .* changed since the run began"):
        resumed_with(abs_logps=table["abs_logps"] * 1.01)
    with pytest.raises(ValueError, match="training data differ from the checkpoint's run"):
        resumed_with(tokens=table["tokens"] + 1)
