"""PPO on the online core, one process: step 0 consistency, reward sources and their errors,
over-long prompts, roles (offload, critic from the reward model); the critic's clipped value
loss by hand, and its gradient. The shared losses by hand: tests/algorithms/losses/."""
import math
import random

import pytest
import torch

from tests.algorithms.losses.values import close, t
from tests.algorithms.ppo_setup import make_assets, make_tokenizer, ppo_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ppo_assets"))


def _fit(cfg):
    from aligner.algorithms.ppo import PPOTrainer

    trainer = PPOTrainer(cfg)
    result = trainer.fit()
    return trainer, result


# ---------------------------------------------------------------------------- the critic's loss
def test_ppo_value_loss():
    from aligner.algorithms.ppo import ppo_value_loss

    values = t([[1.0, 2.0, 9.0]]).requires_grad_()
    old = t([[0.5, 2.0, 0.0]])
    returns = t([[2.0, 1.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V_c = 0.5 + clip(0.5) = 0.7; max((0.7 − 2)², (1 − 2)²) = max(1.69, 1) = 1.69 (clipped)
    # token 2: V_c = 2; max(1, 1) = 1.   L = 0.5 · (1.69 + 1) / 2 = 0.6725
    close(loss, 0.6725)
    close(stats["clipfrac"], 0.5)
    loss.backward()
    # token 1 uses the clipped branch (no gradient: V − V_old is beyond c); token 2: 0.5·2(V − R)/2 = 0.5
    torch.testing.assert_close(values.grad, t([[0.0, 0.5, 0.0]]))


def test_gradcheck_value_loss():
    from aligner.algorithms.ppo import ppo_value_loss

    values = t([[1.0, 2.0, 0.3, 0.0], [0.5, -1.0, 2.0, 1.0]]).requires_grad_()
    old_v = t([[0.5, 2.1, 0.0, 0.0], [0.45, -0.5, 2.0, 1.1]])
    returns = t([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.5]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old_v, returns, mask)[0], (values,))


# ---------------------------------------------------------------------------- rewards
def _batch(n=3, step=4):
    from aligner.rewards import RewardBatch

    return RewardBatch(prompts=["say hi"] * n, responses=["hi", "hello there", "bye"][:n],
                       metadata=[{"target": "hi"}] * n, step=step, sample_indices=[40, 41, 42][:n])


def raising(prompts, responses, metadata):
    raise KeyError("target")


def short(prompts, responses, metadata):
    return [1.0] * (len(responses) - 1)


def non_finite(prompts, responses, metadata):
    return [float("nan") if i == 1 else 0.0 for i in range(len(responses))]


def per_attribute(prompts, responses, metadata):
    return [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]][: len(responses)]


def test_reward_function_errors_name_function_step_and_sample():
    from aligner.rewards import FunctionReward, RewardError

    with pytest.raises(RewardError, match=r"tests.algorithms.test_ppo:raising raised at step 4.*KeyError"):
        FunctionReward("tests.algorithms.test_ppo:raising").score(_batch())
    with pytest.raises(RewardError, match=r"test_ppo:short, step 4: returned \(2,\) scores for 3 responses"):
        FunctionReward("tests.algorithms.test_ppo:short").score(_batch())
    with pytest.raises(RewardError, match=r"test_ppo:non_finite, step 4, sample 41 \(position 1 of 3\).*not finite"):
        FunctionReward("tests.algorithms.test_ppo:non_finite").score(_batch())
    with pytest.raises(ValueError, match="has no 'nope'"):
        FunctionReward("tests.algorithms.test_ppo:nope")
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        FunctionReward("tests.algorithms.test_ppo")
    rewards, attrs = FunctionReward("tests.algorithms.test_ppo:per_attribute", attributes=["a", "b"],
                                    attribute_weights=[0.5, -1.0]).score(_batch())
    assert rewards.tolist() == [-1.5, -2.5, -3.5] and attrs.shape == (3, 2)


def test_world_scorer_is_the_ground_truth():
    from aligner.data.world import score_response
    from aligner.rewards import RewardBatch, WorldScorer

    meta = {"family": "add", "answer": "12", "args": [5, 7]}
    texts = ["The answer is 12.", "The answer is 13.", "no idea"]
    batch = RewardBatch(["q"] * 3, texts, [meta] * 3, step=0, sample_indices=[0, 1, 2])
    rewards, attrs = WorldScorer().score(batch)
    assert rewards.tolist() == [float(score_response(meta, t)["helpfulness"]) for t in texts]
    assert attrs.shape == (3, 5)


# ---------------------------------------------------------------------------- the step
def test_step0_rollout_and_training_logprobs_agree(assets, tmp_path):
    _, result = _fit(ppo_config(assets, str(tmp_path / "run"), trainer={"max_steps": 1}))
    m = result["train"]
    # rollout engine vs the training path on the same tokens (fp32)
    assert m["logprob_mismatch"] < 1e-5 and m["logprob_mismatch/max_abs"] < 1e-5
    # one update on the whole buffer: the ratio is exactly the step-0 ratio
    assert abs(m["policy/ratio"] - 1.0) < 1e-6 and m["policy/clipfrac"] == 0.0 and m["policy/approx_kl"] < 1e-10
    assert m["kl_ref"] == 0.0 and m["kl_penalty"] == 0.0  # the reference is the policy at step 0
    assert m["updates"] == 1.0 and math.isfinite(m["grad_norm/policy"]) and math.isfinite(m["grad_norm/critic"])
    for phase in ("generation", "scoring", "logprob_passes", "updates"):
        assert 0.0 < m[f"time/{phase}_share"] < 1.0


def test_over_long_prompt_is_an_error_naming_the_row(assets, tmp_path):
    import json

    path = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in open(assets["prompts"])][:10]
    rows[6]["prompt"] = "say " + " ".join(["hello"] * 80)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ppo_config(assets, str(tmp_path / "run"), data={"train": str(path)})
    from aligner.config import ConfigError

    # one line (a ConfigError), before any model is built
    with pytest.raises(ConfigError, match=r"prompts.jsonl:7: the row has a prompt of \d+ tokens; prompt \+ response must"
                                          r" fit the model's max_position_embeddings = 64 tokens$"):
        _fit(cfg)


def test_crashing_reward_function_fails_the_step(assets, tmp_path):
    from aligner.rewards import RewardError

    cfg = ppo_config(assets, str(tmp_path / "run"),
                     ppo={"reward": {"function": "tests.algorithms.test_ppo:non_finite"}})
    with pytest.raises(RewardError, match=r"test_ppo:non_finite, step 0, sample 1 \(position 1 of 8\).*not finite"):
        _fit(cfg)


def test_reward_model_with_another_tokenizer_scores_the_text(assets, tmp_path):
    """The reward model's folder has its own tokenizer (same words, other ids): the
    response text is rendered and tokenised with it; checked against transformers scoring
    the same text tokenised by that tokenizer."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from aligner.data import load_tokenizer
    from aligner.parallel import ParallelConfig, initialize
    from aligner.rewards import RewardBatch, RewardModel

    initialize(ParallelConfig(seed=1))
    rm_dir = tmp_path / "rm_other_tok"
    rm_dir.mkdir()
    for f in ("config.json", "model.safetensors"):
        (rm_dir / f).write_bytes((__import__("pathlib").Path(assets["rm"]) / f).read_bytes())
    make_tokenizer(rm_dir, seed=3)
    policy_tok = load_tokenizer(assets["tokenizer"])
    prompts = ["say hello friend", "say good"]
    responses = ["hello friend good", "good good bye"]
    weights = [1.0, -0.5, 2.0]
    source = RewardModel(str(rm_dir), policy_tok, attributes=["a", "b", "c"], attribute_weights=weights)
    batch = RewardBatch(prompts, responses, [{"system": "be nice"}] * 2, step=0, sample_indices=[0, 1])
    rewards, attrs = source.score(batch)

    other = AutoTokenizer.from_pretrained(str(rm_dir))
    hf = LlamaForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    for i, (p, r) in enumerate(zip(prompts, responses)):
        text = (f"<extra_id_0>System\nbe nice\n<extra_id_1>User\n{p}\n<extra_id_1>Assistant\n{r}\n<extra_id_2>")
        ids = other(text, add_special_tokens=False)["input_ids"]
        assert ids != policy_tok.encode(text), "the two tokenizers must disagree for this test to mean anything"
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].double()
        torch.testing.assert_close(attrs[i], ref, atol=1e-5, rtol=0)
        assert abs(float(rewards[i]) - float(ref @ torch.tensor(weights, dtype=torch.float64))) < 1e-5


def test_critic_from_reward_model_starts_at_the_reward(assets, tmp_path):
    """critic_init = reward: the critic's value head is the reward's combination of the
    reward model's attribute outputs, so its first value at the last token is the reward."""
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.parallel import ParallelConfig, initialize
    from aligner.rewards import RewardBatch

    initialize(ParallelConfig(seed=1))
    cfg = ppo_config(assets, str(tmp_path / "run"), ppo={
        "critic_init": "reward",
        "reward": {"kind": "model", "path": assets["rm"], "attributes": ["a", "b", "c"],
                   "attribute_weights": [0.5, 1.0, -1.0]}})
    trainer = PPOTrainer(cfg)
    trainer.init_parallel()
    roles, algo = trainer.build_roles(trainer.build_models(), 48)
    reward = algo.maker.reward
    batch = RewardBatch(["say hi"], ["hello friend"], [{"system": "be nice"}], step=0, sample_indices=[0])
    expected, _ = reward.score(batch)
    tokens = reward.render(batch, 0)
    critic = roles["critic"]
    with torch.no_grad():
        values = critic.modules[0](tokens[None], None, None)
    assert abs(float(values[0, -1, 0]) - float(expected[0])) < 1e-5


def test_offload_moves_weights_out_and_back(assets, tmp_path):
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(seed=1))
    trainer = PPOTrainer(ppo_config(assets, str(tmp_path / "run")))
    trainer.init_parallel()
    roles, _ = trainer.build_roles(trainer.build_models(), 48)
    critic = roles["critic"]
    before = [p.detach().clone() for p in critic.modules[0].parameters()]
    critic.offload()
    assert critic.offloaded and all(p.numel() == 0 for p in critic.modules[0].parameters())
    critic.onload()
    assert not critic.offloaded
    for a, b in zip(before, critic.modules[0].parameters()):
        assert torch.equal(a, b)


def test_offloading_run_equals_a_resident_run(assets, tmp_path):
    a = _fit(ppo_config(assets, str(tmp_path / "a"), trainer={"max_steps": 2}))[1]["train"]
    b = _fit(ppo_config(assets, str(tmp_path / "b"), trainer={"max_steps": 2}, ppo={"offload": True}))[1]["train"]
    for key in ("reward/mean", "loss/policy", "loss/value", "grad_norm/policy", "grad_norm/critic", "kl_ref"):
        assert a[key] == b[key], key


del random


def _tiny_experience():
    from aligner.algorithms.online import Experience

    tokens = torch.arange(1, 13).reshape(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    zeros = torch.zeros(2, 6)
    return Experience(tokens=tokens, response_mask=mask, prompt_lengths=torch.tensor([2, 1]),
                      response_lengths=torch.tensor([3, 5]), rollout_logps=zeros, rewards=torch.tensor([2.0, 3.0]),
                      truncated=torch.tensor([False, True]), group=torch.arange(2), sample_index=torch.arange(2),
                      old_logps=zeros, ref_logps=zeros, values=zeros)


@pytest.mark.parametrize("mode", ["keep", "mask", "penalize"])
def test_truncated_responses(mode):
    from aligner.algorithms.online import RolloutShape
    from aligner.algorithms.ppo import PPOAlgorithm, PPOSection
    from aligner.parallel import ParallelConfig, initialize
    from aligner.training.algorithm import StepContext

    initialize(ParallelConfig(seed=1))
    algo = PPOAlgorithm(PPOSection(truncated=mode, truncated_reward=-1.0, whiten_advantages=False, gamma=1.0,
                                   lam=1.0), maker=None, shape=RolloutShape(2, 1, 2, 1))
    context = StepContext(roles=None, step=0, samples=[], local_samples=[], micro_batch_size=2, seed=0)
    extra = algo.advantages(context, _tiny_experience())
    # γ = λ = 1, V = 0, no KL: every response token's advantage is the sequence's score
    expected_score = {"keep": 3.0, "mask": 3.0, "penalize": -1.0}[mode]
    assert extra["advantages"][0].tolist() == [0, 0, 2.0, 2.0, 2.0, 0]
    row = extra["advantages"][1].tolist()
    if mode == "mask":
        assert row == [0.0] * 6 and extra["loss_mask"][1].sum() == 0
    else:
        assert row == [0.0] + [expected_score] * 5 and extra["loss_mask"][1].sum() == 5


def test_target_kl_stops_the_epochs(assets, tmp_path):
    _, result = _fit(ppo_config(assets, str(tmp_path / "run"), trainer={"max_steps": 1},
                                ppo={"epochs": 3, "mini_batch_size": 4, "target_kl": 1e-9}))
    m = result["train"]
    # the first update moves the policy; the second mini-batch's approximate KL exceeds 1e-9
    assert m["early_stop"] == 1.0 and m["updates"] == 2.0
