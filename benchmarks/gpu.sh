#!/usr/bin/env bash
# One command for a GPU machine with CuPy, in under 10 minutes (a device session's call
# limit), the open goal first: fig1a's batched seeds (goal 4) and whether measuring overlaps
# the steps (overlap.py); then the suite's CuPy cases, the rest of the benchmark table with
# fig1a/1b/1c/2b end to end, and every experiment quickly on the GPU.
# Logs and bench JSONs land in ${OUT:-results}/ as each part ends; experiment outputs in a
# scratch folder.  Parts may be named to run only those, in the order below:
#     bash benchmarks/gpu.sh [gpu-seeds gpu-overlap gpu-tests gpu-bench gpu-quick gpu-verify]
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out=${OUT:-results}
scratch=$(mktemp -d)
mkdir -p "$out"
nvidia-smi -L
python3 -c "import cupy, numpy; print('CuPy', cupy.__version__, 'NumPy', numpy.__version__, \
cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
wanted=" ${*:-gpu-seeds gpu-overlap gpu-tests gpu-bench gpu-quick gpu-verify} "
for name in $wanted; do
    case $name in gpu-seeds|gpu-overlap|gpu-tests|gpu-bench|gpu-quick|gpu-verify) ;;
    *) echo "unknown part $name; choose from gpu-seeds gpu-overlap gpu-tests gpu-bench gpu-quick gpu-verify" >&2
       exit 2 ;;
    esac
done
part() {  # part NAME SECONDS COMMAND...: run it under a time limit, its output in NAME.log
    local name=$1 limit=$2; shift 2
    [[ $wanted == *" $name "* ]] || return 0
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "exit status $?" >> "$out/$name.log"
    tail -n 25 "$out/$name.log"
}
part gpu-seeds 100 python3 benchmarks/bench.py --device gpu --parts seeds --out "$scratch/seeds"
cp "$scratch/seeds/bench.json" "$out/gpu-bench-seeds.json" 2>/dev/null
part gpu-overlap 80 python3 benchmarks/overlap.py --device gpu
part gpu-tests 110 python3 -m pytest -q -p no:cacheprovider -k "cupy or cuda" tests
part gpu-bench 160 python3 benchmarks/bench.py --device gpu --steps 2000 \
    --parts step,measure,cor1,end-to-end --out "$scratch"
cp "$scratch/bench.json" "$out/gpu-bench.json" 2>/dev/null
part gpu-quick 90 python3 experiments.py all --quick --device gpu --out "$scratch/quick" -q
part gpu-verify 40 python3 experiments.py verify --device gpu --out "$scratch/verify" -q
