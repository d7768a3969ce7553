"""Is one checkout as fast as another?  bench.py's CPU rows, timed for two trees in one run.

    git worktree add /tmp/before <commit>
    python benchmarks/compare.py /tmp/before . --rounds 6 --workers 2

Each tree gets ``--workers`` processes that import its own bench.py, build the problems and
stay alive; every task is then asked of every worker in turn (shuffled), round after round,
so that a slow spell of the machine falls on both trees alike.  A task's time is its
minimum over rounds and workers, and the rows are bench.py's ratios from those minima.
Writes <out>/compare.json (every timing) and prints the ratios of both trees.
"""
import argparse
import gc
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time

PARTS = ("step", "measure", "cor1", "seeds")
SEEDS = (1, 100, 1000)


def tasks(tree, parts):
    """{name: function} for ``tree``'s code, its problems built (in the worker's process)."""
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import numpy as np
    import align                            # the reference: certificates and aligned starts
    try:
        import align_fast as fast           # the fast module, chosen explicitly since it has one
    except ImportError:
        fast = align                        # (an older tree: align handed work to _fast itself)
    import bench
    import structured as st
    out = {}
    w, X, Y = bench.fig1b_problem(np, np.float32)
    if "step" in parts:
        out.update({f"step_ours_{k}": (lambda k=k: bench.ours_gd(w, X, Y, 1e-2, k)) for k in (1000, 4000)})
        out["step_plain_60"] = lambda: bench.plain_gd(w, X, Y, 1e-2, 60)
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            out["step_torch_60"] = lambda: bench.torch_gd(w, X, Y, 1e-2, 60, "cpu")
        except ImportError:
            pass
    if "measure" in parts:
        track = fast.tracker(w, rtol=1e-4)
        train = lambda every, k: fast.train(w, X, Y, "mse_mean", lr=1e-2, max_steps=k, tol=0.0,
                                            measure_every=every, measures={"m": track})
        later = train(10 ** 9, 20)[0]
        for k in (20, 80):
            out[f"train_measuring_{k}"] = lambda k=k: train(1, k)
            out[f"train_only_{k}"] = lambda k=k: train(10 ** 9, k)
        out["measure_full"] = lambda: bench.full_svd_measures(track, later)
        rng = np.random.default_rng(0)
        mats = [st.conv2d(28, 3).to_matrix(rng.uniform(-1, 1, 9).astype(np.float32) / 3)
                for _ in range(3)]
        track2, moved = fast.tracker(mats, rtol=1e-4), [M * 1.01 for M in mats]
        out["fig2b_ours"] = lambda: track2(moved)
        out["fig2b_full"] = lambda: bench.full_svd_measures(track2, moved)
    if "cor1" in parts:
        k, d = 784, 3
        rng = np.random.default_rng(0)
        Xc = rng.standard_normal((k, 1000)) / math.sqrt(1000)
        cert = align.invariance_certificate(Xc, Xc, [k] * (d + 1))
        sig0 = rng.uniform(0.5, 1.0, (d, k))
        wc = align.aligned_init(cert.U, cert.V, [k] * (d + 1), sigmas=sig0)
        out["cor1_full_20"] = lambda: fast.train(wc, Xc, Xc, lr=0.05, max_steps=20, tol=0.0,
                                                 measure_every=10 ** 9)
        out["cor1_reduced_200"] = lambda: fast.singular_value_dynamics(
            sig0, cert.lam, cert.lam_prime, 0.05, 1000, 200, record_every=200)
    if "seeds" in parts:
        for count in SEEDS:
            ws, Xs, Ys = bench.seeds_problem(np, count)
            for every, mode in ((100, "measuring"), (None, "training")):
                measures = {"m": fast.tracker(ws)} if every else None
                out[f"seeds{count}_{mode}"] = (
                    lambda ws=ws, Xs=Xs, Ys=Ys, every=every, measures=measures: fast.train(
                        ws, Xs, Ys, "mse_mean", lr=1e-2, max_steps=2000, tol=0.0,
                        measure_every=every or 10 ** 9, measures=measures))
        track_batch, trained_batch = fast.tracker(ws), bench.trained(ws, Xs, Ys)
        turns = itertools.cycle([trained_batch, [W * (1 + 1e-9) for W in trained_batch]])
        out["measure_1000_networks"] = lambda: track_batch(next(turns))   # (each call in full;
        # bench.alternating's two lines, written out: an older tree's bench.py lacks it)
    return out


def worker(tree, parts):
    """Build the tasks, run each once, then time the ones named on stdin, one a line."""
    todo = tasks(tree, parts)
    for fn in todo.values():
        fn()
    print(" ".join(todo), flush=True)
    for line in sys.stdin:
        gc.collect()
        start = time.perf_counter()
        todo[line.strip()]()
        print(time.perf_counter() - start, flush=True)


def ratios(m):
    """bench.py's rows from the minimum time of each task (seconds)."""
    rows, step = {}, None
    if "step_ours_4000" in m:
        step = (m["step_ours_4000"] - m["step_ours_1000"]) / 3000
        rows["GD step vs straightforward Eq. (8)"] = m["step_plain_60"] / 60 / step
        if "step_torch_60" in m:
            rows["GD step vs PyTorch autograd"] = m["step_torch_60"] / 60 / step
    if "measure_full" in m:
        extra = lambda k: m[f"train_measuring_{k}"] - m[f"train_only_{k}"]
        rows["measuring fig1b vs full SVDs"] = m["measure_full"] / ((extra(80) - extra(20)) / 60)
        rows["measuring fig2b vs full SVDs"] = m["fig2b_full"] / m["fig2b_ours"]
    if "cor1_full_20" in m:
        rows["Corollary 1 vs full GD"] = (m["cor1_full_20"] / 20) / (m["cor1_reduced_200"] / 200)
    if "seeds1_training" in m:
        for count in SEEDS[1:]:
            for mode in ("training", "measuring"):
                rows[f"cost per seed, {count} seeds, {mode}"] = \
                    m[f"seeds{count}_{mode}"] / count / m[f"seeds1_{mode}"]
        rows["one measurement of 1000 networks vs 100 steps"] = \
            m[f"seeds{SEEDS[-1]}_training"] / 20 / m["measure_1000_networks"]
    return rows


def answer(side, w):
    """The next line a worker writes; a clear error if it stopped (its traceback is above)."""
    line = w.stdout.readline()
    if not line:
        sys.exit(f"error: a worker of the {side} tree stopped (see its traceback above)")
    return line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", nargs="?", help="the first tree (a checkout of the project)")
    p.add_argument("after", nargs="?", help="the second tree")
    p.add_argument("--rounds", type=int, default=6, help="times each task is asked of each worker (6)")
    p.add_argument("--workers", type=int, default=2, help="processes per tree (2)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--out", default="results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if args.worker:
        return worker(args.worker, parts)
    if args.after is None:
        sys.exit("error: give two checkouts: python benchmarks/compare.py BEFORE AFTER")
    for tree in (args.before, args.after):
        if not os.path.isfile(os.path.join(tree, "benchmarks", "bench.py")):
            sys.exit(f"error: {tree} is not a checkout of this project (no benchmarks/bench.py)")
    if set(parts) - set(PARTS) or args.rounds < 1 or args.workers < 1:
        sys.exit(f"error: --parts takes {', '.join(PARTS)}; --rounds and --workers at least 1")
    os.makedirs(args.out, exist_ok=True)
    workers = [(side, subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", os.path.abspath(tree),
         "--parts", args.parts], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for _ in range(args.workers) for side, tree in (("before", args.before), ("after", args.after))]
    names = [answer(side, w).split() for side, w in workers][0]     # (all ready, one task list)
    times = {side: {name: [] for name in names} for side in ("before", "after")}
    order = random.Random(0)
    for r in range(args.rounds):
        for name in names:
            for side, w in order.sample(workers, len(workers)):
                w.stdin.write(name + "\n")
                w.stdin.flush()
                times[side][name].append(float(answer(side, w)))
        print(f"round {r + 1} of {args.rounds} done", flush=True)
    for _, w in workers:
        w.stdin.close()
        w.wait()
    rows = {side: ratios({k: min(v) for k, v in times[side].items()}) for side in times}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"times_s": times, "ratios": rows}, f, indent=1)
    print(f"{'row':50}{'before':>10}{'after':>10}{'after/before':>14}")
    for row, b in rows["before"].items():
        a = rows["after"][row]
        print(f"{row:50}{b:10.3f}{a:10.3f}{a / b:14.3f}")


if __name__ == "__main__":
    main()
