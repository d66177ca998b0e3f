"""The REINFORCE family on the online core, one process: the exact-answer reward and its
errors, config checks, no reference pass without a KL term, and DAPO's dynamic sampling and
overlong shaping on crafted groups (counters checked against an independent count)."""
import json
import math
from pathlib import Path

import pytest
import torch

from tests.algorithms.pg_setup import pg_config
from tests.algorithms.ppo_setup import make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("pg_assets"))


def _setup(assets, out_dir, **pg):
    """Trainer, loop, algorithm and the step-0 context of a pg config (world size 1)."""
    from aligner.algorithms.pg import PGTrainer
    from aligner.parallel import ParallelConfig, initialize
    from aligner.training.algorithm import StepContext
    from aligner.training.loop import TrainingLoop

    initialize(ParallelConfig(seed=1))
    trainer = PGTrainer(pg_config(assets, out_dir, pg=pg))
    trainer.init_parallel()
    train = trainer.load_data(trainer.cfg.data.train)
    policy = trainer.build_models()
    roles, algo = trainer.build_roles(policy, len(train))
    algo.prompt_pool = train
    loop = TrainingLoop(algo, policy, train, optim=trainer.cfg.optim, trainer=trainer.cfg.trainer, roles=roles)
    samples = loop.global_batch(0)
    context = StepContext(roles=loop.roles, step=0, samples=samples, local_samples=loop.local_share(samples),
                          micro_batch_size=4, seed=7)
    return trainer, loop, algo, context


def _record_rounds(algo):
    """Keep every round the experience maker generates (the real generation, recorded)."""
    calls = []
    generate = algo.maker.generate

    def recording(context, prompts=None, round=0):
        exp = generate(context, prompts=prompts, round=round)
        calls.append((round, exp))
        return exp

    algo.maker.generate = recording
    return calls


# ---------------------------------------------------------------------------- verifiable reward
def test_exact_answer_reward_by_hand():
    from aligner.rewards import RewardBatch, RewardError, build_reward

    meta = [{"answer": "12"}, {"answer": "12"}, {"answer": "2, 7, 9"}, {"answer": "12"}, {"answer": "12"}]
    texts = ["The answer is 12.", "The answer is 13.", "In order they are 2, 7, 9. The answer is 2, 7, 9.",
             "The answer is 12. The answer is 11.", "twelve"]
    batch = RewardBatch(["q"] * 5, texts, meta, step=3, sample_indices=list(range(5)))
    rewards, attrs = build_reward("exact_answer", format_reward=0.25).score(batch)
    # exact: the LAST stated answer counts; formatted: any stated answer
    assert attrs.tolist() == [[1, 1], [0, 1], [1, 1], [0, 1], [0, 0]]
    assert rewards.tolist() == [1.25, 0.25, 1.25, 0.25, 0.0]
    bad = RewardBatch(["q"], ["The answer is 1."], [{"family": "add", "prompt_index": 4}], step=3, sample_indices=[9])
    with pytest.raises(RewardError, match=r"step 3, sample 9: the prompt row \(dataset row 5\) has no field 'answer'"):
        build_reward("exact_answer").score(bad)


def test_prompt_rows_without_the_answer_are_refused_naming_file_line_and_field(assets, tmp_path):
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    rows = [{"prompt": "What is 2 plus 2?", "answer": "4"}, {"prompt": "What is 1 plus 2?"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pg_config(assets, str(tmp_path / "run"), data={"train": str(path)}, pg={"reward": {"kind": "exact_answer"}})
    with pytest.raises(ConfigError, match=rf"^{path}:2: field 'answer' is missing"):
        PGTrainer(cfg).check_data_rows()


# ---------------------------------------------------------------------------- prompt lengths
LONG_PROMPTS = ["say hi", "say a word please now yes", "what is 2"]  # 10, 14 and 11 tokens rendered


@pytest.mark.parametrize("overlong", ["truncate_left", "drop", "error"])
def test_prompt_file_follows_data_overlong(assets, tmp_path, overlong):
    """data.max_length = 12 over prompts of 10, 14 and 11 tokens (extra_id: <extra_id_0>
    System be nice <extra_id_1> User, the words, <extra_id_1> Assistant)."""
    from aligner.algorithms.pg import PGTrainer
    from aligner.data import DataFormatError
    from tests.algorithms.ppo_setup import SPECIAL, WORDS
    from tests.word_tokenizer import word_vocab

    v = word_vocab(WORDS, SPECIAL)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"system": "be nice", "prompt": p}) + "\n" for p in LONG_PROMPTS))
    cfg = pg_config(assets, str(tmp_path / "run"), data={"train": str(path), "max_length": 12, "overlong": overlong})

    def rendered(words):
        return [v[w] for w in ["<extra_id_0>", "System", "be", "nice", "<extra_id_1>", "User", *words.split(),
                               "<extra_id_1>", "Assistant"]]

    if overlong == "error":
        with pytest.raises(DataFormatError) as err:
            PGTrainer(cfg).load_data(str(path))
        assert str(err.value) == (f"{path}:2: the prompt has 14 tokens, more than max_length = 12 (overlong = error;"
                                  " truncate_left or drop would fit the row)")
        return
    data = PGTrainer(cfg).load_data(str(path))
    got = [data[i]["prompt_tokens"].tolist() for i in range(len(data))]
    report = {k: v for k, v in data.report.items() if k not in ("file", "prepared")}
    if overlong == "drop":
        assert got == [rendered(LONG_PROMPTS[0]), rendered(LONG_PROMPTS[2])]
        assert [data.where(i) for i in range(2)] == [f"{path}:1", f"{path}:3"]
        assert report == {"kind": "prompts", "samples": 2, "dropped_overlong": 1}
    else:  # the end is kept: the first two tokens (<extra_id_0> System) go
        assert got == [rendered(LONG_PROMPTS[0]), rendered(LONG_PROMPTS[1])[2:], rendered(LONG_PROMPTS[2])]
        assert report == {"kind": "prompts", "samples": 3, "truncated_left": 1}


def test_a_prompt_the_context_cannot_hold_is_refused_whatever_data_overlong(assets, tmp_path):
    """data.max_length above the context (64 tokens): a prompt of 64 tokens fits it, so
    data.overlong = drop does not apply, and the context check refuses it."""
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"system": "be nice", "prompt": "say " + "hi " * 55}) + "\n")
    cfg = pg_config(assets, str(tmp_path / "run"), data={"train": str(path), "max_length": 100, "overlong": "drop"})
    with pytest.raises(ConfigError, match=rf"^{path}:1: the row has a prompt of 64 tokens; prompt \+ response must fit"
                                          " the model's max_position_embeddings = 64 tokens"):
        PGTrainer(cfg).load_data(str(path))


@pytest.mark.parametrize("pg,message", [
    ({"kl_estimator": "k3"}, "pg.kl_estimator = 'k3' does not belong in the reward"),
    ({"kl_mode": "loss", "kl_estimator": "abs"}, "pg.kl_estimator = 'abs' has no useful gradient"),
    ({"samples_per_prompt": 1}, "pg.samples_per_prompt = 1: pg.advantage = 'rloo' compares the samples"),
    ({"epochs": 2}, "pg.loss = reinforce is on-policy"),
    ({"overlong_buffer": 9}, "pg.overlong_buffer = 9: expected in 1..8"),
    ({"advantage": "gae"}, "pg.advantage: 'gae' is not accepted; expected one of rloo, grpo, dr_grpo, reinforce_pp,"),
    ({"generation": {"temperature": -1.0}}, "pg.generation.temperature = -1.0: expected a finite number >= 0"),
    ({"generation": {"top_p": 0.0}}, "pg.generation.top_p = 0.0: expected in (0, 1]"),
    ({"generation": {"top_k": -1}}, "pg.generation.top_k = -1: expected >= 0"),
    ({"generation": {"max_batch": 0}}, "pg.generation.max_batch = 0: expected >= 1"),
    ({"reward": {"micro_batch_size": 0}}, "pg.reward.micro_batch_size = 0: expected >= 1"),
    ({"reward": {"format_reward": float("nan")}}, "pg.reward.format_reward = nan: expected a finite number"),
    ({"truncated_reward": float("-inf")}, "pg.truncated_reward = -inf: expected a finite number"),
    ({"gamma": -2.0}, "pg.gamma = -2.0: expected in [0, 1]"),
    ({"entropy_coef": -1.0}, "pg.entropy_coef = -1.0: expected >= 0"),
    ({"target_kl": -1.0}, "pg.target_kl = -1.0: expected > 0"),
])
def test_options_that_cannot_work_are_refused(assets, tmp_path, pg, message):
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    with pytest.raises(ConfigError) as err:
        PGTrainer(pg_config(assets, str(tmp_path), pg=pg))
    assert str(err.value).startswith(message)


def test_gspo_and_cispo_are_pg_losses_with_their_own_clip_ranges(assets, tmp_path):
    from aligner.algorithms.online import RolloutShape
    from aligner.algorithms.pg import PGAlgorithm, PGTrainer
    from aligner.training.config import ConfigError

    want = {"gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0), "clipped": (0.2, 0.2)}
    for loss, clip in want.items():
        cfg = PGTrainer(pg_config(assets, str(tmp_path), pg={"loss": loss, "epochs": 2})).cfg
        o = PGAlgorithm(cfg.pg, None, RolloutShape.of("pg", cfg.pg, cfg.trainer.global_batch_size)).loss_options
        assert (o.kind, o.clip_low, o.clip_high) == (loss, *clip)
    # a range set in the config wins over the loss's own
    cfg = PGTrainer(pg_config(assets, str(tmp_path), pg={"loss": "gspo", "clip_eps_high": 1e-3})).cfg
    o = PGAlgorithm(cfg.pg, None, RolloutShape.of("pg", cfg.pg, cfg.trainer.global_batch_size)).loss_options
    assert (o.clip_low, o.clip_high) == (3e-4, 1e-3)
    with pytest.raises(ConfigError, match="^pg.loss: 'ppo2' is not accepted; expected one of clipped, reinforce,"
                                          " gspo, cispo"):
        PGTrainer(pg_config(assets, str(tmp_path), pg={"loss": "ppo2"}))


def test_online_batches_count_prompts_and_micro_batches_count_rows(assets, tmp_path, monkeypatch):
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    # 4 prompts x G = 4 rows: 16 rows in micro-batches of 8 (once refused as "4 is not a multiple of 8")
    trainer = PGTrainer(pg_config(assets, str(tmp_path), trainer={"global_batch_size": 4, "micro_batch_size": 8}))
    assert trainer.shape().rows == 16
    # at DP = 2 the prompts split over the ranks: checked once, before any process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    odd = PGTrainer(pg_config(assets, str(tmp_path), trainer={"global_batch_size": 3, "micro_batch_size": 8}))
    with pytest.raises(ConfigError, match=r"^trainer.global_batch_size = 3 prompts do not split evenly over 2"
                                          " data-parallel ranks$"):
        odd.preflight()


def test_a_training_set_smaller_than_a_step_is_one_line_before_the_models(assets, tmp_path):
    import torch.distributed as dist

    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    few = tmp_path / "few.jsonl"
    few.write_text("".join(Path(assets["prompts"]).read_text().splitlines(keepends=True)[:3]))
    trainer = PGTrainer(pg_config(assets, str(tmp_path / "run"), data={"train": str(few)}))
    with pytest.raises(ConfigError, match=r"^data.train gives 3 prompts, fewer than trainer.global_batch_size = 4"):
        trainer.fit()
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert dist.is_initialized()  # the layout exists; no model was built (the fixture destroys the group)


def test_a_reward_path_is_required_before_a_run_not_to_print_the_config(assets, tmp_path):
    from aligner.algorithms.pg import PGTrainer
    from aligner.training.config import ConfigError

    trainer = PGTrainer(pg_config(assets, str(tmp_path), pg={"reward": {"kind": "model", "function": None}}))
    assert trainer.cfg.pg.reward.path is None  # the config composes (aligner train pg --cfg job prints it)
    with pytest.raises(ConfigError, match=r"^required value not set: pg.reward.path$") as err:
        trainer.preflight()
    assert err.value.hint == "set on the command line, e.g. aligner train pg pg.reward.path=..."


def test_without_a_kl_term_there_is_no_reference_pass(assets, tmp_path):
    from aligner.algorithms.pg import PGTrainer

    trainer = PGTrainer(pg_config(assets, str(tmp_path / "run"), trainer={"max_steps": 1}, pg={"kl_coef": 0.0}))
    result = trainer.fit()
    roles = trainer.trainer.roles
    assert roles.reference is None and trainer.trainer.algorithm.maker.reference is None
    m = result["train"]
    # the KL to the reference is not measured: not logged (rather than a 0.0 that reads as measured)
    assert "kl_ref" not in m and "kl_ref/sequence" not in m and "kl_penalty" not in m and "loss/kl" not in m
    # step 0: rollout engine and training path agree, the first (and only) ratio is 1
    assert m["logprob_mismatch"] < 1e-5 and abs(m["policy/ratio"] - 1.0) < 1e-6 and m["policy/approx_kl"] < 1e-10



def test_generation_continuous_batching_false_decodes_batch_by_batch(assets, tmp_path):
    """pg.generation.continuous_batching reaches the rollout engine: false decodes the
    step's 16 rows (4 prompts x G = 4) in batches of max_batch = 3, each until its longest
    response ends (forwards counted by hand from the returned lengths: one prefill of every
    prompt whole, which decides each row's first token, then one decode step per further
    token of the batch's longest response), true refills the
    slots (counted by hand from the same lengths and docs/rollout.md's rules:
    tests/rollout/forward_counts.py); the greedy responses are the same."""
    from tests.rollout.forward_counts import batch_forwards, refill_forwards

    runs = {}
    for on in (False, True):
        _, _, algo, context = _setup(assets, str(tmp_path / f"run_{on}"),
                                     generation={"max_new_tokens": 8, "temperature": 0.0, "max_batch": 3,
                                                 "continuous_batching": on})
        exp = algo.make_experience(context)
        engine = algo.maker.engine
        assert engine.continuous is on
        runs[on] = (exp, engine.forwards)
    exp, forwards = runs[False]
    plen, rlen = exp.prompt_lengths.tolist(), exp.response_lengths.tolist()
    order = sorted(range(len(plen)), key=lambda i: plen[i])  # the engine's batches: shortest prompts first
    by_hand = sum(max(rlen[i] for i in batch) for batch in (order[k:k + 3] for k in range(0, len(order), 3)))
    assert forwards == by_hand == batch_forwards(plen, rlen, 3)
    on_exp, on_forwards = runs[True]
    assert on_forwards == refill_forwards(plen, rlen, 3)
    # This case by hand: 12 rows of 10-token prompts and 4 of 14, every response 8 tokens
    # (none stops early). Batches: 4 of 10-token rows and 2 of 14, each 8 forwards: 48.
    # Refills: the first 3 slots prefill 10 columns (1 forward) and end at step 8; the slots
    # then take 3 waiting rows at steps 8, 16, 24 (10-token prompts), 32 (14) and 40 (the
    # last 14-token row, the other slots dropped): 5 prefills of the newcomers' first
    # c = p - 1 columns, each newcomer deciding columns p .. p + 7, 8 steps from the step
    # after its slot freed; the last row ends at step 48: 1 + 5 + 47 decode steps = 53.
    assert sorted(plen) == [10] * 12 + [14] * 4 and rlen == [8] * 16
    assert (forwards, on_forwards) == (48, 53)
    assert torch.equal(on_exp.tokens, exp.tokens)
    assert on_exp.response_lengths.tolist() == rlen


# ---------------------------------------------------------------------------- DAPO
def test_dynamic_sampling_keeps_groups_with_signal_and_counts_the_rest(assets, tmp_path):
    _, loop, algo, context = _setup(assets, str(tmp_path / "run"), advantage="grpo", loss="clipped",
                                    dynamic_sampling=True, max_generation_rounds=5,
                                    reward={"kind": "function", "function": "tests.algorithms.pg_setup:target_reward"})
    calls = _record_rounds(algo)
    exp = algo.make_experience(context)
    G, quota = 4, len(context.local_samples)
    # the same selection, counted independently over the recorded rounds
    kept, dropped, before_last = [], 0, None
    for i, (round_, e) in enumerate(calls):
        assert round_ == i
        if i == len(calls) - 1:
            before_last = len(kept)
        rewards = e.rewards.tolist()
        for g in range(len(e) // G):
            values = rewards[g * G:(g + 1) * G]
            if len(set(values)) == 1:
                dropped += 1
            elif len(kept) < quota:
                kept.append(e.tokens[g * G:(g + 1) * G])
    assert dropped > 0 and len(calls) > 1, "the crafted rewards must drop groups and need more rounds"
    assert before_last < quota and (len(kept) == quota or len(calls) == 5)
    c = algo.counters
    assert c["pg/generation_rounds"] == len(calls)
    assert c["pg/groups_dropped"] == dropped
    assert c["pg/groups_short"] == quota - len(kept)
    assert len(exp) == quota * G
    for g, tokens in enumerate(kept):  # the kept groups, in the order they were generated
        got = exp.tokens[g * G:(g + 1) * G]
        assert torch.equal(got[:, :tokens.shape[1]], tokens) and not got[:, tokens.shape[1]:].any()
        assert len(set(exp.rewards[g * G:(g + 1) * G].tolist())) > 1
    assert exp.filler.tolist() == [False] * (len(kept) * G) + [True] * ((quota - len(kept)) * G)
    # groups of every round have their own ids (rows of one group consecutive)
    assert all(len(set(exp.group[g * G:(g + 1) * G].tolist())) == 1 for g in range(quota))
    assert len(set(exp.group.tolist())) == quota


def test_all_equal_groups_are_dropped_up_to_the_cap_and_train_nothing(assets, tmp_path):
    """Greedy generation: the G samples of a prompt are identical, every group is without
    signal. All rounds are used, the batch is topped up with groups that count for nothing,
    and the update leaves the policy as it was."""
    _, loop, algo, context = _setup(assets, str(tmp_path / "run"), advantage="grpo", loss="clipped",
                                    dynamic_sampling=True, max_generation_rounds=3, generation={"temperature": 0.0})
    before = [p.detach().clone() for p in context.roles["policy"].modules[0].parameters()]
    metrics = algo.train_step(context)
    P = len(context.samples)
    assert metrics["pg/generation_rounds"] == 3 and metrics["pg/groups_dropped"] == 3 * P
    assert metrics["pg/groups_short"] == P and metrics["pg/groups_without_signal"] == 0
    assert metrics["grad_norm/policy"] == 0.0
    for a, b in zip(before, context.roles["policy"].modules[0].parameters()):
        assert torch.equal(a, b)


def test_overlong_penalty_and_overlong_filtering(assets, tmp_path):
    """A reward that is 0 everywhere: only DAPO's soft overlong penalty (L_max 8, L_cache 4)
    tells the samples apart; responses without EOS are left out (truncated: mask)."""
    _, loop, algo, context = _setup(assets, str(tmp_path / "run"), advantage="grpo", loss="clipped",
                                    overlong_buffer=4, truncated="mask",
                                    reward={"kind": "function", "function": "tests.algorithms.pg_setup:zero_reward"})
    exp = algo.maker.score_passes(context, algo.make_experience(context))
    extra = algo.advantages(context, exp)
    metrics = algo.experience_metrics(context, exp, extra)
    lengths = exp.response_lengths.tolist()
    truncated = exp.truncated.tolist()
    penalty = [0.0 if n <= 4 else (4 - n) / 4 for n in lengths]
    assert sum(p < 0 for p in penalty) > 0 and any(truncated) and not all(truncated)
    assert metrics["pg/overlong_penalized"] == sum(p < 0 for p in penalty)
    assert metrics["pg/overlong_penalty"] == pytest.approx(sum(penalty) / len(penalty), abs=1e-12)
    assert metrics["pg/truncated_masked"] == sum(truncated)
    G = 4
    without_signal = 0
    for g in range(len(exp) // G):
        rows = range(g * G, (g + 1) * G)
        values = [penalty[i] for i in rows if not truncated[i]]
        if len(set(values)) <= 1:
            without_signal += 1
        n = len(values)
        mean = sum(values) / n if n else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        for i in rows:
            on = exp.response_mask[i] != 0
            adv = extra["advantages"][i]
            if truncated[i]:  # filtered: no advantage, no loss
                assert not adv.any() and not extra["loss_mask"][i].any()
                continue
            want = 0.0 if n < 2 else (penalty[i] - mean) / (std + 1e-6)
            assert torch.allclose(adv[on].double(), torch.full((int(on.sum()),), want, dtype=torch.float64),
                                  atol=1e-6)
    assert metrics["pg/groups_without_signal"] == without_signal


def test_with_lora_the_base_is_the_reference_whatever_the_reference_mode(assets, tmp_path):
    """``pg.reference=model`` with LoRA: no second model is built; at step 1 the policy
    (adapters with B = 0) is its base, so the KL to the reference is 0."""
    from aligner.algorithms.pg import PGTrainer

    trainer = PGTrainer(pg_config(assets, str(tmp_path / "run"), trainer={"max_steps": 1, "export_hf": False},
                                  pg={"reference": "model", "kl_coef": 0.05}, lora={"enabled": True, "rank": 4}))
    m = trainer.fit()["train"]
    roles = trainer.trainer.roles
    assert roles.reference.mode == "adapters" and "reference" not in roles.frozen
    assert abs(m["kl_ref"]) < 1e-6
