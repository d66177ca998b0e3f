"""Token selection (aligner.rollout.sampling) against hand-computed values."""
import math

import pytest
import torch

from aligner.rollout.engine import GenerationConfig, seed_for
from aligner.rollout.sampling import (
    chosen_logprobs,
    filter_logits,
    sample_from_logits,
    select_tokens,
)

NEG_INF = float("-inf")


def _logits_of(probs):
    return torch.tensor([probs]).log()


def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(filter_logits(logits, temperature=0.5), torch.tensor([[4.0, -2.0, 1.0]]))


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 1.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert out[0].tolist() == [NEG_INF, 3.0, NEG_INF, NEG_INF, 2.0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 (in shuffled vocab order)
    logits = _logits_of([0.15, 0.5, 0.05, 0.3])
    # mass above each token (sorted): 0, 0.5, 0.8, 0.95
    kept = lambda p: (filter_logits(logits, top_p=p)[0] > NEG_INF).tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.51) == [False, True, False, True]
    assert kept(0.79) == [False, True, False, True]
    assert kept(0.81) == [True, True, False, True]
    assert kept(1.0) == [True, True, True, True]
    # the most likely token survives any p
    assert kept(0.01) == [False, True, False, False]


def test_inverse_cdf_draw_picks_the_interval_containing_u():
    logits = _logits_of([0.2, 0.3, 0.5])
    draw = lambda u: int(sample_from_logits(logits, torch.tensor([u], dtype=torch.float64)))  # noqa: E731
    assert draw(0.0) == 0
    assert draw(0.19) == 0
    assert draw(0.21) == 1
    assert draw(0.49) == 1
    assert draw(0.51) == 2
    assert draw(0.999999) == 2


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[NEG_INF, 0.0, NEG_INF, NEG_INF, 1.0, NEG_INF]])
    for u in torch.linspace(0, 1 - 1e-12, 101, dtype=torch.float64):
        assert int(sample_from_logits(logits, u[None])) in (1, 4)


def test_chosen_logprobs_is_log_softmax_of_raw_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lp = chosen_logprobs(logits, torch.tensor([2, 1]))
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert lp.tolist() == pytest.approx([3.0 - z, -math.log(3.0)], abs=1e-6)


def test_select_tokens_greedy_and_seeded():
    logits = torch.tensor([[0.0, 0.3, 0.2], [1.0, 0.0, 0.0]])
    assert select_tokens(logits, greedy=True, temperature=1.0, top_k=0, top_p=1.0,
                         generators=None).tolist() == [1, 0]

    def draws(seeds, steps=30):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return [select_tokens(logits, greedy=False, temperature=1.0, top_k=0, top_p=1.0,
                              generators=gens).tolist() for _ in range(steps)]

    assert draws((5, 6)) == draws((5, 6))
    assert draws((5, 6)) != draws((7, 6))
    # a row's draws depend on its own seed only
    assert [d[1] for d in draws((5, 6))] == [d[1] for d in draws((7, 6))]
    # top_k = 1 is greedy whatever the random draw
    for seed in range(20):
        g = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)]
        assert select_tokens(logits, greedy=False, temperature=0.7, top_k=1, top_p=1.0,
                             generators=g).tolist() == [1, 0]


def test_seed_for_is_deterministic_and_distinct():
    assert seed_for(3, 0) == seed_for(3, 0)
    seeds = {seed_for(3, i) for i in range(100)} | {seed_for(4, i) for i in range(100)}
    assert len(seeds) == 200


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_token_ids=["2"]), "stop_token_ids"),
        (dict(stop_strings="END"), "stop_strings"),
        (dict(stop_strings=[""]), "stop_strings"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_generation_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**kwargs)


def test_temperature_zero_means_greedy():
    assert GenerationConfig(temperature=0.0).greedy
    assert not GenerationConfig(temperature=0.5).greedy
