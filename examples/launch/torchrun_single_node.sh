#!/usr/bin/env bash
# One node, NPROC processes (one per GPU; without CUDA the ranks use gloo on the CPU).
#
#   NPROC=8 TP=8 CONFIG=dpo bash examples/launch/torchrun_single_node.sh \
#       init.hf=/models/Llama-3.1-8B-Instruct data.train=/data/pairs.jsonl trainer.max_steps=500
#
# Variables (all optional):
#   NPROC    processes on this node (default: the GPU count, else 2)
#   TP, PP   tensor / pipeline parallel sizes (default 1, 1); data parallelism is what is
#            left: NPROC / (TP * PP), which must be a whole number
#   VPP      virtual pipeline stages per rank (interleaved 1F1B; needs PP > 1)
#   CONFIG   top-level config in conf/ (default sft; `aligner train --list` names them)
#   PORT     rendezvous port on localhost (default: torchrun --standalone picks a free one)
# Further arguments are Hydra overrides for `aligner train` (key=value).
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=2
fi
TP=${TP:-1}
PP=${PP:-1}
CONFIG=${CONFIG:-sft}

LAYOUT=(parallel.tp="${TP}" parallel.pp="${PP}")
[[ -n "${VPP:-}" ]] && LAYOUT+=(parallel.vpp="${VPP}")

if [[ -n "${PORT:-}" ]]; then
  RDZV=(--nnodes=1 --rdzv-backend=c10d --rdzv-endpoint="localhost:${PORT}")
else
  RDZV=(--standalone)
fi

# OMP threads per rank: the cores shared out, so CPU ranks do not oversubscribe.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

set -x
exec torchrun "${RDZV[@]}" --nproc-per-node="${NPROC}" -m aligner.cli.main \
  train "${CONFIG}" "${LAYOUT[@]}" "$@"
