#!/usr/bin/env bash
# Every GPU check of certssb in one run of at most 9 minutes on one H100:
#   1. build the extension (CXX=/usr/bin/g++)          5. the full mnist-1v0-published cell (M = 1000,
#   2. the needs_cuda tests                                20 epochs, RAB and Cert-SSB, both bounds)
#   3. bench_kernels                                    6. if time is left, the full cifar10-airplane-bird
#   4. bench_training on the real MNIST 1-vs-0: every      one-pixel sigma0 0.25 cell
#      engine beside the serial RAB-style loop
# and OUTDIR/gpu-checks.json ({"device", "torch", "date", "steps", "cells", "benchmarks"}), beside the
# benchmark JSONs and one log: at most 5 files. Back on a CPU machine:
#   cp OUTDIR/gpu-checks.json docs/results/ && certssb pages --gpu-checks docs/results/gpu-checks.json
#
# Usage (repository root):
#   python benchmarks/gpu_checks.py prepare-data        # once, where the data live: -> .gpu-data/ (22 MB)
#   bash benchmarks/gpu_checks.sh [--dry-run] [--data-dir DIR] [--budget S] OUTDIR
# --data-dir: the folder holding mnist/ and cifar10-jpeg/ (default .gpu-data); --budget: seconds for
# everything (default 540); --dry-run: the same steps on the CPU with tiny settings on the embedded
# digits (no build, no data, seconds): CI runs it so this script cannot rot.
# Environment: CELL_ENGINE (default: the fastest engine bench_training measured, else auto),
# RUNS (where the cells' run directories go; default /tmp/certssb-gpu-runs, not OUTDIR: 2000 models).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0; data=.gpu-data; budget=540; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --data-dir) data=$2; shift ;;
    --budget) budget=$2; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "usage: bash benchmarks/gpu_checks.sh [--dry-run] [--data-dir DIR] OUTDIR" >&2; exit 2; }
mkdir -p "$out"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
runs=${RUNS:-/tmp/certssb-gpu-runs}; [ "$dry" = 1 ] && runs="$work/runs"
log="$out/gpu-checks.log"; : >"$log"
steps="$work/steps.tsv"; : >"$steps"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

# step NAME CAP_SECONDS CMD...: runs CMD (output to the log) under min(CAP, time left - 15 s), records it
step() {
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 15 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 5 ]; then
    printf '%s\t0\tskip\n' "$name" >>"$steps"; echo "[gpu_checks] $name: skipped (no time left)" | tee -a "$log"
    return 0
  fi
  local t0; t0=$(date +%s.%N)
  echo "=== [gpu_checks] $name (limit ${t} s): $*" >>"$log"
  timeout "$t" "$@" >>"$log" 2>&1
  local rc=$?
  local s; s=$(python -c "import time; print(round(time.time() - $t0, 1))")
  printf '%s\t%s\t%s\n' "$name" "$s" "$rc" >>"$steps"
  echo "[gpu_checks] $name: rc $rc, $s s" | tee -a "$log"
}
skip() { printf '%s\t0\tskip\n' "$1" >>"$steps"; echo "[gpu_checks] $1: skipped ($2)" | tee -a "$log"; }

if [ "$dry" = 1 ]; then
  dev=cpu
  skip build "dry run"
  skip needs_cuda-tests "dry run"
  step bench_kernels 60 python benchmarks/bench_kernels.py --smoke --json "$out/bench-kernels.json"
  step bench_training 60 python benchmarks/bench_training.py --smoke --engines fp32,fp32+bmm,bf16 \
    --json "$out/bench-training.json"
  cell_set='{"device": "cpu", "dataset": "digits", "engine": "auto"}'
  step cell-mnist-1v0-published 90 python benchmarks/gpu_checks.py cells --experiment mnist-1v0-published \
    --scale smoke --runs "$runs" --cells default,method-rab_sigma0-0.12 --bounds hoeffding,clopper-pearson \
    --set "$cell_set"
  skip cell-cifar10-airplane-bird "dry run"
else
  dev=cuda
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    # a g++ that links libstdc++ statically crashes the extension on its first error message
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
  fi
  step build 240 python -m pip install -v --no-build-isolation --no-deps -e .
  python -c 'import certssb; print(certssb.build_info())' >>"$log" 2>&1
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >>"$log" 2>&1
  step needs_cuda-tests 90 python -m pytest -q -p no:cacheprovider -m needs_cuda tests
  step bench_kernels 45 python benchmarks/bench_kernels.py --device cuda --json "$out/bench-kernels.json"
  step bench_training 150 python benchmarks/bench_training.py --device cuda --data-dir "$data" --epochs 1 \
    --engines all --json "$out/bench-training.json" --md "$work/training.md"
  engine=${CELL_ENGINE:-$(python -c "import json,sys; print(json.load(open(sys.argv[1])).get('fastest_engine') or 'auto')" \
    "$out/bench-training.json" 2>/dev/null || echo auto)}
  echo "[gpu_checks] cells run with engine $engine" | tee -a "$log"
  cell_set="{\"device\": \"cuda\", \"data_dir\": \"$data\", \"engine\": \"$engine\"}"
  step cell-mnist-1v0-published 100000 python benchmarks/gpu_checks.py cells --experiment mnist-1v0-published \
    --scale full --runs "$runs" --cells default,method-rab_sigma0-0.12 --bounds hoeffding,clopper-pearson \
    --set "$cell_set"
  step cell-cifar10-airplane-bird 100000 python benchmarks/gpu_checks.py cells --experiment cifar10-airplane-bird \
    --scale full --runs "$runs" --only trigger=onepixel --only sigma0=0.25 --set "$cell_set"
fi
python benchmarks/gpu_checks.py assemble --out "$out" --steps "$steps" --runs "$runs" \
  --bench-training "$out/bench-training.json" --bench-kernels "$out/bench-kernels.json" \
  $([ "$dry" = 1 ] && echo --dry-run) 2>&1 | tee -a "$log"
echo "[gpu_checks] $(( $(date +%s) - start )) s in all on $dev; files in $out: $(ls "$out" | tr '\n' ' ')"
