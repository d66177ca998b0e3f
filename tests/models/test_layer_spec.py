"""The fused layer spec (torch SDPA + RMSNorm) against megatron-core's local spec.

The model is a Mistral with a sliding window of 6 tokens, shorter than the 16-token rows,
so the window meets every mask below (a padding mask, a packed block-diagonal mask).

One set of weights is made at world size 1 and saved with dist_checkpointing; every run
loads it. Each run does one forward/backward over three micro-batches through
megatron-core's schedule (DDP grad buffers, ``finalize_model_grads``): right-padded rows
with the implicit causal mask, left-padded rows with an explicit padding mask and position
ids, and packed rows with a block-diagonal mask. Sharded gradients are saved as a
checkpoint and read back at TP=1, then compared name by name (fp32, 1e-5):

- fused == local at TP=1 (logits, loss, gradients), and fused at TP=2 and PP=2 == local TP=1;
- fused at TP=2 with sequence parallelism == without (losses, gradients), which needs the
  norms' weight gradients all-reduced over TP;
- the attention module's own mask semantics (fully blocked rows, queries after a cache);
- spec selection, the refusals (context parallelism, sequence parallelism on the local
  spec, an explicit spec that cannot run) and ``aligner env``'s report.

Three spawns: world 1 (weights, local and fused TP=1), world 2 (TP=2, TP=2 + SP, PP=2),
world 1 (gradients read back).
"""
import os

import pytest
import torch

from aligner.parallel import LayoutError, ParallelConfig, initialize, validate_layout
from aligner.parallel.spawn import spawn_local

VOCAB, SEQ, ROWS, TOL = 96, 16, 2, 1e-5


def _model_cfg(spec, window=6):
    from aligner.models import ModelConfig

    return ModelConfig(arch="mistral", sliding_window=window, vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, max_position_embeddings=64, make_vocab_size_divisible_by=32,
                       pad_token_id=0, layer_spec=spec)


def _microbatches():
    """Three micro-batches [ROWS, SEQ]: (tokens, position_ids, attention_mask, loss_mask)."""
    from aligner.models.gpt import (attention_mask_from_padding, packed_attention_mask, packed_position_ids,
                                    position_ids_from_padding)

    g = torch.Generator().manual_seed(4)
    tokens = [torch.randint(1, VOCAB, (ROWS, SEQ), generator=g) for _ in range(3)]
    right = torch.ones(ROWS, SEQ)
    right[1, 11:] = 0
    tokens[0] = tokens[0] * right.long()
    left = torch.ones(ROWS, SEQ, dtype=torch.long)
    left[0, :5] = 0  # left padding: pad queries see no key at all
    tokens[1] = tokens[1] * left
    segments = torch.tensor([[0] * 6 + [1] * 7 + [9] * 3, [0] * 3 + [1] * 3 + [2] * 10])
    return [
        (tokens[0], None, None, right),
        (tokens[1], position_ids_from_padding(left), attention_mask_from_padding(left), left.float()),
        (tokens[2], packed_position_ids(segments), packed_attention_mask(segments), (segments != 9).float()),
    ]


def _run(workdir, spec, tag, sequence_parallel=False):
    """Forward/backward over the three micro-batches; gathered logits and mean loss on the
    last stage; the gradients saved as a checkpoint ``grads_<tag>``."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from aligner.models import build_model, token_logprobs

    model = build_model(_model_cfg(spec), sequence_parallel=sequence_parallel)
    state = dist_checkpointing.load(model.sharded_state_dict(), f"{workdir}/weights")
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    logits = []

    def step(it, m):
        tokens, pos, mask, loss_mask = next(it)
        out = m(tokens, pos, mask)

        def loss_func(y):
            logits.append(gather_from_tensor_model_parallel_region(y).detach().clone())
            lp = token_logprobs(y[:, :-1], tokens[:, 1:])
            loss = -(lp * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(_microbatches()), model=[ddp], num_microbatches=3,
        seq_length=SEQ, micro_batch_size=ROWS, forward_only=False,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), _fresh(f"{workdir}/grads_{tag}"))
    torch.distributed.barrier()
    if not ps.is_pipeline_last_stage():
        return None
    return {"loss": [float(d["loss"]) for d in losses], "logits": logits}


def _fresh(path):
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    return path


def _attention_semantics():
    """SDPAttention directly: a row with no visible key attends uniformly (as megatron-core's
    masked softmax makes it); queries after a cache see keys up to their own position. Both
    specs' attention with a window of 2 keys, with and without a mask, after a cache."""
    from megatron.core.transformer.enums import AttnMaskType

    from aligner.models.layer_spec import LocalAttention, SDPAttention

    tc = _model_cfg("fused", window=None).to_transformer_config()
    attn = SDPAttention(tc, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, 1, n, 16, generator=g) for n in (4, 2, 2))  # [s, b, heads, d], GQA 4/2
    blocked = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    blocked[..., 0, :] = True  # query 0 sees nothing
    out = attn(q, k, v, blocked).view(5, 4, 16)
    v_full = v.repeat_interleave(2, dim=2)[:, 0]  # [s, heads, d]
    uniform = v_full.mean(0)  # every key, equal weight
    full = attn(q, k, v, None).view(5, 4, 16)
    tail = attn(q[2:], k, v, None).view(3, 4, 16)  # 3 queries after 2 cached keys, no mask
    windowed = {}
    wtc = _model_cfg("fused", window=2).to_transformer_config()
    for cls in (SDPAttention, LocalAttention):
        w = cls(wtc, 1, AttnMaskType.causal, "self")
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)[None, None]
        windowed[cls.__name__] = {"none": w(q, k, v, None).view(5, 4, 16), "causal": w(q, k, v, causal).view(5, 4, 16),
                                  "tail": w(q[3:], k, v, None).view(2, 4, 16)}
    band = torch.ones(5, 5, dtype=torch.bool).tril() & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)
    return {"row0": out[0], "uniform": uniform, "rows_after": out[1:], "unmasked_after": _softmax_ref(q, k, v)[1:],
            "full": full, "tail": tail, "windowed": windowed, "band_ref": _softmax_ref(q, k, v, band)}


def _softmax_ref(q, k, v, allowed=None):
    """Attention in plain torch (``allowed`` [sq, sk] or every key): [s, heads, d]."""
    k = k.repeat_interleave(2, dim=2)[:, 0]
    v = v.repeat_interleave(2, dim=2)[:, 0]
    scores = torch.einsum("qhd,khd->hqk", q[:, 0], k) / 4.0
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def world1(workdir):
    from megatron.core import dist_checkpointing

    from aligner.models import build_model

    initialize(ParallelConfig(seed=3))
    torch.manual_seed(3)
    model = build_model(_model_cfg("fused"))
    dist_checkpointing.save(model.sharded_state_dict(), _fresh(f"{workdir}/weights"))
    local = build_model(_model_cfg("local"))
    kinds = (type(model.decoder.layers[0].self_attention.core_attention).__name__,
             type(local.decoder.layers[0].self_attention.core_attention).__name__)
    return {"kinds": kinds, "local": _run(workdir, "local", "local"), "fused": _run(workdir, "fused", "fused1"),
            "attention": _attention_semantics()}


def world2(workdir):
    from megatron.core import parallel_state as ps

    out = {}
    for tag, tp, pp, sp in (("tp2", 2, 1, False), ("tp2sp", 2, 1, True), ("pp2", 1, 2, False)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        initialize(ParallelConfig(tp=tp, pp=pp, seed=3))
        out[tag] = _run(workdir, "fused", tag, sequence_parallel=sp)
    return out


def read_grads(workdir, tags):
    from megatron.core import dist_checkpointing

    from aligner.models import build_model

    initialize(ParallelConfig(seed=3))
    grads = {}
    for tag in tags:
        model = build_model(_model_cfg("local"))
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{workdir}/grads_{tag}"))
        grads[tag] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("layer_spec"))
    one = spawn_local(world1, 1, workdir, timeout=300)[0]
    two = spawn_local(world2, 2, workdir, timeout=400)
    grads = spawn_local(read_grads, 1, workdir, ["local", "fused1", "tp2", "tp2sp", "pp2"], timeout=300)[0]
    return {"one": one, "two": two, "grads": grads}


def _assert_grads_equal(actual, expected):
    assert actual.keys() == expected.keys() and len(expected) > 10
    for name in expected:
        assert expected[name].abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(actual[name], expected[name], atol=TOL, rtol=0, msg=name)


def _assert_outputs_equal(run, ref, mask_logits=True):
    assert len(run["loss"]) == len(ref["loss"]) == 3
    for got, want in zip(run["loss"], ref["loss"]):
        assert abs(got - want) < TOL
    masks = [m[3] for m in _microbatches()]
    for got, want, keep in zip(run["logits"], ref["logits"], masks):
        assert got.shape == want.shape == (ROWS, SEQ, 96)
        keep = keep.bool()[..., None].expand_as(got)  # logits at pad positions are not read
        torch.testing.assert_close(got[keep], want[keep], atol=TOL, rtol=0)


def test_fused_builds_sdpa_and_local_builds_megatron_attention_with_windows(runs):
    assert runs["one"]["kinds"] == ("SDPAttention", "LocalAttention")


def test_fused_equals_local_at_tp1(runs):
    one = runs["one"]
    _assert_outputs_equal(one["fused"], one["local"])
    assert min(one["local"]["loss"]) > 3.0  # random weights: about ln(96) = 4.56 nats per token
    _assert_grads_equal(runs["grads"]["fused1"], runs["grads"]["local"])


@pytest.mark.parametrize("tag", ["tp2", "pp2"])
def test_fused_at_tp2_and_pp2_equals_local_tp1(runs, tag):
    last = [r for r in (rank[tag] for rank in runs["two"]) if r is not None]
    assert len(last) == (2 if tag == "tp2" else 1)
    for run in last:
        _assert_outputs_equal(run, runs["one"]["local"])
    _assert_grads_equal(runs["grads"][tag], runs["grads"]["local"])


def test_sequence_parallel_equals_tensor_parallel(runs):
    for rank in runs["two"]:
        _assert_outputs_equal(rank["tp2sp"], rank["tp2"])
    _assert_grads_equal(runs["grads"]["tp2sp"], runs["grads"]["tp2"])
    _assert_grads_equal(runs["grads"]["tp2sp"], runs["grads"]["local"])


def test_attention_mask_semantics(runs):
    a = runs["one"]["attention"]
    # a query that may see no key attends to every key with equal weight (never NaN)
    torch.testing.assert_close(a["row0"], a["uniform"], atol=1e-6, rtol=0)
    # the other rows of that mask block nothing: plain softmax attention over all keys
    torch.testing.assert_close(a["rows_after"], a["unmasked_after"], atol=1e-6, rtol=0)
    # no mask, causal: the last query sees every key, earlier ones fewer
    torch.testing.assert_close(a["full"][4], a["unmasked_after"][3], atol=1e-6, rtol=0)
    assert (a["full"][1:4] - a["unmasked_after"][:3]).abs().max() > 1e-2
    # queries 2..4 after two cached keys see exactly what they see in the full causal pass
    torch.testing.assert_close(a["tail"], a["full"][2:], atol=1e-6, rtol=0)
    # a window of 2 keys: each query sees itself and the key before it, whether the causal
    # part comes from the layer or from a mask, and after a cache (both specs)
    for spec, w in a["windowed"].items():
        for case in ("none", "causal"):
            torch.testing.assert_close(w[case], a["band_ref"], atol=1e-6, rtol=0, msg=f"{spec} {case}")
        torch.testing.assert_close(w["tail"], a["band_ref"][3:], atol=1e-6, rtol=0, msg=spec)


# -- selection and refusals (no process group) ----------------------------------------------
def test_auto_picks_fused_without_te_and_explicit_choices_are_checked():
    from aligner.models.layer_spec import describe_layer_spec, resolve_layer_spec, te_available

    if torch.cuda.is_available() and te_available()[0]:
        pytest.skip("Transformer Engine is usable here: auto picks te")
    assert resolve_layer_spec("auto") == "fused"
    assert resolve_layer_spec("local") == "local" and resolve_layer_spec("fused") == "fused"
    with pytest.raises(ValueError, match="model.layer_spec = te needs Transformer Engine on a GPU"):
        resolve_layer_spec("te")
    with pytest.raises(ValueError, match=r"model.layer_spec = 'flash'; expected one of \('auto', 'te', 'fused', 'local'\)"):
        resolve_layer_spec("flash")
    assert describe_layer_spec().startswith("fused: megatron-core modules + torch scaled_dot_product_attention")
    assert "(auto; TE spec unavailable:" in describe_layer_spec()


def test_model_config_key():
    from aligner.models import ModelConfig

    with pytest.raises(ValueError, match="model.layer_spec = 'fast'; expected one of"):
        ModelConfig(layer_spec="fast")
    cfg = ModelConfig(layer_spec="local")
    assert "layer_spec" not in cfg.to_dict()  # checkpoints and exports carry the architecture only
    assert cfg == ModelConfig(layer_spec="fused")
    assert ModelConfig.preset("tiny").layer_spec == "auto"


def test_context_parallel_and_sequence_parallel_refusals():
    from aligner.models.layer_spec import check_parallel_support

    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelConfig(cp=2), 2, layer_spec="fused")
    assert str(err.value) == (
        "parallel.cp = 2: context parallelism needs Transformer Engine's attention, and this install builds"
        " the 'fused' layer spec, which has no context-parallel attention; set parallel.cp = 1")
    assert "\n" not in str(err.value)
    assert validate_layout(ParallelConfig(cp=2), 2, layer_spec="te") == 1
    assert validate_layout(ParallelConfig(cp=2), 2) == 1  # spec unknown: left to the model build
    with pytest.raises(LayoutError, match="parallel.sequence_parallel = true is not supported by the 'local'"):
        check_parallel_support("local", sequence_parallel=True)
    with pytest.raises(LayoutError, match="parallel.cp = 2 needs Transformer Engine's context-parallel attention"):
        check_parallel_support("fused", context_parallel=2)
    check_parallel_support("fused", sequence_parallel=True)


def test_train_cli_refuses_context_parallelism_in_one_line(tmp_path):
    import sys

    from tests import pyproc

    if torch.cuda.is_available():
        pytest.skip("on a GPU the refusal depends on Transformer Engine")
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = pyproc.run(
        [sys.executable, "-W", "ignore", "-m", "aligner.cli.main", "train", "sft", "parallel.cp=2",
         "data.train=unused.jsonl", "data.tokenizer=unused.model", f"trainer.out_dir={tmp_path}"],
        timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aligner train:")]
    assert lines == ["aligner train: error: parallel.cp = 2 needs Transformer Engine's context-parallel attention;"
                     " the 'fused' layer spec has none (use parallel.cp = 1 or a TE install on GPUs)"]
    assert "Traceback" not in proc.stderr


def test_env_reports_the_spec(capsys):
    from aligner.cli import main as cli

    assert cli.main(["env"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("layer_spec"))
    if not torch.cuda.is_available():
        assert line.split(None, 1)[1].startswith("fused: ")
