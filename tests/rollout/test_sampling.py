"""Token selection (aligner.rollout.sampling) against hand-computed values."""
import math

import pytest
import torch

from aligner.rollout.engine import GenerationConfig, seed_for
from aligner.rollout.sampling import (
    SlotUniforms,
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


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_slot_uniforms_are_each_samples_one_draw_per_step(block):
    """Uniforms drawn ahead in blocks (SlotUniforms) are the numbers of one scalar draw per
    step from each sample's own generator (the rule before blocks), through samples taking
    freed slots, slots dropped, and blocks running out at different steps; and the tokens
    chosen from them are the same as with the generators drawing step by step."""
    gen = torch.Generator().manual_seed(0)
    slots = SlotUniforms(block, "cpu")
    seeds = [11, 12, 13, 14]
    slots.reset(seeds)
    reference = [torch.Generator().manual_seed(s) for s in seeds]  # one per slot, in slot order
    for step in range(40):
        logits = torch.randn((len(seeds), 9), generator=gen)
        copies = [torch.Generator().set_state(g.get_state()) for g in reference]
        u = slots.draw()
        expected_u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in reference])
        assert torch.equal(u, expected_u)
        tokens = select_tokens(logits, greedy=False, temperature=0.8, top_k=5, top_p=0.9, uniforms=u)
        assert torch.equal(tokens, select_tokens(logits, greedy=False, temperature=0.8, top_k=5, top_p=0.9,
                                                 generators=copies))
        if step % 5 == 2:  # slot 1 gets a new sample
            seeds[1] = 100 + step
            slots.assign(1, seeds[1])
            reference[1] = torch.Generator().manual_seed(seeds[1])
        if step == 17:  # slots 0 and 2 are dropped
            slots.keep(torch.tensor([1, 3]))
            seeds, reference = [seeds[1], seeds[3]], [reference[1], reference[3]]
        if step == 30:  # slot 0 of the two gets a new sample
            seeds[0] = 7
            slots.assign(0, 7)
            reference[0] = torch.Generator().manual_seed(7)


def test_slot_uniforms_tokens_equal_per_step_draws():
    """Tokens from block-drawn uniforms equal those drawn with a generator per row per step."""
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn((3, 50), generator=gen) for _ in range(12)]
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    step_by_step = [select_tokens(x, greedy=False, temperature=1.3, top_k=0, top_p=0.95, generators=gens)
                    for x in logits]
    slots = SlotUniforms(5, "cpu")
    slots.reset([5, 6, 7])
    blocks = [select_tokens(x, greedy=False, temperature=1.3, top_k=0, top_p=0.95, uniforms=slots.draw())
              for x in logits]
    assert [t.tolist() for t in blocks] == [t.tolist() for t in step_by_step]
    assert len({tuple(t.tolist()) for t in blocks}) > 1  # the draws do vary


def test_slot_uniforms_rejects_an_empty_block():
    with pytest.raises(ValueError, match="block = 0"):
        SlotUniforms(0, "cpu")


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
