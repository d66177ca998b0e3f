"""aligner.algorithms.losses.distill: forward / reverse KL and the generalised JSD against
hand-computed values on a ragged batch (worked in the comments), the top-k variant, and
TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``): value and gradient."""
import math

import pytest
import torch

from aligner.algorithms.losses import distill as D
from tests.algorithms.losses.values import close

LN2, LN3 = math.log(2), math.log(3)


def logits_of(*probs):
    """Logits whose softmax is ``probs`` (log p, plus an arbitrary shift per row)."""
    return torch.tensor([[math.log(p) + 0.7 for p in row] for row in probs], dtype=torch.float64)


# a ragged batch of 2 rows x 2 positions over 3 tokens; row 1's second position is padding
S_A, T_A = (1 / 2, 1 / 4, 1 / 4), (1 / 4, 1 / 2, 1 / 4)
S_B, T_B = (1 / 2, 1 / 4, 1 / 4), (1 / 8, 1 / 8, 3 / 4)
STUDENT = torch.stack([logits_of(S_A, S_B), logits_of(S_B, (0.9, 0.05, 0.05))])
TEACHER = torch.stack([logits_of(T_A, T_B), logits_of(T_B, (0.01, 0.01, 0.98))])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])

# KL(t‖s) at A = ¼ln(½) + ½ln2 = ¼ln2; at B = ⅛ln¼ + ⅛ln½ + ¾ln3 = −⅜ln2 + ¾ln3
FWD = {"A": 0.25 * LN2, "B": -0.375 * LN2 + 0.75 * LN3}
# KL(s‖t) at A = ½ln2 + ¼ln½ = ¼ln2; at B = ½ln4 + ¼ln2 + ¼ln⅓ = 1.25ln2 − ¼ln3
REV = {"A": 0.25 * LN2, "B": 1.25 * LN2 - 0.25 * LN3}
# JSD β=½ at A: m = (⅜, ⅜, ¼); KL(t‖m) = KL(s‖m) = ¼ln(⅔) + ½ln(4/3)
JSD_A = 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
# at B: m = (5/16, 3/16, ½); KL(t‖m) = ⅛ln(⅖) + ⅛ln(⅔) + ¾ln(3/2), KL(s‖m) = ½ln(8/5) + ¼ln(4/3) + ¼ln(½)
JSD_B = 0.5 * (0.125 * math.log(2 / 5) + 0.125 * math.log(2 / 3) + 0.75 * math.log(1.5)) \
    + 0.5 * (0.5 * math.log(8 / 5) + 0.25 * math.log(4 / 3) + 0.25 * math.log(0.5))


@pytest.mark.parametrize("kind, per_position", [("forward_kl", FWD), ("reverse_kl", REV),
                                                ("jsd", {"A": JSD_A, "B": JSD_B})])
def test_full_vocabulary_divergences_by_hand(kind, per_position):
    div = D.token_divergence(STUDENT, TEACHER, kind, beta=0.5)
    close(div[0, 0], per_position["A"], 1e-12)
    close(div[0, 1], per_position["B"], 1e-12)
    close(div[1, 0], per_position["B"], 1e-12)
    total, count, parts = D.distill_loss(div, MASK)
    assert float(count) == 3.0  # the padded position does not count
    close(total / count, (per_position["A"] + 2 * per_position["B"]) / 3, 1e-12)
    close(parts["kd"], total, 1e-12)


def test_jsd_ends_are_the_two_kls_and_temperature_scales_the_logits():
    close(D.token_divergence(STUDENT, TEACHER, "jsd", beta=0.0)[0, 1], FWD["B"], 1e-12)
    close(D.token_divergence(STUDENT, TEACHER, "jsd", beta=1.0)[0, 1], REV["B"], 1e-12)
    # T = 2 is the divergence of the distributions of logits / 2: s ∝ √s, t ∝ √t
    root = lambda p: [math.sqrt(x) / sum(math.sqrt(y) for y in p) for x in p]  # noqa: E731
    s2, t2 = root(S_B), root(T_B)
    want = sum(b * math.log(b / a) for a, b in zip(s2, t2))
    close(D.token_divergence(STUDENT, TEACHER, "forward_kl", temperature=2.0)[0, 1], want, 1e-12)
    with pytest.raises(ValueError, match="one vocabulary"):
        D.token_divergence(STUDENT, TEACHER[..., :2], "forward_kl")


def test_sft_term_is_weighted_in():
    div = D.token_divergence(STUDENT, TEACHER, "forward_kl")
    nll = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64)  # 100 sits on padding
    total, count, parts = D.distill_loss(div, MASK, nll, kd_weight=0.5, sft_weight=2.0)
    close(parts["sft"], 6.0, 1e-12)
    close(total, 0.5 * (FWD["A"] + 2 * FWD["B"]) + 2.0 * 6.0, 1e-12)


def test_topk_divergences_by_hand():
    # student over 4 tokens (½, ¼, ⅛, ⅛); teacher's top-2: ids [1, 0], logits [ln3, 0] -> t = (¾, ¼);
    # the student renormalised over ids [1, 0]: (¼, ½) / ¾ = (⅓, ⅔)
    student = torch.log(torch.tensor([[[0.5, 0.25, 0.125, 0.125]] * 2], dtype=torch.float64))
    topk_logits = torch.tensor([[[LN3, 0.0]] * 2], dtype=torch.float64)
    topk_ids = torch.tensor([[[1, 0]] * 2])
    fwd = D.topk_token_divergence(student, topk_logits, topk_ids, "forward_kl")
    close(fwd[0, 0], 0.75 * math.log(9 / 4) + 0.25 * math.log(3 / 8), 1e-12)  # ¾ln(¾/⅓) + ¼ln(¼/⅔)
    rev = D.topk_token_divergence(student, topk_logits, topk_ids, "reverse_kl")
    close(rev[0, 1], math.log(4 / 9) / 3 + 2 * math.log(8 / 3) / 3, 1e-12)  # ⅓ln(⅓/¾) + ⅔ln(⅔/¼)
    # where the student agrees with the teacher on the k tokens (whatever it puts elsewhere): 0
    agree = torch.log(torch.tensor([[[0.15, 0.45, 0.3, 0.1]]], dtype=torch.float64))
    close(D.topk_token_divergence(agree, topk_logits[:, :1], topk_ids[:, :1], "jsd", beta=0.4)[0, 0], 0.0, 1e-12)
    # the teacher's own top-k, taken from full logits: ids by descending logit
    values, ids = D.shard_topk(torch.tensor([[[0.1, 2.0, -1.0, 3.0]]]), 2)
    assert ids.tolist() == [[[3, 1]]] and values.tolist() == [[[3.0, 2.0]]]
    # k = vocabulary: the top-k divergence is the full one
    full = D.token_divergence(STUDENT, TEACHER, "jsd", beta=0.3)
    v, i = D.shard_topk(TEACHER, 3)
    close((D.topk_token_divergence(STUDENT, v, i, "jsd", beta=0.3) - full).abs().max(), 0.0, 1e-12)


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 1.0), (0.9, 2.0), (1.0, 0.7)])
def test_matches_trl_generalized_jsd_loss_value_and_gradient(beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[2, 3:] = -100  # padding: a ragged batch
    kind = "jsd"
    ours_in = student.clone().requires_grad_()
    total, count, _ = D.distill_loss(D.token_divergence(ours_in, teacher, kind, beta=beta, temperature=temperature),
                                     (labels != -100).double())
    (total / count).backward()
    trl_in = student.clone().requires_grad_()
    want = GKDTrainer.generalized_jsd_loss(trl_in, teacher, labels=labels, beta=beta, temperature=temperature)
    want.backward()
    close(total / count, want.detach(), 1e-12)
    close((ours_in.grad - trl_in.grad).abs().max(), 0.0, 1e-12)
    assert float(trl_in.grad.norm()) > 1e-3


# the teacher's top-2 with a tail bucket, on a ragged batch of 2 rows x 2 positions over 4 tokens; the
# teacher t = (¼, ½, ⅛, ⅛) everywhere: top-2 ids [1, 0], logits ln ½ and ln ¼ (+0.3), tail ¼
TAIL_TEACHER = (0.25, 0.5, 0.125, 0.125)
TAIL_STUDENTS = {
    "A": (0.5, 0.25, 0.125, 0.125),  # on (id 1, id 0, tail): (¼, ½, ¼) against the teacher's (½, ¼, ¼)
    "B": (0.05, 0.05, 0.45, 0.45),  # mass moved off the teacher's tokens: (0.05, 0.05, 0.9)
    "C": (0.25, 0.5, 0.2, 0.05),  # the teacher's k + 1 outcomes, its tail shared otherwise: 0
}
# KL(s‖t) at A = ¼ln(¼/½) + ½ln(½/¼) + ¼ln1 = ¼ln2; at B = 0.05ln(0.05/½) + 0.05ln(0.05/¼) + 0.9ln(0.9/¼)
TAIL_REV = {"A": 0.25 * LN2, "B": 0.05 * math.log(0.1) + 0.05 * math.log(0.2) + 0.9 * math.log(3.6), "C": 0.0}
# KL(t‖s) at A = ½ln(½/¼) + ¼ln(¼/½) = ¼ln2; at B = ½ln(½/0.05) + ¼ln(¼/0.05) + ¼ln(¼/0.9)
TAIL_FWD = {"A": 0.25 * LN2, "B": 0.5 * math.log(10) + 0.25 * math.log(5) + 0.25 * math.log(0.25 / 0.9), "C": 0.0}
# without the bucket, B is renormalised to (½, ½) against (⅔, ⅓): KL(s‖t) = ½ln(¾) + ½ln(3/2) = ½ln(9/8)
RENORMALISED_REV_B = 0.5 * math.log(9 / 8)


def tail_batch():
    """Student logits for positions (A, B) and (C, padding); the padding position carries what the
    precomputed table fills there: ids [0, 0] (a duplicate), logits 0 and a tail of log ½."""
    student = torch.stack([logits_of(TAIL_STUDENTS["A"], TAIL_STUDENTS["B"]),
                           logits_of(TAIL_STUDENTS["C"], (0.7, 0.1, 0.1, 0.1))])
    topk_logits = torch.tensor([math.log(0.5) + 0.3, math.log(0.25) + 0.3], dtype=torch.float64).expand(2, 2, 2).clone()
    topk_ids = torch.tensor([1, 0]).expand(2, 2, 2).clone()
    tail = torch.full((2, 2), math.log(0.25), dtype=torch.float64)
    topk_logits[1, 1], topk_ids[1, 1], tail[1, 1] = 0.0, 0, math.log(0.5)
    return student, topk_logits, topk_ids, tail


@pytest.mark.parametrize("kind, per_position", [("reverse_kl", TAIL_REV), ("forward_kl", TAIL_FWD)])
def test_topk_tail_bucket_by_hand_on_a_ragged_batch(kind, per_position):
    student, topk_logits, topk_ids, tail = tail_batch()
    leaf = student.clone().requires_grad_()
    div = D.topk_token_divergence(leaf, topk_logits, topk_ids, kind, teacher_tail=tail)
    close(div[0, 0], per_position["A"], 1e-12)
    close(div[0, 1], per_position["B"], 1e-12)
    close(div[1, 0], per_position["C"], 1e-12)
    total, count, _ = D.distill_loss(div, MASK)
    assert float(count) == 3.0
    close(total / count, (per_position["A"] + per_position["B"] + per_position["C"]) / 3, 1e-12)
    (total / count).backward()
    assert bool(torch.isfinite(leaf.grad).all()) and float(leaf.grad[1, 1].abs().max()) == 0.0  # padding: no gradient
    assert float(leaf.grad[0, 1].abs().max()) > 1e-3
    # the student's tail mass, from the tokens outside the ids: ⅛ + ⅛ at A, 0.9 at B, 0.25 at C
    close(D.topk_tail_logmass(student, topk_ids)[0, 0], math.log(0.25), 1e-12)
    close(D.topk_tail_logmass(student, topk_ids)[0, 1], math.log(0.9), 1e-12)
    # the teacher's tail from its own full logits: ¼
    teacher = logits_of(TAIL_TEACHER, TAIL_TEACHER).unsqueeze(0)
    close(D.topk_tail_logmass(teacher, D.shard_topk(teacher, 2)[1])[0, 0], math.log(0.25), 1e-12)


def test_topk_tail_bucket_penalises_mass_moved_off_the_teachers_tokens():
    student, topk_logits, topk_ids, tail = tail_batch()
    renormalised = D.topk_token_divergence(student, topk_logits, topk_ids, "reverse_kl")
    close(renormalised[0, 1], RENORMALISED_REV_B, 1e-12)  # 0.059: the drift to tokens 2, 3 barely counts
    bucket = D.topk_token_divergence(student, topk_logits, topk_ids, "reverse_kl", teacher_tail=tail)
    assert float(bucket[0, 1]) > 10 * RENORMALISED_REV_B  # 0.97 with the bucket


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_tail_bucket_over_the_whole_vocabulary_is_the_full_divergence(kind):
    # k = the vocabulary: the tails underflow (no mass outside) and the k + 1 outcomes are the full divergence
    v, i = D.shard_topk(TEACHER, 3)
    tail = D.topk_tail_logmass(TEACHER, i, temperature=2.0)
    assert float(tail.max()) < -700  # the smallest normal float64, logged
    full = D.token_divergence(STUDENT, TEACHER, kind, beta=0.3, temperature=2.0)
    got = D.topk_token_divergence(STUDENT, v, i, kind, beta=0.3, temperature=2.0, teacher_tail=tail)
    close((got - full).abs().max(), 0.0, 1e-12)
