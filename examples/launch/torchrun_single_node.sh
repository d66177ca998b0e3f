#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU machine gloo is used instead of NCCL).
#   NPROC=8 TP=8 PP=1 CONFIG=dpo bash examples/launch/torchrun_single_node.sh init.hf=/models/llama data.train=pairs.jsonl
# Any further arguments are Hydra overrides for `aligner train`.
set -euo pipefail
NPROC=${NPROC:-8}
TP=${TP:-1}
PP=${PP:-1}
CONFIG=${CONFIG:-sft}
exec torchrun --standalone --nproc-per-node "${NPROC}" -m aligner.cli.main train "${CONFIG}" \
  parallel.tp="${TP}" parallel.pp="${PP}" "$@"
