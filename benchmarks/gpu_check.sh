#!/usr/bin/env bash
# Every CUDA path of robustify in one run (sized for at most 8 minutes on one modern GPU):
#
#   meansparse      MeanSparse eager/fused/compiled overhead vs the base model (bench_meansparse.py --compile);
#                   fast path, fused path and the published operator must give identical outputs
#   calibration     calibration throughput and the alpha sweep (bench_calibration.py)
#   eval_overhead   robustify.evaluation.engine vs pyautoattack called directly: per-example results must be identical
#   compiled_eval   evaluation of the compiled model vs eager (bench_compiled_eval.py)
#   precision_eval  bfloat16/float16 evaluation vs float32; MeanSparse statistics must stay float32, unchanged
#   torchrun_eval   torchrun with nccl (one process per GPU) vs one process: results must be identical;
#                   needs 2 GPUs (NCCL refuses two ranks on one device): with one GPU it is skipped, saying so
#
# Usage:  bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#
# Writes OUTDIR/<step>.csv, OUTDIR/<step>.log and OUTDIR/summary.csv (step, status, seconds). Exits non-zero
# when any step fails, which includes every result that must be identical and is not.
# --dry-run: everything tiny on the CPU (the tests' tiny CNN, gloo instead of nccl, no torch.compile because
# compiling on a CPU takes minutes), so that the test suite can run this script (tests/test_gpu_check.py).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0
for arg in "$@"; do
  case $arg in --dry-run) DRY=1 ;; *) usage ;; esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python}
export PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"  # tests/tinynets.py: the dry run's model
B=benchmarks

if [ $DRY = 1 ]; then
  DEV=cpu
  SCALE=3  # step time limits: a busy CPU starts Python slowly
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  M=tinynets:tiny_cnn
  D="$OUT/tiny.npz"  # random images labelled by the tiny CNN, so that attacks have examples to break
  "$PY" -c "import sys; from tinynets import write_labelled_npz; write_labelled_npz(sys.argv[1], 128, 64)" "$D" || exit 2
  MEANSPARSE=(--models "$M:8" --reps 1 --no-compile --threads 1)
  CALIBRATION=(--model "$M" --sections calibration alpha_sweep --images 64 --batch 32 --reps 1 --sweep 2
               --eval-images 16 --threads 1)
  EVAL=(--model "$M" --data "$D" --n 16 --iters 2 --reps 1 --batch-size 16)
  COMPILED=()  # skipped: torch.compile on a CPU takes minutes
  PRECISION=(--model "$M" --data "$D" --n 16 --iters 2 --batch-size 16 --n-calib 64 --threads 1)
  TORCHRUN=(--model "$M" --data "$D" --n 16 --iters 2 --n-calib 64 --nproc 2 --device cpu)
else
  DEV=cuda
  SCALE=1
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (use --dry-run for the CPU check)" >&2
    exit 2
  fi
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  MEANSPARSE=(--models aa-resnet18:256 --reps 7 --compile)
  CALIBRATION=(--sections calibration alpha_sweep --images 4096 --batch 256 --reps 3 --sweep 4 --eval-images 1000)
  EVAL=(--n 512 --iters 20 --reps 3 --batch-size 256)
  COMPILED=(--n 512 --iters 10 --reps 3 --batch-size 256)
  PRECISION=(--n 512 --iters 20 --batch-size 256 --n-calib 4096)
  TORCHRUN=(--n 512 --iters 20 --n-calib 4096 --nproc 2 --device cuda)
fi

FAILED=0
echo "step,status,seconds" > "$OUT/summary.csv"
record() { echo "$1,$2,$3" >> "$OUT/summary.csv"; echo "gpu_check: $1: $2 ($3 s)"; }

# step NAME TIMEOUT_S SCRIPT ARGS...: run one benchmark, its CSV in OUTDIR, its output in OUTDIR/NAME.log
step() {
  local name=$1 limit=$(($2 * SCALE)) script=$3; shift 3
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$PY" "$B/$script" "$@" --out "$OUT/$name.csv" > "$OUT/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="FAILED: timed out after $limit s"; FAILED=1 ;;
    *) status="FAILED: see $name.log ($(tail -n 1 "$OUT/$name.log" | tr -d ',' | cut -c1-160))"; FAILED=1 ;;
  esac
  if [ "$status" = ok ] && [ ! -s "$OUT/$name.csv" ]; then status="FAILED: no $name.csv"; FAILED=1; fi
  record "$name" "$status" $((SECONDS - start))
}

skip() { record "$1" "skipped: $2" 0; }

# time limits per step (GPU; x3 in the dry run) add up to 8 minutes: a step over its limit fails
step meansparse 120 bench_meansparse.py --device "$DEV" "${MEANSPARSE[@]}"
step calibration 50 bench_calibration.py --device "$DEV" "${CALIBRATION[@]}"
step eval_overhead 50 bench_eval_overhead.py --device "$DEV" "${EVAL[@]}"
if [ ${#COMPILED[@]} -gt 0 ]; then
  step compiled_eval 120 bench_compiled_eval.py --device "$DEV" "${COMPILED[@]}"
else
  skip compiled_eval "dry run (torch.compile on a CPU takes minutes)"
fi
step precision_eval 50 bench_precision_eval.py --device "$DEV" "${PRECISION[@]}"
if [ $DRY = 1 ] || [ "${NGPU:-0}" -ge 2 ]; then
  step torchrun_eval 90 bench_torchrun_eval.py "${TORCHRUN[@]}"
else
  skip torchrun_eval "torchrun with nccl needs 2 GPUs (NCCL refuses two ranks on one GPU); this machine has ${NGPU:-0}"
fi

if [ $FAILED = 1 ]; then
  echo "gpu_check: FAILED (see $OUT/summary.csv)" >&2
  exit 1
fi
echo "gpu_check: all steps passed; CSVs in $OUT"
