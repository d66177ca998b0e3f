"""megatron-core's own GPTModel (local spec) under TP / PP / DP on this machine.

One set of weights is made at world size 1 and saved with dist_checkpointing; every
layout loads it, so all layouts compute with the same weights. Gradients of a sharded
layout are written as a checkpoint too and read back at TP=1 by megatron-core's own
resharding, then compared name by name with the single-process gradients.
"""
import os

import pytest
import torch

from aligner.parallel import ParallelConfig, destroy, initialize
from aligner.parallel.spawn import spawn_local

VOCAB, SEQ, LAYERS, HEADS, HIDDEN = 64, 8, 4, 4, 32
NUM_MICRO, MICRO_BATCH = 4, 2
TOL = 1e-5


def _build(pre_process=None, post_process=None):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=2,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
    )


def _batch(n):
    """n sequences of SEQ tokens, labels shifted by one; identical in every process."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _inputs(tokens):
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return position_ids, causal


def _save(model, path):
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    torch.distributed.barrier()


def _load(model, path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state)


def _grads_into_params(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad if getattr(p, "main_grad", None) is not None else p.grad)


def _gather_vocab(logits):
    """Vocab-parallel logits [b, s, v/p] -> full [b, s, v] over the TP group."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def make_reference(workdir):
    """World size 1: fresh weights, saved; logits, loss and gradients on the full batch."""
    initialize(ParallelConfig(seed=11))
    model = _build()
    _save(model, f"{workdir}/weights")
    tokens, labels = _batch(NUM_MICRO * MICRO_BATCH)
    pos, mask = _inputs(tokens)
    logits = model(tokens, pos, mask)
    loss = model(tokens, pos, mask, labels=labels).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads}


def run_tp(workdir, tp):
    """TP: full-batch forward/backward; gathered logits; gradients saved as a checkpoint."""
    initialize(ParallelConfig(tp=tp, seed=11))
    model = _build()
    _load(model, f"{workdir}/weights")
    tokens, labels = _batch(NUM_MICRO * MICRO_BATCH)
    pos, mask = _inputs(tokens)
    logits = _gather_vocab(model(tokens, pos, mask)).detach()
    loss = model(tokens, pos, mask, labels=labels).mean()
    loss.backward()
    _grads_into_params(model)
    _save(model, f"{workdir}/grads_tp{tp}")
    return {"logits": logits, "loss": loss.item()}


def run_pipeline(workdir, tp, pp, tag):
    """1F1B over NUM_MICRO micro-batches; returns the mean loss on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    initialize(ParallelConfig(tp=tp, pp=pp, seed=11))
    model = _build()
    _load(model, f"{workdir}/weights")
    tokens, labels = _batch(NUM_MICRO * MICRO_BATCH)
    micro = iter(
        [(tokens[i : i + MICRO_BATCH], labels[i : i + MICRO_BATCH]) for i in range(0, len(tokens), MICRO_BATCH)]
    )

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        pos, mask = _inputs(tok)
        out = model(tok, pos, mask, labels=lab)

        def loss_func(per_token):
            loss = per_token.mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule scales loss in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro,
        model=[model],
        num_microbatches=NUM_MICRO,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    _grads_into_params(model)
    _save(model, f"{workdir}/grads_{tag}")
    if ps.is_pipeline_last_stage():
        return float(torch.stack([d["loss"] for d in losses]).mean())
    return None


def run_dp(workdir, dp):
    """DDP with megatron-core's grad buffers: each rank takes 1/dp of the batch."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.parallel_state import get_data_parallel_rank

    initialize(ParallelConfig(seed=11))
    model = _build()
    _load(model, f"{workdir}/weights")
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=True),
        model,
    )
    tokens, labels = _batch(NUM_MICRO * MICRO_BATCH)
    shard = len(tokens) // dp
    rank = get_data_parallel_rank()
    tok, lab = tokens[rank * shard : (rank + 1) * shard], labels[rank * shard : (rank + 1) * shard]
    pos, mask = _inputs(tok)
    ddp.zero_grad_buffer()
    ddp(tok, pos, mask, labels=lab).mean().backward()
    ddp.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}


def read_grads(workdir, tags):
    """World size 1: read each sharded gradient checkpoint back as TP=1 tensors."""
    initialize(ParallelConfig(seed=11))
    out = {}
    for tag in tags:
        model = _build()
        _load(model, f"{workdir}/grads_{tag}")
        out[tag] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gpt_parallel"))
    ref = spawn_local(make_reference, 1, workdir, timeout=240)[0]
    tp2 = spawn_local(run_tp, 2, workdir, 2, timeout=240)
    pp1 = spawn_local(run_pipeline, 1, workdir, 1, 1, "pp1", timeout=240)[0]
    pp2 = spawn_local(run_pipeline, 2, workdir, 1, 2, "pp2", timeout=240)
    dp2 = spawn_local(run_dp, 2, workdir, 2, timeout=240)
    tp2pp2 = spawn_local(run_pipeline, 4, workdir, 2, 2, "tp2pp2", timeout=300)
    grads = spawn_local(read_grads, 1, workdir, ["tp2", "pp1", "pp2", "tp2pp2"], timeout=240)[0]
    return dict(ref=ref, tp2=tp2, pp1=pp1, pp2=pp2, dp2=dp2, tp2pp2=tp2pp2, grads=grads)


def _assert_grads_equal(actual, expected, tol=TOL):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=tol, rtol=0, msg=name)


def test_tp2_logits_equal_tp1(runs):
    ref = runs["ref"]
    for rank_out in runs["tp2"]:
        assert rank_out["logits"].shape == ref["logits"].shape == (NUM_MICRO * MICRO_BATCH, SEQ, VOCAB)
        torch.testing.assert_close(rank_out["logits"], ref["logits"], atol=TOL, rtol=0)
        assert abs(rank_out["loss"] - ref["loss"]) < TOL


def test_tp2_gathered_grads_equal_tp1(runs):
    _assert_grads_equal(runs["grads"]["tp2"], runs["ref"]["grads"])


def test_pp2_1f1b_loss_and_grads_equal_pp1(runs):
    ref = runs["ref"]
    # Equal-sized micro-batches: the mean of per-micro-batch means is the full-batch mean.
    assert abs(runs["pp1"] - ref["loss"]) < TOL
    first, last = runs["pp2"]
    assert first is None and abs(last - ref["loss"]) < TOL
    _assert_grads_equal(runs["grads"]["pp1"], ref["grads"])
    _assert_grads_equal(runs["grads"]["pp2"], ref["grads"])


def test_dp2_grads_equal_single_process_with_doubled_batch(runs):
    for rank_grads in runs["dp2"]:
        _assert_grads_equal(rank_grads, runs["ref"]["grads"])


def test_world4_tp2_pp2(runs):
    losses = runs["tp2pp2"]
    last_stage = [x for x in losses if x is not None]
    assert len(last_stage) == 2  # both TP ranks of the last stage report the loss
    for loss in last_stage:
        assert abs(loss - runs["ref"]["loss"]) < TOL
    _assert_grads_equal(runs["grads"]["tp2pp2"], runs["ref"]["grads"])
