"""The rollout engine against HF transformers and against the training path.

A random tiny HF Llama (GQA, vocabulary 250 padded to 256, context 64) is made here with
transformers and saved; every layout imports it. References computed with transformers in
this process: per-prompt greedy ``generate`` (no padding, so exact) and the next-token
logits of one prompt. Each layout runs in one spawned job that returns everything the
tests below check:

- greedy parity with HF at TP=1, TP=2, PP=2 and TP=2 x PP=2, for both decode
  implementations (fused and megatron-core's own forward), identical on every rank;
- the returned log-probs against the training path (full forward, vocab-parallel
  log-softmax) of the returned sequences, 1e-5 in fp32;
- at TP=1: sampling reproducibility, top-k 1 = greedy, first-token frequencies vs
  softmax(logits / T), stops, context limit, and the errors for bad input.
"""
import math

import pytest
import torch

from aligner.models import from_pretrained
from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

VOCAB, CONTEXT, NEW_TOKENS = 250, 64, 32
PROMPTS = [
    [5, 9, 3],
    [7, 100, 44, 8, 19, 23, 200, 1, 4],
    [1, 2, 3, 4, 5, 6],
    [249],
    [17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    [3, 3],
    [99, 98, 97, 96],
    [11, 12, 13, 14, 15, 160, 170],
]
# continuous batching: 10 prompts through 3 slots, the last two longer than any other
REFILL_PROMPTS = PROMPTS + [[(7 * i + 3) % VOCAB for i in range(20)], [(11 * i + 5) % VOCAB for i in range(23)]]
REFILL_BATCH, REFILL_STOP_AT = 3, 6
REFILL_SAMPLED = dict(max_new_tokens=24, temperature=1.0, stop_token_ids=list(range(10, 25)), seed=13)
DIST_PROMPT = [12, 40, 7, 99, 3]
DIST_SAMPLES, DIST_T, DIST_TOP_K = 4000, 0.6, 5
LOGPROB_TOL = 1e-5


class LetterTokenizer:
    """Token i <-> letter ``chr(97 + i % 26)`` (decode only is lossless enough for stops)."""

    eos_id = 2
    pad_id = 0

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


# ---------------------------------------------------------------------------- ranks
def _training_logprobs(models, tokens, lengths):
    """Training path: full forward of right-padded ``tokens`` (causal mask), vocab-parallel
    log-softmax of each next token -> [b, s-1] on the last stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from aligner.models import token_logprobs

    out = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch, None, None)

        def collect(logits):
            out.append(token_logprobs(logits[:, :-1].contiguous(), batch[:, 1:].contiguous()).detach())
            return logits.sum() * 0.0, {}

        return logits, collect

    for m in models:
        m.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=models,
            num_microbatches=1,
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return out[0].cpu() if ps.is_pipeline_last_stage() else None


SAMPLED = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, stop_token_ids=[], seed=3)


def run_layout(hf_dir, tp, pp, sp=False):
    initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
    models, cfg = from_pretrained(hf_dir, sequence_parallel=sp)
    return _layout_checks(models, cfg)


def _layout_checks(models, cfg):
    """Greedy (both decode implementations), log-probs vs training path, a sampled batch."""
    from aligner.rollout import GenerationConfig, RolloutEngine

    out = {}
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[])
    for impl in ("fused", "megatron"):
        engine = RolloutEngine(models, cfg, decode_impl=impl)
        out[f"decoder_{impl}"] = type(engine.decoder).__name__
        res = engine.generate(PROMPTS, greedy)
        out[f"greedy_{impl}"] = [res.response_tokens(i) for i in range(len(res))]
        out[f"greedy_logprobs_{impl}"] = [res.response_logprobs(i) for i in range(len(res))]
        out[f"train_logprobs_{impl}"] = _training_logprobs(models, res.tokens.to(torch.int64), res.lengths)
        out[f"result_{impl}"] = (res.tokens, res.lengths, res.prompt_lengths, res.response_lengths)
        out[f"forwards_{impl}"] = engine.forwards
    for impl in ("fused", "megatron"):
        sampled = RolloutEngine(models, cfg, decode_impl=impl).generate(PROMPTS, GenerationConfig(**SAMPLED))
        out["sampled" if impl == "fused" else "sampled_megatron"] = [
            sampled.response_tokens(i) for i in range(len(sampled))]

    # Continuous batching: REFILL_BATCH slots for more prompts, rows ending on a stop token
    # at different steps, freed slots refilled (the newcomers' prompts prefilled into them,
    # up to 23 tokens); against refills off.
    stop = out["greedy_fused"][0][REFILL_STOP_AT]
    out["refill_stop"] = stop
    for name, config in (("greedy", GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[stop])),
                         ("sampled", GenerationConfig(**REFILL_SAMPLED))):
        for on in (True, False):
            engine = RolloutEngine(models, cfg, max_batch=REFILL_BATCH, continuous_batching=on)
            res = engine.generate(REFILL_PROMPTS, config)
            key = f"refill_{name}_{'on' if on else 'off'}"
            out[key] = dict(responses=[res.response_tokens(i) for i in range(len(res))],
                            logprobs=[res.response_logprobs(i) for i in range(len(res))],
                            reasons=res.stop_reasons, forwards=engine.forwards, row_steps=engine.row_steps,
                            continuous=engine.continuous)
            if name == "greedy" and on:
                out[key]["train_logprobs"] = _training_logprobs(models, res.tokens, res.lengths)
                out[key]["result"] = (res.prompt_lengths, res.response_lengths)
    out["refill_megatron"] = RolloutEngine(models, cfg, decode_impl="megatron", continuous_batching=True).continuous
    # the sampled refill run again with each sample's uniforms drawn 2 at a time (its blocks
    # run out mid-response), and through megatron-core's decode steps (one draw per step)
    sampled = GenerationConfig(**REFILL_SAMPLED)
    engine = RolloutEngine(models, cfg, max_batch=REFILL_BATCH)
    engine.draw_block = 2
    res = engine.generate(REFILL_PROMPTS, sampled)
    out["refill_sampled_block2"] = [res.response_tokens(i) for i in range(len(res))]
    res = RolloutEngine(models, cfg, max_batch=REFILL_BATCH, decode_impl="megatron").generate(REFILL_PROMPTS, sampled)
    out["refill_sampled_megatron"] = [res.response_tokens(i) for i in range(len(res))]
    return out


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_single(hf_dir):
    """World size 1: sampling, stops, context and errors."""
    from aligner.rollout import GenerationConfig, RolloutEngine

    initialize(ParallelConfig(seed=5))
    models, cfg = from_pretrained(hf_dir)
    out = {"layout": _layout_checks(models, cfg)}
    engine = RolloutEngine(models, cfg, max_batch=1000)
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[])
    ref = engine.generate(PROMPTS, greedy)
    out["greedy"] = [ref.response_tokens(i) for i in range(len(ref))]
    out["greedy_logprobs"] = [ref.response_logprobs(i) for i in range(len(ref))]

    # sampling: reproducible per seed, per request, and top-k 1 = greedy
    sample = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, stop_token_ids=[], seed=7)

    def run(prompts, config, seeds=None):
        res = engine.generate(prompts, config, seeds)
        return [res.response_tokens(i) for i in range(len(res))]

    out["sample_a"] = run(PROMPTS, sample)
    out["sample_b"] = run(PROMPTS, sample)
    out["sample_other_seed"] = run(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=[], seed=8))
    out["per_request"] = run([PROMPTS[0], PROMPTS[4], PROMPTS[6]], sample, seeds=[101, 102, 103])
    out["per_request_reordered"] = run([PROMPTS[6], PROMPTS[0]], sample, seeds=[103, 101])
    out["per_request_small_batches"] = RolloutEngine(models, cfg, max_batch=1).generate(
        [PROMPTS[0], PROMPTS[4], PROMPTS[6]], sample, seeds=[101, 102, 103]).tokens.tolist()
    out["top_k_1"] = run(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.7, top_k=1,
                                                   stop_token_ids=[], seed=9))
    # first-token frequencies
    first = GenerationConfig(max_new_tokens=1, temperature=DIST_T, stop_token_ids=[], seed=11)
    res = engine.generate([DIST_PROMPT] * DIST_SAMPLES, first)
    out["first_tokens"] = res.tokens[:, len(DIST_PROMPT)].clone()
    topk = GenerationConfig(max_new_tokens=1, temperature=DIST_T, top_k=DIST_TOP_K, stop_token_ids=[], seed=12)
    res = engine.generate([DIST_PROMPT] * DIST_SAMPLES, topk)
    out["first_tokens_top_k"] = res.tokens[:, len(DIST_PROMPT)].clone()

    # stops: a stop token taken from row 0's greedy response, a stop string from row 1's text
    stop_token = out["greedy"][0][5]
    res = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                                    stop_token_ids=[stop_token]))
    out["stop_token"] = stop_token
    out["stop_token_result"] = dict(
        responses=[res.response_tokens(i) for i in range(len(res))], lengths=res.lengths,
        response_lengths=res.response_lengths, prompt_lengths=res.prompt_lengths,
        reasons=res.stop_reasons, logprobs=[res.response_logprobs(i) for i in range(len(res))],
        tokens=res.tokens, pad_id=res.pad_id,
    )
    tok = LetterTokenizer()
    text_engine = RolloutEngine(models, cfg, tokenizer=tok)
    stop_string = tok.decode(out["greedy"][1][7:9])
    res = text_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                                         stop_token_ids=[], stop_strings=[stop_string]))
    out["stop_string"] = stop_string
    out["stop_string_result"] = dict(responses=[res.response_tokens(i) for i in range(len(res))],
                                     reasons=res.stop_reasons, texts=res.texts)
    res = RolloutEngine(models, cfg, tokenizer=tok, max_batch=REFILL_BATCH).generate(
        PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True, stop_token_ids=[],
                                  stop_strings=[stop_string]))
    out["stop_string_refill"] = dict(responses=[res.response_tokens(i) for i in range(len(res))],
                                     reasons=res.stop_reasons, texts=res.texts)
    res = text_engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=4, greedy=True))
    out["eos_default"] = dict(texts=res.texts, responses=[res.response_tokens(i) for i in range(2)],
                              reasons=res.stop_reasons)
    # context: 60 prompt tokens leave room for 4 of the 32 new tokens
    long_prompt = [(3 * i) % VOCAB for i in range(CONTEXT - 4)]
    res = engine.generate([long_prompt, PROMPTS[0]], greedy)
    out["context"] = dict(lengths=res.lengths, reasons=res.stop_reasons, response_lengths=res.response_lengths)
    # with refills: the long prompt waits for a slot and ends on the context within it
    res = RolloutEngine(models, cfg, max_batch=2).generate([PROMPTS[0], PROMPTS[3], long_prompt, PROMPTS[5]], greedy)
    out["context_refill"] = dict(lengths=res.lengths, reasons=res.stop_reasons,
                                 responses=[res.response_tokens(i) for i in range(len(res))])

    # errors
    config = GenerationConfig(max_new_tokens=4, greedy=True)
    out["errors"] = dict(
        too_long=_error(lambda: engine.generate([PROMPTS[0], list(range(CONTEXT))], config)),
        empty=_error(lambda: engine.generate([[], PROMPTS[0]], config)),
        unknown_stop=_error(lambda: engine.generate(
            PROMPTS, GenerationConfig(max_new_tokens=4, stop_token_ids=[2, VOCAB + 50]))),
        bad_token=_error(lambda: engine.generate([[1, 2, VOCAB]], config)),
        string_without_tokenizer=_error(lambda: engine.generate(["hello"], config)),
        stop_strings_without_tokenizer=_error(lambda: engine.generate(
            PROMPTS, GenerationConfig(max_new_tokens=4, stop_strings=["ab"]))),
        seeds_mismatch=_error(lambda: engine.generate(PROMPTS, config, seeds=[1, 2])),
        bad_impl=_error(lambda: RolloutEngine(models, cfg, decode_impl="fast")),
        bad_max_seq_len=_error(lambda: RolloutEngine(models, cfg, max_seq_len=CONTEXT + 1)),
    )
    return out


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = str(tmp_path_factory.mktemp("rollout") / "tiny_llama")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir)
    greedy = []
    with torch.no_grad():
        for prompt in REFILL_PROMPTS:
            ids = torch.tensor([prompt])
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, use_cache=True, pad_token_id=0)
            greedy.append(seq[0, len(prompt):].tolist())
        dist_logits = model(torch.tensor([DIST_PROMPT])).logits[0, -1].float()
    assert all(len(g) == NEW_TOKENS for g in greedy)
    return {"dir": hf_dir, "greedy": greedy[:len(PROMPTS)], "refill_greedy": greedy, "dist_logits": dist_logits}


@pytest.fixture(scope="module")
def single(hf_reference):
    return spawn_local(run_single, 1, hf_reference["dir"], timeout=240)[0]


# sp: sequence parallelism (megatron-core splits each forward's columns over the TP ranks)
@pytest.fixture(scope="module", params=[(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)],
                ids=lambda p: f"tp{p[0]}_pp{p[1]}" + ("_sp" if p[2] else ""))
def layout(request, hf_reference, single):
    tp, pp, sp = request.param
    if (tp, pp) == (1, 1):
        return tp, pp, [single["layout"]]
    return tp, pp, spawn_local(run_layout, tp * pp, hf_reference["dir"], tp, pp, sp, timeout=300)


# ---------------------------------------------------------------------------- parity
def test_greedy_equals_hf_generate(layout, hf_reference):
    tp, pp, ranks = layout
    for rank, out in enumerate(ranks):
        assert out["decoder_fused"] == "FusedDecoder" and out["decoder_megatron"] == "NoneType"
        for impl in ("fused", "megatron"):
            for i, (ours, theirs) in enumerate(zip(out[f"greedy_{impl}"], hf_reference["greedy"])):
                assert ours == theirs, f"tp={tp} pp={pp} rank {rank} {impl}: prompt {i} differs from HF"


def test_forwards_of_each_decode_path(layout):
    """The fused decoder prefills every prompt whole: its first decision is every row's first
    response token, so a batch of prompts of 1 to 12 tokens takes NEW_TOKENS forwards (one
    prefill, NEW_TOKENS - 1 decode steps). megatron-core's decode steps keep one column for
    the batch: the prefill runs the shortest prompt (1 token), then one column per step to
    the longest row's end (tests/rollout/forward_counts.py)."""
    from tests.rollout.forward_counts import batch_forwards, megatron_batch_forwards

    _, _, ranks = layout
    plen, rlen = [len(p) for p in PROMPTS], [NEW_TOKENS] * len(PROMPTS)
    for out in ranks:
        assert out["forwards_fused"] == batch_forwards(plen, rlen, 64) == NEW_TOKENS
        megatron = megatron_batch_forwards(plen, rlen, 64)
        assert megatron == 12 + NEW_TOKENS - 1
        # under sequence parallelism the 1-token prompt leaves nothing to prefill: no prefill
        # forward, and column 0 is decided (as the prompt's own token) from no logits, one
        # decode step more: the same count
        assert out["forwards_megatron"] == megatron


def test_sampling_is_the_same_on_both_decode_paths(layout):
    """Sample i draws from its own generator only for its generated tokens: the fused
    decoder (prompts prefilled whole) and megatron-core's decode steps (a longer prompt's
    tail fed one token per step) give the same samples for the same seeds."""
    _, _, ranks = layout
    for out in ranks:
        assert out["sampled_megatron"] == out["sampled"]


def test_every_rank_returns_the_same_result(layout):
    _, _, ranks = layout
    for out in ranks[1:]:
        assert out["sampled"] == ranks[0]["sampled"]
        for impl in ("fused", "megatron"):
            for a, b in zip(out[f"result_{impl}"], ranks[0][f"result_{impl}"]):
                assert torch.equal(a, b)
            for a, b in zip(out[f"greedy_logprobs_{impl}"], ranks[0][f"greedy_logprobs_{impl}"]):
                assert torch.equal(a, b)


def test_sampling_is_layout_independent(layout, single):
    """Same seeds in every layout give the same samples as TP=1 (decisions come from one
    rank; logits agree to rounding, so a draw could only flip on a CDF boundary)."""
    _, _, ranks = layout
    reference = single["layout"]["sampled"]
    assert len(reference) == len(PROMPTS) and any(reference)
    for out in ranks:
        assert out["sampled"] == reference


def test_logprobs_equal_training_path(layout):
    tp, pp, ranks = layout
    checked = 0
    for out in ranks:
        for impl in ("fused", "megatron"):
            train = out[f"train_logprobs_{impl}"]
            if train is None:  # not the last pipeline stage
                continue
            tokens, lengths, prompt_lengths, response_lengths = out[f"result_{impl}"]
            for i, gen in enumerate(out[f"greedy_logprobs_{impl}"]):
                p, n = int(prompt_lengths[i]), int(response_lengths[i])
                assert n == NEW_TOKENS and int(lengths[i]) == p + n
                # train[i, c] is the log-prob of token c + 1
                torch.testing.assert_close(gen, train[i, p - 1:p - 1 + n], atol=LOGPROB_TOL, rtol=0)
                checked += 1
    assert checked >= 2 * len(PROMPTS)


# ---------------------------------------------------------------------------- continuous batching
def test_refill_greedy_equals_each_prompt_alone_in_hf(layout, hf_reference):
    """Rows that end on the stop token hand their slot to a waiting prompt: every response
    is still HF's greedy response of that prompt alone, cut after the stop token; the same
    as with refills off, in fewer forwards."""
    tp, pp, ranks = layout
    for rank, out in enumerate(ranks):
        stop = out["refill_stop"]
        on, off = out["refill_greedy_on"], out["refill_greedy_off"]
        assert on["continuous"] and not off["continuous"] and not out["refill_megatron"]
        lengths = set()
        for i, full in enumerate(hf_reference["refill_greedy"]):
            cut = full.index(stop) + 1 if stop in full else len(full)
            assert on["responses"][i] == full[:cut], f"tp={tp} pp={pp} rank {rank}: prompt {i}"
            assert on["reasons"][i] == ("stop_token" if stop in full else "max_new_tokens")
            lengths.add(cut)
        assert on["responses"] == off["responses"] and on["reasons"] == off["reasons"]
        assert len(lengths) >= 3  # rows end at different steps, so slots are refilled mid-flight
        for a, b in zip(on["logprobs"], off["logprobs"]):
            torch.testing.assert_close(a, b, atol=LOGPROB_TOL, rtol=0)
        # the decode work: one batch of up to 3 rows at a time vs slots kept full, counted by
        # hand from the rows' lengths (tests/rollout/forward_counts.py)
        _assert_forwards(on, off)


def _assert_forwards(on, off):
    from tests.rollout.forward_counts import batch_forwards, refill_forwards

    plen, rlen = [len(p) for p in REFILL_PROMPTS], [len(r) for r in on["responses"]]
    assert off["forwards"] == batch_forwards(plen, rlen, REFILL_BATCH)
    assert on["forwards"] == refill_forwards(plen, rlen, REFILL_BATCH)
    assert on["forwards"] < off["forwards"], (on["forwards"], off["forwards"])


def test_refill_logprobs_equal_training_path(layout):
    _, _, ranks = layout
    checked = 0
    for out in ranks:
        on = out["refill_greedy_on"]
        if on["train_logprobs"] is None:  # not the last pipeline stage
            continue
        prompt_lengths, response_lengths = on["result"]
        for i, gen in enumerate(on["logprobs"]):
            p, n = int(prompt_lengths[i]), int(response_lengths[i])
            torch.testing.assert_close(gen, on["train_logprobs"][i, p - 1:p - 1 + n], atol=LOGPROB_TOL, rtol=0)
            checked += 1
    assert checked >= len(REFILL_PROMPTS)


def test_refill_sampling_equals_no_refill(layout):
    """Sample i draws from its own seed's generator whatever slot and step it decodes in:
    the same samples with refills on and off, in every layout; and whatever the block of
    uniforms the fused path draws ahead (2 or a whole response), the same samples as
    megatron-core's decode steps, which draw one uniform per step."""
    tp, pp, ranks = layout
    for out in ranks:
        on, off = out["refill_sampled_on"], out["refill_sampled_off"]
        assert on["responses"] == off["responses"] and on["reasons"] == off["reasons"]
        assert len({len(r) for r in on["responses"]}) >= 3 and "stop_token" in on["reasons"]
        _assert_forwards(on, off)
        assert out["refill_sampled_on"]["responses"] == ranks[0]["refill_sampled_on"]["responses"]
        # uniforms drawn ahead in blocks of any size are the numbers of one draw per step
        assert out["refill_sampled_block2"] == on["responses"]
        assert out["refill_sampled_megatron"] == on["responses"]


# ---------------------------------------------------------------------------- sampling
def test_sampling_reproducible(single, hf_reference):
    assert single["greedy"] == hf_reference["greedy"]
    assert single["sample_a"] == single["sample_b"]
    assert single["sample_a"] != single["sample_other_seed"]
    assert single["sample_a"] != single["greedy"]
    # a request's seed decides its sample, whatever else is in the batch
    a0, a4, a6 = single["per_request"]
    b6, b0 = single["per_request_reordered"]
    assert (a0, a6) == (b0, b6)
    small = single["per_request_small_batches"]
    for resp, row, prompt in zip((a0, a4, a6), small, (PROMPTS[0], PROMPTS[4], PROMPTS[6])):
        assert row[len(prompt):len(prompt) + len(resp)] == resp


def test_top_k_1_equals_greedy(single):
    assert single["top_k_1"] == single["greedy"]


def _chi_square(counts, probs, min_expected=5.0):
    """Pearson's statistic with bins of expected count < ``min_expected`` merged; returns
    (statistic, degrees of freedom)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def _chi_square_critical(df, z=3.719):
    """Upper 1e-4 quantile of chi-square(df) by the Wilson-Hilferty approximation
    (z = 3.719 is the standard normal's upper 1e-4 quantile)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_first_token_frequencies_match_softmax(single, hf_reference):
    """4000 draws of the first token at T = 0.6 against softmax(HF logits / T).

    Pearson chi-square, bins with expected count < 5 merged, rejected at the 1e-4 level
    (false alarm once in 10,000 seeds; the seeds here are fixed). The same counts must be
    rejected against T = 1 (the test can tell temperatures apart) and no padded-vocabulary
    token may ever be drawn."""
    counts = torch.bincount(single["first_tokens"], minlength=256).double()
    assert counts[VOCAB:].sum() == 0
    logits = hf_reference["dist_logits"].double()
    stat, df = _chi_square(counts[:VOCAB], torch.softmax(logits / DIST_T, -1))
    assert df >= 5 and stat < _chi_square_critical(df), (stat, df)
    wrong, wdf = _chi_square(counts[:VOCAB], torch.softmax(logits, -1))
    assert wrong > _chi_square_critical(wdf), (wrong, wdf)


def test_top_k_frequencies_match_renormalised_top_k(single, hf_reference):
    counts = torch.bincount(single["first_tokens_top_k"], minlength=256).double()[:VOCAB]
    logits = hf_reference["dist_logits"].double()
    top = torch.topk(logits, DIST_TOP_K).indices
    assert set(counts.nonzero().squeeze(-1).tolist()) <= set(top.tolist())
    probs = torch.softmax(logits[top] / DIST_T, -1)
    stat, df = _chi_square(counts[top], probs)
    assert stat < _chi_square_critical(df), (stat, df)


# ---------------------------------------------------------------------------- stops
def test_stop_token_ends_each_sample_on_its_own(single):
    stop = single["stop_token"]
    res = single["stop_token_result"]
    stopped = 0
    for i, (full, prompt) in enumerate(zip(single["greedy"], PROMPTS)):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert res["responses"][i] == full[:cut]
        assert int(res["response_lengths"][i]) == cut
        assert int(res["prompt_lengths"][i]) == len(prompt)
        assert int(res["lengths"][i]) == len(prompt) + cut
        assert res["reasons"][i] == ("stop_token" if stop in full else "max_new_tokens")
        torch.testing.assert_close(res["logprobs"][i], single["greedy_logprobs"][i][:cut], atol=LOGPROB_TOL, rtol=0)
        # right padding after the response
        assert (res["tokens"][i, len(prompt) + cut:] == res["pad_id"]).all()
        stopped += stop in full
    assert 1 <= stopped < len(PROMPTS)  # some rows stop, others run to max_new_tokens


def test_stop_string_ends_each_sample_on_its_own(single):
    tok = LetterTokenizer()
    stop = single["stop_string"]
    res = single["stop_string_result"]
    hits = 0
    for i, full in enumerate(single["greedy"]):
        cut = next((k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k])), len(full))
        assert res["responses"][i] == full[:cut]
        hit = stop in tok.decode(full)
        assert res["reasons"][i] == ("stop_string" if hit else "max_new_tokens")
        assert res["texts"][i] == tok.decode(full[:cut])
        if hit:
            assert res["texts"][i].endswith(stop)
        hits += hit
    assert hits >= 1


def test_stop_string_with_refills(single):
    assert single["stop_string_refill"] == single["stop_string_result"]


def test_default_stop_is_the_tokenizer_eos(single):
    res = single["eos_default"]
    for resp, reason, text in zip(res["responses"], res["reasons"], res["texts"]):
        if LetterTokenizer.eos_id in resp:
            assert resp[-1] == LetterTokenizer.eos_id and reason == "stop_token"
            assert text == LetterTokenizer().decode(resp[:-1])  # the stop token is not in the text
        else:
            assert len(resp) == 4 and reason == "max_new_tokens"


def test_context_limit(single):
    res = single["context"]
    assert res["lengths"].tolist() == [CONTEXT, len(PROMPTS[0]) + NEW_TOKENS]
    assert res["response_lengths"].tolist() == [4, NEW_TOKENS]
    assert res["reasons"] == ["context_length", "max_new_tokens"]
    res = single["context_refill"]
    assert res["lengths"].tolist() == [len(PROMPTS[0]) + NEW_TOKENS, len(PROMPTS[3]) + NEW_TOKENS, CONTEXT,
                                       len(PROMPTS[5]) + NEW_TOKENS]
    assert res["reasons"] == ["max_new_tokens", "max_new_tokens", "context_length", "max_new_tokens"]
    assert [res["responses"][i] for i in (0, 1, 3)] == [single["greedy"][i] for i in (0, 3, 5)]


# ---------------------------------------------------------------------------- errors
def test_bad_input_gives_clear_errors(single):
    e = single["errors"]
    assert "prompts[1] has 64 tokens" in e["too_long"] and "context holds 64" in e["too_long"]
    assert "prompts[0] is empty" in e["empty"]
    assert f"stop_token_ids contains {VOCAB + 50}" in e["unknown_stop"] and "0..249" in e["unknown_stop"]
    assert f"prompts[0][2] = {VOCAB}" in e["bad_token"]
    assert "prompts[0] is a string" in e["string_without_tokenizer"] and "tokenizer" in e["string_without_tokenizer"]
    assert "stop_strings needs a tokenizer" in e["stop_strings_without_tokenizer"]
    assert "2 seeds for 8 prompts" in e["seeds_mismatch"]
    assert "decode_impl = 'fast'" in e["bad_impl"]
    assert "max_seq_len = 65" in e["bad_max_seq_len"]
