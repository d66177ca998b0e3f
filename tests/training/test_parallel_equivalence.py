"""The shared loop gives the same training curve under every layout.

Reward-model regression and BT, DPO, the reference-free ORPO (with its SFT term) and
SimPO, and KTO (on rows of one or two labelled responses; its reference point over the
global batch, precomputed and resident reference), 5 steps each on the same data and global batch at TP=1, TP=2, PP=2 and DP=2 (fp32):
losses agree within 1e-5. DPO also with packing, and its implicit rewards are exactly 0 at
step 0 (policy and reference log-probs identical); ORPO and SimPO make no reference pass.

Jobs: one process (TP=1), and one two-process job that runs TP=2, PP=2 and DP=2 in turn
(megatron-core's parallel state re-initialised between them).
"""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.layouts import in_turn

STEPS, GBS, MBS, TOL = 5, 8, 2, 1e-5
VOCAB = 64


def _model_cfg():
    from aligner.models.config import ModelConfig

    return ModelConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, max_position_embeddings=64, make_vocab_size_divisible_by=16, pad_token_id=0,
    )


def _samples(kind, n=24, seed=3):
    g = torch.Generator().manual_seed(seed)

    def seq(lo=6, hi=20):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)

    out = []
    for i in range(n):
        if kind == "unpaired":  # KTO: even rows a pair split in two, odd rows one labelled response
            pair = _samples("pairs", n, seed)[i]
            rows = [(pair["chosen"], pair["chosen_loss_mask"]), (pair["rejected"], pair["rejected_loss_mask"])]
            labels = [True, False]
            if i % 2:
                rows, labels = rows[i % 4 // 2:][:1], [i % 4 == 1]
            out.append({"responses": rows, "labels": torch.tensor(labels), "index": i})
        elif kind == "regression":
            labels = torch.randint(0, 5, (3,), generator=g).float()
            mask = (torch.rand(3, generator=g) > 0.3).float()
            out.append({"tokens": seq(), "labels": labels, "label_mask": mask, "index": i})
        else:
            prompt = seq(3, 8)
            c, r = seq(2, 10), seq(2, 10)
            chosen, rejected = torch.cat([prompt, c]), torch.cat([prompt, r])
            cm = torch.cat([torch.zeros(len(prompt)), torch.ones(len(c))])
            rm = torch.cat([torch.zeros(len(prompt)), torch.ones(len(r))])
            out.append({
                "chosen": chosen, "chosen_loss_mask": cm, "rejected": rejected, "rejected_loss_mask": rm,
                "strength": float(torch.randint(1, 4, (1,), generator=g)), "index": i,
            })
    return out


def _train(algo, out_dir, steps=STEPS):
    from aligner.models.gpt import build_model
    from aligner.parallel import get_device, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    set_seed(5)
    cfg = _model_cfg()
    model = build_model(cfg, head=algo.head, num_outputs=algo.num_outputs).to(get_device())
    from tests.training.weights import load_reference_weights

    load_reference_weights([model], cfg, algo.head, algo.num_outputs)
    data = _samples("regression" if getattr(algo, "mode", "") == "regression" else
                    "unpaired" if algo.name == "kto" else "pairs")
    trainer = TrainingLoop(
        algo, [model], data,
        optim=OptimSection(lr=1e-2, clip_grad=1.0, warmup_steps=1),
        trainer=TrainerSection(
            max_steps=steps, global_batch_size=GBS, micro_batch_size=MBS, out_dir=str(out_dir),
            export_hf=False, progress=False, tensorboard=False, resume=False, save_interval=0,
        ),
    )
    trainer.save = lambda: None  # no checkpoint needed for the curve
    losses, kl, first = [], [], None
    trainer.algorithm.setup(trainer)
    trainer.algorithm.setup = lambda t: None
    for _ in range(steps):
        m = trainer.train_step()
        first = first or m
        losses.append(m["loss"])
        kl.append(m.get("kl", 0.0))
    return {"losses": losses, "first": first, "kl": kl}


def run_layout(workdir, weights, tp, pp):
    import os

    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.algorithms.kto import KTOAlgorithm
    from aligner.algorithms.reward import RewardAlgorithm

    os.environ["ALIGNER_TEST_WEIGHTS"] = weights

    initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
    out = {}
    out["regression"] = _train(RewardAlgorithm(0, mode="regression", attributes=["a", "b", "c"]), f"{workdir}/r")
    out["bt"] = _train(RewardAlgorithm(0, mode="bt", bt_kind="scaled", attributes=["a"]), f"{workdir}/b")
    out["dpo"] = _train(DPOAlgorithm(0, beta=0.5), f"{workdir}/d")
    for kind, options in (("orpo", {"beta": 0.5, "sft_weight": 1.0}), ("simpo", {"beta": 2.0, "gamma": 0.5})):
        algo = DPOAlgorithm(0, loss_type=kind, **options)
        out[kind] = _train(algo, f"{workdir}/{kind}")
        out[kind]["reference_table"] = algo._ref is not None
    for reference in ("precompute", "resident"):
        # λ_D = 3: desirable-led updates raise the mismatched log-probs, so z_ref > 0 at step 3; the SFT
        # term (kto.sft_weight) divides by the step's desirable responses, which the DP ranks share unevenly
        algo = KTOAlgorithm(0, beta=0.5, desirable_weight=3.0, sft_weight=0.5, reference=reference)
        out[f"kto_{reference}"] = _train(algo, f"{workdir}/kto_{reference}")
    if tp == 1 and pp == 1:
        out["dpo_packed"] = _train(DPOAlgorithm(0, beta=0.5, packing=True, capacity=48), f"{workdir}/p")
        out["bt_packed"] = _train(
            RewardAlgorithm(0, mode="bt", bt_kind="scaled", attributes=["a"], packing=True, capacity=48), f"{workdir}/q"
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    w = tmp_path_factory.mktemp("equiv")
    from tests.training.weights import make_reference_weights

    weights = str(w / "weights")
    spawn_local(make_reference_weights, 1, weights, timeout=300)
    one = spawn_local(run_layout, 1, str(w / "tp1"), weights, 1, 1, timeout=400)
    # one two-process job for the three layouts of two ranks
    two = spawn_local(in_turn, 2, run_layout, [(tag, f"{w}/{tag}", weights, tp, pp)
                                              for tag, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1))],
                      timeout=900)
    return {"tp1": one, **{tag: [rank[tag] for rank in two] for tag in ("tp2", "pp2", "dp2")}}


@pytest.mark.parametrize("algo", ["regression", "bt", "dpo", "orpo", "simpo", "kto_precompute", "kto_resident"])
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_losses_agree_across_layouts(runs, algo, layout):
    ref = runs["tp1"][0][algo]["losses"]
    assert len(ref) == STEPS and all(l == l for l in ref)
    assert ref[-1] < ref[0], "the curve must move (learning rate 1e-2)"
    for rank_out in runs[layout]:
        torch.testing.assert_close(torch.tensor(rank_out[algo]["losses"]), torch.tensor(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("algo", ["dpo", "bt"])
def test_packing_gives_the_same_curve(runs, algo):
    ref = runs["tp1"][0][algo]["losses"]
    packed = runs["tp1"][0][f"{algo}_packed"]["losses"]
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "dp2"])
def test_dpo_step0_policy_equals_reference(runs, layout):
    import math

    for rank_out in runs[layout]:
        first = rank_out["dpo"]["first"]
        assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
        assert abs(first["loss"] - math.log(2)) < 1e-6  # fp32: -logσ(0) = 0.69314718(2)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "dp2"])
def test_reference_free_losses_keep_no_reference(runs, layout):
    for rank_out in runs[layout]:
        for kind in ("orpo", "simpo"):
            assert rank_out[kind]["reference_table"] is False, (layout, kind)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "dp2"])
def test_kto_reference_modes_agree_and_the_reference_point_moves(runs, layout):
    ref = runs["tp1"][0]["kto_precompute"]
    for rank_out in runs[layout]:
        torch.testing.assert_close(torch.tensor(rank_out["kto_resident"]["losses"]), torch.tensor(ref["losses"]),
                                   atol=TOL, rtol=0)
        first = rank_out["kto_precompute"]["first"]
        assert first["kl"] == 0.0 and first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    kl = runs["tp1"][0]["kto_precompute"]["kl"]
    assert max(kl) > 1e-3, kl  # z_ref > 0 at some step: the layouts agree on a live reference point
    for rank_out in runs[layout]:
        torch.testing.assert_close(torch.tensor(rank_out["kto_precompute"]["kl"]), torch.tensor(kl), atol=TOL, rtol=0)
