"""SteerLM 2.0 on the shared loop: the step's loss equals the pure loss on the same
log-probs, a group of identical responses gives zero gradient, the same steps agree at
TP=1, TP=2, PP=2 and DP=2 (1e-5), and pre-scored files load with named errors.

Jobs: one process (the reference weights), one process (TP=1), and one two-process job that
runs TP=2, PP=2 and DP=2 in turn (megatron-core's parallel state re-initialised between them)."""
import json

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.layouts import in_turn

VOCAB, GROUP, GBS, MBS, STEPS, TOL = 64, 4, 4, 2, 3, 1e-5


def _groups(n=10, seed=7, identical=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        items = []
        first = None
        for _ in range(GROUP):
            resp = torch.randint(1, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
            if identical:
                first = resp if first is None else first
                resp = first
            items.append((torch.cat([prompt, resp]), torch.cat([torch.zeros(len(prompt)), torch.ones(len(resp))])))
        out.append({
            "responses": items,
            "log_p_attr": -torch.rand(GROUP, generator=g, dtype=torch.float64) * 3,
            "log_p_sft": -torch.rand(GROUP, generator=g, dtype=torch.float64) * 20,
            "log_q_prime": -torch.rand(GROUP, generator=g, dtype=torch.float64) * 20,
            "index": i,
        })
    return out


def _loop(data, out_dir, lr=1e-2):
    from aligner.algorithms.steerlm import SteerLM2Algorithm
    from aligner.models.gpt import build_model
    from aligner.parallel import get_device, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.test_parallel_equivalence import _model_cfg
    from tests.training.weights import load_reference_weights

    set_seed(5)
    cfg = _model_cfg()
    model = build_model(cfg).to(get_device())
    load_reference_weights([model], cfg, None, 1)
    loop = TrainingLoop(
        SteerLM2Algorithm(0), [model], data,
        optim=OptimSection(lr=lr, clip_grad=0.0, warmup_steps=0, weight_decay=0.0),
        trainer=TrainerSection(max_steps=STEPS, global_batch_size=GBS, micro_batch_size=MBS, out_dir=str(out_dir),
                               export_hf=False, progress=False, tensorboard=False, resume=False, save_interval=0),
    )
    return loop


def run_layout(workdir, weights, tp, pp):
    import os

    os.environ["ALIGNER_TEST_WEIGHTS"] = weights
    initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
    loop = _loop(_groups(), f"{workdir}/s")
    metrics = [loop.train_step() for _ in range(STEPS)]
    out = {"loss": [m["loss"] for m in metrics], "grad_norm": [m["grad_norm"] for m in metrics],
           "kl_w_b": [m["kl_w_b"] for m in metrics]}
    if tp == 1 and pp == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        out["pure"] = _pure_step0(workdir)
        out["identical_grad_norm"] = _identical_grad_norm(workdir)
    return out


def _pure_step0(workdir):
    """Step 0's loss from the loop vs the pure loss on log-probs of a plain forward."""
    from aligner.algorithms.losses.steerlm import steerlm2_loss
    from aligner.models.logprobs import token_logprobs

    data = _groups()
    loop = _loop(data, f"{workdir}/pure")
    batch = loop.global_batch(0)
    logps, counts = [], []
    model = loop.models[0].module
    with torch.no_grad():
        for s in batch:
            for tokens, mask in s["responses"]:
                logits = model(tokens[None], None, None)
                lp = token_logprobs(logits[:, :-1].float(), tokens[None, 1:])[0]
                logps.append(float((lp * mask[1:]).sum()))
                counts.append(float(mask[1:].sum()))
    cat = lambda k: torch.cat([s[k] for s in batch])  # noqa: E731
    t = torch.tensor(logps, dtype=torch.float64)
    loss_sum, tokens, _ = steerlm2_loss(t, torch.tensor(counts), cat("log_p_attr"), cat("log_p_sft"),
                                        cat("log_q_prime"), GROUP)
    got = loop.train_step()["loss"]
    return float(loss_sum / tokens), got


def _identical_grad_norm(workdir):
    # identical responses, scored alike (as they would be): w' and b' are both uniform
    # within each group -> (w' − b') = 0 -> no gradient
    loop = _loop(_groups(identical=True), f"{workdir}/same")
    for s in loop.train_data:
        for key in ("log_p_attr", "log_p_sft", "log_q_prime"):
            s[key] = torch.full((GROUP,), -5.0, dtype=torch.float64)
    return loop.train_step()["grad_norm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.training.weights import make_reference_weights

    w = tmp_path_factory.mktemp("steerlm2")
    weights = str(w / "weights")
    spawn_local(make_reference_weights, 1, weights, timeout=300)
    one = spawn_local(run_layout, 1, str(w / "tp1"), weights, 1, 1, timeout=400)
    # one two-process job for the three layouts of two ranks
    two = spawn_local(in_turn, 2, run_layout, [(tag, f"{w}/{tag}", weights, tp, pp)
                                              for tag, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1))],
                      timeout=900)
    return {"tp1": one, **{tag: [rank[tag] for rank in two] for tag in ("tp2", "pp2", "dp2")}}


def test_loop_loss_equals_pure_loss(runs):
    want, got = runs["tp1"][0]["pure"]
    assert abs(want - got) < 1e-5, (want, got)


def test_identical_group_gives_zero_gradient(runs):
    assert runs["tp1"][0]["identical_grad_norm"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_steps_agree_across_layouts(runs, layout):
    ref = runs["tp1"][0]
    assert ref["loss"][0] != ref["loss"][-1], "the steps must move the model"
    for rank_out in runs[layout]:
        for key in ("loss", "grad_norm", "kl_w_b"):
            torch.testing.assert_close(torch.tensor(rank_out[key]), torch.tensor(ref[key]), atol=TOL, rtol=0)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(**over):
    row = {
        "system": "", "label": "helpfulness:4,correctness:4",
        "prompt_turns": [{"from": "User", "value": "add 2 and 3"}],
        "responses": [{"value": "5", "log(P(a|x,y))": -0.1, "log(P(y|x))": -3.0, "log(Q(y|a,x))": -2.5},
                      {"value": "6", "log(P(a|x,y))": -2.0, "log(P(y|x))": -4.0, "log(Q(y|a,x))": -3.5}],
    }
    row.update(over)
    return row


def test_prescored_rows_load_and_errors_name_line_and_field(tmp_path):
    from aligner.algorithms.steerlm import load_steerlm2
    from aligner.data.datasets import DataFormatError
    from aligner.data.datasets import DEFAULT_SYSTEM
    from aligner.data.tokenizer import load_tokenizer, train_sentencepiece

    texts = [DEFAULT_SYSTEM, "add 2 and 3", "helpfulness:4,correctness:4", "5 6 User Assistant System"] * 20
    tok = load_tokenizer(train_sentencepiece(texts, tmp_path / "tok" / "tokenizer.model", vocab_size=300))
    good = tmp_path / "good.jsonl"
    _write(good, [_row(), _row()])
    samples = load_steerlm2(good, tok)
    assert len(samples) == 2 and len(samples[0]["responses"]) == 2
    assert samples[0]["log_q_prime"].tolist() == [-2.5, -3.5]
    tokens, mask = samples[0]["responses"][0]
    text = tok.decode(tokens.tolist())
    assert "<extra_id_2>helpfulness:4,correctness:4" in text
    assert tok.decode(tokens[mask.bool()].tolist()).startswith("5")
    bad = _row()
    bad["responses"][1]["log(Q(y|a,x))"] = "x"
    _write(tmp_path / "bad.jsonl", [_row(), bad])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: responses\[1\] field 'log\(Q\(y\|a,x\)\)'"):
        load_steerlm2(tmp_path / "bad.jsonl", tok)
    _write(tmp_path / "one.jsonl", [_row(responses=_row()["responses"][:1])])
    with pytest.raises(DataFormatError, match="one.jsonl:1: field 'responses' must be a list of at least 2"):
        load_steerlm2(tmp_path / "one.jsonl", tok)
