#!/usr/bin/env bash
# One GPU session's checks in one command: build the CUDA extension, run every
# needs_cuda test, run each benchmark on the GPU, and leave logs and JSON in OUTDIR.
# Usage (repository root, on a machine with a GPU and nvcc):
#   bash benchmarks/run_gpu_checks.sh OUTDIR [kernels] [regions] [training]
# With no benchmark names, all three run; KERNELS_ARGS, REGIONS_ARGS, TRAINING_ARGS
# add options to a benchmark (e.g. TRAINING_ARGS="--synthetic" where the datasets are
# absent). Wheels in .whl/ (e.g. faiss-cpu for a machine without network) are
# installed to /tmp/site first.
set -uo pipefail
out=${1:-gpu-results}
shift || true
benches=("$@")
[ "${#benches[@]}" -eq 0 ] && benches=(kernels regions training)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# A g++ that links libstdc++ statically gives the extension its own copy of the C++
# library, and the first error message with a number in it crashes the process
# (mismatched locale facets). Prefer the distribution's compiler when there is one.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
if ! python -m pip install -v --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"; echo "build failed"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s; $(python -c 'import certssb; print(certssb.build_info())')"
ldd certssb/_C*.so | grep -q 'libstdc++' || echo "WARNING: certssb/_C links libstdc++ statically"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python -m pytest -q -p no:cacheprovider -m needs_cuda tests >"$out/pytest-cuda.log" 2>&1
echo "needs_cuda tests (rc $?): $(tail -n 1 "$out/pytest-cuda.log")"
grep -E "^(FAILED|ERROR)" "$out/pytest-cuda.log" | head -n 20
for b in "${benches[@]}"; do
  t0=$(date +%s)
  extra_var="${b^^}_ARGS"
  # shellcheck disable=SC2086  # the extra options are meant to split
  timeout "${BENCH_TIMEOUT:-150}" python "benchmarks/bench_$b.py" --device cuda --json "$out/$b-cuda.json" \
    ${!extra_var:-} >"$out/bench-$b.log" 2>&1
  echo "bench_$b (rc $?, $(( $(date +%s) - t0 )) s):"
  tail -n 16 "$out/bench-$b.log"
done
