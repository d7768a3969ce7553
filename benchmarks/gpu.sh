#!/usr/bin/env bash
# One command for a GPU machine with CuPy: the test suite's CuPy cases, the benchmark
# table on the GPU, and fig1b end to end.  Results land in ${OUT:-results}/.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
python3 -c "import cupy; print('CuPy', cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
python3 -m pytest -q -k "cupy" tests 2>&1 | tee "$out/gpu-tests.log" | tail -3
python3 benchmarks/bench.py --device gpu --out "$out" 2>&1 | tee "$out/gpu-bench.log"
python3 experiments.py fig1b --device gpu --out "$out" -q 2>&1 | tee "$out/gpu-fig1b.log"
