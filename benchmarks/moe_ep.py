"""Training step time of a Mixtral-shaped model at expert-parallel size 1 and 2, and the
share of it spent in the token dispatcher.

    OMP_NUM_THREADS=1 python benchmarks/moe_ep.py [--steps 6] [--hidden 256] [--experts 8] ...

Two local ranks (gloo on a CPU, NCCL on GPUs), the same model and data per rank in both
layouts: EP=1 (every rank holds every expert, the data-parallel pair all-reduces every
gradient; megatron-core's ``allgather`` dispatcher, which at EP=1 and TP=1 moves nothing)
and EP=2 (each rank holds half the experts; megatron-core's ``alltoall`` dispatcher sends
each token to the rank of its experts and back; expert gradients are not all-reduced).
A step is one forward-backward of ``--micro-batches`` micro-batches of ``--batch`` x
``--seq`` random tokens and one Adam step (megatron-core DDP and optimizer, fp32).

Dispatch time: wall time inside the dispatcher's ``token_dispatch`` and
``token_combine`` (the collectives of the forward pass: all-to-all at EP=2), and inside the
backward of megatron-core's all-to-all (the same exchange reversed), summed over MoE
layers; timers around megatron-core's own methods. ``dispatch_pre_post``: the local
permutations around them (``dispatch_preprocess`` / ``dispatch_postprocess`` /
``combine_preprocess`` / ``combine_postprocess``). The first ``--warmup`` steps are not
timed; the median step is reported, in wall time and in the CPU time of one rank's process
(``time.process_time``: less sensitive than wall time to other work on the machine). The two layouts run one after the other, ``--rounds``
times interleaved (EP=1, EP=2, EP=1, ...), so both see the same machine load.
Also the parameters a rank holds (experts are most of them). Prints a markdown table (the
one in docs/moe.md).
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch

from aligner.parallel.spawn import spawn_local

_TIMES = defaultdict(float)


def _timed(cls, name, key):
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _TIMES[key] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def _instrument():
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher as td

    for cls in (td.MoEAllGatherTokenDispatcher, td.MoEAlltoAllTokenDispatcher):
        for name in ("token_dispatch", "token_combine"):
            _timed(cls, name, "dispatch")
        for name in ("dispatch_preprocess", "dispatch_postprocess", "combine_preprocess", "combine_postprocess"):
            _timed(cls, name, "dispatch_pre_post")
    # the backward of an all-to-all is the reverse all-to-all, outside the dispatcher's methods
    original = mappings._AllToAll.backward

    def backward(ctx, *grads):
        start = time.perf_counter()
        try:
            return original(ctx, *grads)
        finally:
            _TIMES["dispatch"] += time.perf_counter() - start

    mappings._AllToAll.backward = staticmethod(backward)


def run(args, ep):
    from megatron.core import parallel_state as ps

    from aligner.models import ModelConfig, build_model
    from aligner.parallel import ParallelConfig, get_device, initialize, set_seed
    from aligner.training.config import OptimSection
    from aligner.training.roles import build_trainable_role, run_schedule

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    initialize(ParallelConfig(ep=ep, seed=1))
    set_seed(1)
    cfg = ModelConfig(vocab_size=1024, hidden_size=args.hidden, ffn_hidden_size=args.expert_ffn,
                      num_layers=args.layers, num_attention_heads=8, num_query_groups=4,
                      max_position_embeddings=args.seq, num_experts=args.experts, moe_router_topk=2,
                      arch="mixtral")
    model = build_model(cfg).to(get_device())
    role = build_trainable_role("policy", [model], OptimSection(lr=1e-4, warmup_steps=0), max_steps=args.steps)
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    batches = [{"tokens": torch.randint(1, cfg.vocab_size, (args.batch, args.seq), generator=g)}
               for _ in range(args.micro_batches)]

    def forward(m, batch):
        return m(batch["tokens"], None, None)

    def loss(batch, logits):
        return logits.float().mean(), 1, {}

    params = sum(p.numel() for p in model.parameters())
    steps = []
    for step in range(args.warmup + args.steps):
        _TIMES.clear()
        torch.distributed.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        role.zero_grad()
        run_schedule(role.chunks, batches, forward, loss, forward_only=False)
        role.step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if step >= args.warmup:
            steps.append((elapsed, _TIMES["dispatch"], _TIMES["dispatch_pre_post"], params, cpu))
    return steps


def job(args):
    out = defaultdict(list)
    _instrument()
    for _ in range(args.rounds):
        for ep in (1, 2):
            out[ep] += run(args, ep)
    return dict(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    ranks = spawn_local(job, 2, args, timeout=3600)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width {args.expert_ffn}"
          f" (top-2); {args.micro_batches} micro-batches of {args.batch} x {args.seq} tokens per rank; 2 ranks")
    print("| layout | parameters per rank | step (s, median) | CPU s per rank | dispatch (s) | share |"
          " permutations (s) |")
    print("|---|---|---|---|---|---|---|")
    for ep in (1, 2):
        rows = [r for rank in ranks for r in rank[ep]]
        step = statistics.median(r[0] for r in rows)
        dispatch = statistics.median(r[1] for r in rows)
        pre_post = statistics.median(r[2] for r in rows)
        params, cpu = rows[0][3] / 1e6, statistics.median(r[4] for r in rows)
        print(f"| EP={ep} x DP=2 | {params:.2f} M | {step:.3f} | {cpu:.3f} | {dispatch:.3f} |"
              f" {100 * dispatch / step:.1f} % | {pre_post:.3f} |")


if __name__ == "__main__":
    main()
