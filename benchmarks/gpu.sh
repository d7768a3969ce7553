#!/usr/bin/env bash
# One command for a GPU machine with CuPy: the test suite's CuPy cases, every experiment
# quickly on the GPU, whether measuring overlaps the steps (overlap.py), and the benchmark
# table (with fig1a/1b/1c/2b end to end) on the GPU.
# Logs and bench.json land in ${OUT:-results}/; experiment outputs in a scratch folder.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out=${OUT:-results}
scratch=$(mktemp -d)
mkdir -p "$out"
nvidia-smi -L
python3 -c "import cupy, numpy; print('CuPy', cupy.__version__, 'NumPy', numpy.__version__, \
cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
timeout 300 python3 -m pytest -q -k "cupy or cuda" tests 2>&1 | tee "$out/gpu-tests.log" | tail -3
timeout 300 python3 experiments.py all --quick --device gpu --out "$scratch/quick" 2>&1 \
    | grep -v "^  seed=" > "$out/gpu-quick.log"; tail -3 "$out/gpu-quick.log"
timeout 300 python3 benchmarks/overlap.py --device gpu 2>&1 | tee "$out/gpu-overlap.log"
timeout 900 python3 benchmarks/bench.py --device gpu --steps 2000 --end-to-end --out "$scratch" \
    2>&1 | tee "$out/gpu-bench.log"
cp "$scratch/bench.json" "$out/gpu-bench.json" 2>/dev/null
