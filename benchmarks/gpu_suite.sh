#!/usr/bin/env bash
# The GPU path in one prepared run (about 6 minutes on one H100/H200), from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # on the GPU machine
#   OUT=/tmp/smoke bash benchmarks/gpu_suite.sh --smoke   # toy sizes on a CPU: checks the script
#
# 0. installs the wheels carried in $WHEELS (default wheels/: megatron-core, hydra-core,
#    omegaconf, antlr4 runtime; no network, no dependency resolution: everything else is in
#    the device image), builds the packing extension, records `aligner env`;
# 1. the device test subset (tests/models/test_device_subset.py: HF parity, generation
#    parity, DPO step 0), world size 1, NCCL;
# 2. SFT / reward-model training tokens/s and MFU on conf/model/llama_1b.yaml (bf16,
#    sequence 4096, packed); model FLOPs as benchmarks/flops.py states them;
# 3. generation tokens/s against transformers generate (bf16, static cache), batch 1, 16, 64;
# 4. DPO step time against TRL on the same work (bf16).
# Writes $OUT/{env,tests,train,generate,dpo}.json, $OUT/summary.json and $OUT/summary.md.
# A failing step is recorded and the suite goes on; the exit status is that of the worst step.
# Each step has its own time limit ($LIMIT_* seconds) so the whole run stays within budget.
set -uo pipefail

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:?set OUT to the folder the results go to}"
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
STATUS=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -ne 0 ]] && { tail -n 20 "$OUT/$name.log"; STATUS=$rc; }
  return $rc
}

# 0. setup
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  step install 60 "$PY" -m pip install --no-index --no-deps --quiet "$WHEELS"/*.whl
fi
step build_ext 90 "$PY" setup.py -q build_ext --inplace
"$PY" -m aligner.cli.main env --json >"$OUT/env.json" 2>"$OUT/env.log" || STATUS=1

if [[ $SMOKE == 1 ]]; then
  export ALIGNER_DEVICE_SUBSET_ON_CPU=1
  TRAIN_ARGS=(--smoke --seq 256 --bins 2 --steps 2 --warmup 1 --dtype fp32)
  GEN_ARGS=(--smoke --batches 1,4 --prompt-len 8 --new-tokens 8 --reps 1 --dtype fp32)
  DPO_ARGS=(--pairs 8 --steps 2 --batch 4 --prompt-len 8 --resp-len 8 --hidden 64 --layers 2 --repeats 1)
  LIMIT_TESTS=600 LIMIT_TRAIN=600 LIMIT_GEN=600 LIMIT_DPO=600
else
  TRAIN_ARGS=(--model llama_1b --seq 4096 --bins 8 --steps 5 --warmup 2 --dtype bf16)
  GEN_ARGS=(--model llama_1b --batches 1,16,64 --prompt-len 128 --new-tokens 128 --reps 2 --dtype bf16)
  DPO_ARGS=(--device cuda --bf16 --pairs 256 --steps 16 --batch 16 --prompt-len 256 --resp-len 256
            --hidden 1024 --layers 8 --repeats 1)
  LIMIT_TESTS=120 LIMIT_TRAIN=120 LIMIT_GEN=120 LIMIT_DPO=100
fi

# 1. device test subset
step tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/models/test_device_subset.py
"$PY" - "$OUT" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
log = (out / "tests.log").read_text() if (out / "tests.log").is_file() else ""
last = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
ok = bool(last) and "failed" not in last[-1] and "error" not in last[-1]
(out / "tests.json").write_text(json.dumps({"returncode": 0 if ok else 1, "summary": last[-1] if last else "no result"}))
EOF

# 2. training throughput and MFU
step train "$LIMIT_TRAIN" "$PY" benchmarks/gpu_bench.py train --out "$OUT/train.json" "${TRAIN_ARGS[@]}"
# 3. generation against transformers
step generate "$LIMIT_GEN" "$PY" benchmarks/gpu_bench.py generate --out "$OUT/generate.json" "${GEN_ARGS[@]}"
# 4. DPO against TRL
step dpo "$LIMIT_DPO" "$PY" benchmarks/bench_dpo.py --json "$OUT/dpo.json" "${DPO_ARGS[@]}"

"$PY" benchmarks/gpu_bench.py report "$OUT" || STATUS=1
exit $STATUS
