"""Benchmarks of the performance goals: each row times ours against a baseline in one run.

    python benchmarks/bench.py                 # CPU, a few minutes
    python benchmarks/bench.py --device gpu    # the same on a GPU (CuPy)
    python benchmarks/bench.py --end-to-end    # also fig1a/fig1b/fig1c/fig2b to their thresholds

Rows: one GD step at fig1b size (ours vs the straightforward Eq. (8) formulation, and vs
PyTorch autograd when torch is installed), measuring alignment and invariance (ours vs
full SVDs), seeds in parallel, Corollary 1's reduced dynamics vs full GD.  "floor" is
counted flops / the peak matmul rate measured in the same run.  Writes <out>/bench.json.
"""
import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

import align_fast  # noqa: E402
import align  # noqa: E402
import experiments  # noqa: E402
import outputs  # noqa: E402
import runner  # noqa: E402
import structured as st  # noqa: E402
import sweeps  # noqa: E402

WIDTHS = [784, 1024, 64, 10]
N = 256


def synchronize(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def seconds(fn, xp, repeat=3):
    """Best wall time of ``repeat`` calls of fn (after one warm-up call), each after a
    garbage collection (so that no earlier call's garbage is freed inside the timing)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        gc.collect()
        synchronize(xp)
        t = time.perf_counter()
        fn()
        synchronize(xp)
        best = min(best, time.perf_counter() - t)
    return best


def per_step(run, xp, steps):
    """Seconds per step of run(k) for k steps: the difference between 2 * steps and steps
    steps, so that set-up (the row-space basis, CUDA graph capture) is not counted."""
    return (seconds(lambda: run(2 * steps), xp, 2) - seconds(lambda: run(steps), xp, 2)) / steps


def peak_rate(xp, dtype, size=2048):
    A = xp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype=dtype)
    t = seconds(lambda: A @ A, xp, repeat=5)
    return 2 * size ** 3 / t


def fig1b_problem(xp, dtype):
    images, labels = runner.load_mnist()
    X = (images[:N].reshape(N, -1).T / 255.0 - experiments.MNIST_MEAN) / experiments.MNIST_STD
    Y = np.eye(10)[:, labels[:N]]
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], WIDTHS, seed=0)
    return [xp.asarray(a, dtype=dtype) for a in weights], xp.asarray(X, dtype=dtype), xp.asarray(Y, dtype=dtype)


def plain_gd(weights, X, Y, lr, steps):
    """The straightforward formulation of Eq. (8): forward, backward, update."""
    ws = [W.copy() for W in weights]
    scale = 2.0 / (Y.shape[0] * Y.shape[1])
    for _ in range(steps):
        acts = [X]
        for W in ws:
            acts.append(W @ acts[-1])
        delta = (acts[-1] - Y) * scale
        grads = []
        for i in range(len(ws) - 1, -1, -1):
            grads.append(delta @ acts[i].T)
            delta = ws[i].T @ delta
        for W, G in zip(ws, reversed(grads)):
            W -= lr * G
    return ws


def ours_gd(weights, X, Y, lr, steps, how="auto"):
    """align_fast's steps (``how``: its train's ``steps``; "plain" is kernel by kernel)."""
    return align_fast.train(weights, X, Y, "mse_mean", lr=lr, max_steps=steps, tol=0.0,
                            measure_every=10 ** 9, steps=how)[0]


def torch_gd(weights, X, Y, lr, steps, device):
    import torch
    ws = [torch.tensor(align.to_numpy(W), device=device, requires_grad=True) for W in weights]
    Xt, Yt = (torch.tensor(align.to_numpy(a), device=device) for a in (X, Y))
    loss_fn = torch.nn.MSELoss()
    for _ in range(steps):
        out = Xt
        for W in ws:
            out = W @ out
        loss = loss_fn(out, Yt)
        for W in ws:
            W.grad = None
        loss.backward()
        with torch.no_grad():
            for W in ws:
                W -= lr * W.grad
    if device != "cpu":
        torch.cuda.synchronize()
    return [W.detach().cpu().numpy() for W in ws]


def chain_costs(shapes, n):
    """Multiply-adds of Eq. (8)'s products with the input's gradient for layers of shapes
    ((k_1, k_0), ..., (k_d, k_{d-1})) on n samples, as align_fast counts them when it
    chooses how to group them: (layer by layer, grouped at the outputs)."""
    (_, k0), (kd, _) = shapes[0], shapes[-1]
    by_layer = 3 * n * sum(r * c for r, c in shapes)
    at_outputs = 3 * kd * k0 * n + sum(r * c * k0 + kd * k0 * c for r, c in shapes[1:]) + \
        sum(kd * r * c for r, c in shapes[:-1]) + sum(kd * r * c for r, c in shapes[1:-1])
    return by_layer, at_outputs


def step_flops(m, n=N, widths=WIDTHS):
    """Counted flops of one step: the straightforward Eq. (8) and ours (see align_fast.train),
    whose first hidden space has dimension m = rank [W_1(0) X, W_2(0)^T], its products
    grouped as align_fast groups them."""
    k0, k1, k2, k3 = widths
    plain = 2 * n * (k1 * k0 + k2 * k1 + k3 * k2) * 3 - 2 * n * k1 * k0   # no input gradient
    ours = 2 * min(chain_costs(((k2, m), (k3, k2)), n)) + 2 * n * m   # + diagonal X^T X
    return plain, ours


def relative_difference(a, b):
    return max(float(np.abs(align.to_numpy(x) - align.to_numpy(y)).max() /
                     np.abs(align.to_numpy(y)).max()) for x, y in zip(a, b))


def bench_step(xp, rows, steps):
    dtype = np.float32
    weights, X, Y = fig1b_problem(xp, dtype)
    peak = peak_rate(xp, dtype)
    W1, W2, Xh = (align.to_numpy(a).astype(np.float64) for a in (weights[0], weights[1], X))
    plain_flops, our_flops = step_flops(np.linalg.matrix_rank(np.concatenate([W1 @ Xh, W2.T], axis=1)))
    # (ours over 5x the steps: the difference of two short, noisy runs is mostly noise)
    t_ours = per_step(lambda k: ours_gd(weights, X, Y, 1e-2, k), xp, 5 * steps)
    t_plain = per_step(lambda k: plain_gd(weights, X, Y, 1e-2, k), xp, steps)
    ref = plain_gd(weights, X, Y, 1e-2, 1000)
    diff = relative_difference(ours_gd(weights, X, Y, 1e-2, 1000), ref)
    rows.append(row("GD step, fig1b size (float32)", t_ours, "straightforward Eq. (8)", t_plain,
                    our_flops / peak, f"max rel. diff of weights after 1000 steps: {diff:.1e}"))
    if xp is not np:                                    # CUDA graphs against kernel by kernel
        graphs = align_fast.GRAPH_STEPS
        t_eager = per_step(lambda k: ours_gd(weights, X, Y, 1e-2, k, "plain"), xp, steps)
        eager = ours_gd(weights, X, Y, 1e-2, 1000, "plain")
        gdiff = relative_difference(ours_gd(weights, X, Y, 1e-2, 1000), eager)
        rows.append(row("GD step, fig1b size (float32)", t_ours, "ours, kernel by kernel", t_eager,
                        our_flops / peak, f"CUDA graphs of {graphs} steps; vs kernel by kernel "
                        f"after 1000 steps: {gdiff:.1e}"))
    try:
        import torch
        device = "cpu" if xp is np else "cuda"
        torch.set_num_threads(os.cpu_count() or 1)
        t_torch = per_step(lambda k: torch_gd(weights, X, Y, 1e-2, k, device), np, steps)
        tdiff = relative_difference(torch_gd(weights, X, Y, 1e-2, 1000, device), ref)
        rows.append(row("GD step, fig1b size (float32)", t_ours, f"PyTorch {torch.__version__} "
                        f"autograd ({device})", t_torch, our_flops / peak,
                        f"torch vs straightforward after 1000 steps: {tdiff:.1e}"))
    except Exception as exc:                  # not installed, or without CUDA on a GPU run
        rows.append({"name": "GD step vs PyTorch", "note": f"PyTorch comparison skipped: {exc}"})
    return peak


def bench_measure(xp, rows, steps=20):
    """Measuring as training does it (align_fast.train with a tracker), per measurement: the
    extra time of measuring at every step over 2 * steps and over steps steps, so that
    the run's one-time set-up (layer 1's split, the start's SVDs) is not counted."""
    weights, X, Y = fig1b_problem(xp, np.float32)
    track = align_fast.tracker(weights, rtol=1e-4)
    train = lambda every, k: align_fast.train(weights, X, Y, "mse_mean", lr=1e-2, max_steps=k, tol=0.0,
                                         measure_every=every, measures={"m": track})
    extra = lambda k: seconds(lambda: train(1, k), xp, 2) - seconds(lambda: train(10 ** 9, k), xp, 2)
    t_ours = (extra(2 * steps) - extra(steps)) / steps
    later, hist = train(1, steps)
    direct = full_svd_measures(track, [W.astype(np.float64) for W in later])
    gap = max(abs(hist.measurements[k][-1] - direct[k]) for k in direct)
    t_svd = seconds(lambda: full_svd_measures(track, later), xp)
    rows.append(row("measure alignment + invariance, fig1b", t_ours, "full SVDs, then the measures",
                    t_svd, None, f"both rules, both measures; vs float64 SVDs: {gap:.1e}"))
    rng = np.random.default_rng(0)
    S = st.conv2d(28, 3)
    mats = [S.to_matrix(xp.asarray(rng.uniform(-1, 1, 9) / 3, dtype=np.float32)) for _ in range(3)]
    track = align_fast.tracker(mats, rtol=1e-4)
    moved = [W * 1.01 for W in mats]
    t_ours = seconds(lambda: track(moved), xp, 2)
    t_svd = seconds(lambda: full_svd_measures(track, moved), xp, 2)
    rows.append(row("measure alignment + invariance, fig2b (3 x 784x784)", t_ours,
                    "full SVDs, then the measures", t_svd, None, "all 784 directions needed"))


def full_svd_measures(track, weights):
    """The straightforward measurement: an SVD of each layer in its own precision, then
    the same rules (tracker.from_svds)."""
    svds = [align.array_module(W).linalg.svd(W, full_matrices=False) for W in weights]
    return track.from_svds([tuple(align.to_numpy(a).astype(np.float64) for a in (U, s, Vt.T))
                            for U, s, Vt in svds])


def bench_cor1(xp, rows, steps):
    k, d = 784, 3
    rng = np.random.default_rng(0)
    X = rng.standard_normal((k, 1000)) / math.sqrt(1000)
    cert = align.invariance_certificate(X, X, [k] * (d + 1))
    sig0 = np.array([rng.uniform(0.5, 1.0, k) for _ in range(d)])
    weights = [xp.asarray(W) for W in align.aligned_init(cert.U, cert.V, [k] * (d + 1), sigmas=sig0)]
    Xd = xp.asarray(X)
    lr = 0.05
    t_full = seconds(lambda: align_fast.train(weights, Xd, Xd, lr=lr, max_steps=steps, tol=0.0,
                                         measure_every=10 ** 9), xp, 1) / steps
    sig_d = xp.asarray(sig0)
    t_red = seconds(lambda: align_fast.singular_value_dynamics(sig_d, cert.lam, cert.lam_prime, lr, 1000,
                                                          steps, record_every=steps), xp, 1) / steps
    full, _ = align_fast.train(weights, Xd, Xd, lr=lr, max_steps=steps, tol=0.0, measure_every=10 ** 9)
    bases = [cert.V] + [np.eye(k)] * (d - 1) + [cert.U]
    got = np.array([np.diagonal(bases[i + 1].T @ align.to_numpy(W) @ bases[i]) for i, W in enumerate(full)])
    red = align.to_numpy(align_fast.singular_value_dynamics(sig_d, cert.lam, cert.lam_prime, lr, 1000, steps)[-1])
    diff = float(np.abs(got - red).max() / np.abs(got).max())
    rows.append(row(f"Corollary 1 reduced dynamics, width {k} (float64)", t_red, "full GD", t_full,
                    None, f"max rel. diff of singular values after {steps} steps: {diff:.1e}"))


def seeds_problem(xp, count):
    """fig1a's problem for seeds 0..count-1 as one batch (weights, X, Y) on xp."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((count, 9, 9)), rng.standard_normal((count, 9, 9))
    ws = [np.stack([align.aligned_init(np.linalg.svd(Y[b])[0], np.linalg.svd(X[b])[0], [9] * 4,
                                       seed=b)[i] for b in range(count)]) for i in range(3)]
    return [xp.asarray(W) for W in ws], xp.asarray(X), xp.asarray(Y)


def trained(ws, X, Y, steps=1000):
    """The batch's weights after ``steps`` steps of fig1a's training (not measured)."""
    return align_fast.train(ws, X, Y, "mse_mean", lr=1e-2, max_steps=steps, tol=0.0,
                       measure_every=10 ** 9)[0]


def alternating(track, weights):
    """A measurement of ``weights`` by ``track`` that every call makes in full: the weights
    alternate with a copy moved by one part in 1e9 (align_fast's batch tracker keeps the
    values of the networks unchanged since its last call)."""
    turns = itertools.cycle([weights, [W * (1 + 1e-9) for W in weights]])
    return lambda: track(next(turns))


def bench_seeds(xp, rows, steps, counts=(10, 100, 1000)):
    """fig1a: N networks as one batch (forward, gradients and measures) against one network;
    and one measurement of the largest batch against the 100 steps it overlaps on a GPU."""
    def batch(count, every):
        ws, X, Y = seeds_problem(xp, count)
        measures = {"m": align_fast.tracker(ws)} if every else None
        return lambda: align_fast.train(ws, X, Y, "mse_mean", lr=1e-2, max_steps=steps, tol=0.0,
                                   measure_every=every or 10 ** 9, measures=measures)
    repeat = 1 if xp is np else 3                     # (GPU runs vary more, and are short)
    for every, what in ((100, "measuring every 100"), (None, "training only")):
        one = seconds(batch(1, every), xp, repeat)
        for count in counts:
            many = seconds(batch(count, every), xp, repeat)
            rows.append(row(f"fig1a, {count} seeds as one batch ({steps} steps, {what})", many,
                            "one seed", one, None, f"cost per seed {many / count / one:.3f} of one "
                            f"seed's; wall {many / one:.1f}x one seed's"))
    largest_training_only = many                      # (the last row above)
    ws, X, Y = seeds_problem(xp, counts[-1])
    track = align_fast.tracker(ws)
    later = trained(ws, X, Y)
    svds = seconds(lambda: align_fast.reduced_svds(later, keep=True), xp, 5)
    note = f"above 1x it hides behind the steps it overlaps on a GPU; its SVDs {svds * 1e3:.1f} ms"
    if xp is not np:                                  # the Jacobi kernel against cuSOLVER's,
        stacked = xp.stack(later)                     # and where the time goes
        cusolver = seconds(lambda: xp.linalg.svd(stacked, full_matrices=False), xp, 5)
        note += f" (CuPy's svd of the same batch {cusolver * 1e3:.1f} ms)"
        try:
            from cupyx.profiler import benchmark
        except ImportError:                           # (the CuPy stand-in has no cupyx)
            benchmark = None
        if benchmark:
            r = benchmark(track, (later,), n_repeat=5)
            note += f"; host {r.cpu_times.mean() * 1e3:.1f} ms, GPU {r.gpu_times.mean() * 1e3:.1f} ms"
    rows.append(row(f"one measurement of {counts[-1]} fig1a networks (both rules, both measures)",
                    seconds(alternating(track, later), xp, 5), "100 steps of the batch",
                    largest_training_only * 100 / steps,
                    None, note))


GOALS_S = {"cpu": {"fig1a": 1.0, "fig1b": 120.0}, "gpu": {"fig1b": 15.0}}


def bench_end_to_end(device, rows, out):
    """fig1a, fig1b, fig1c, fig2b as `experiments.py NAME` runs them (measuring every 100
    steps), timed by the run's own clock (training and measuring, not start-up)."""
    for name in ("fig1a", "fig1b", "fig1c", "fig2b"):
        status = experiments.main([name, "--device", device, "--out", out, "-q"])
        with open(os.path.join(out, f"{name}.json")) as f:
            result = json.load(f)
        run = next(iter(result["runs"].values()))
        label = f"{name} end to end ({run['final_step']:,} steps, {run['stop_reason']})"
        goal = GOALS_S[device].get(name)
        if goal:
            rows.append(row(label, run["wall_time"], "goal", goal, None,
                            f"measured every 100 steps; claim exit status {status}"))
        else:
            rows.append({"name": label, "ours_s": run["wall_time"], "note":
                         f"measured every 100 steps; no time goal; claim exit status {status}"})


def bench_parallel(rows, out, count=4):
    """Seeds as parallel jobs: ``count`` `experiments.py fig1b --quick` processes started
    together against one alone (wall clock, start-up included; best of 2)."""
    import subprocess
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments.py")

    def started_together(n):
        start = time.perf_counter()
        jobs = [subprocess.Popen([sys.executable, script, "fig1b", "--quick", "--seed", str(i),
                                  "--out", os.path.join(out, f"parallel-{i}"), "-q"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for i in range(n)]
        if any(job.wait() for job in jobs):
            sys.exit("error: a fig1b --quick process failed")
        return time.perf_counter() - start
    alone = min(started_together(1) for _ in range(2))
    together = min(started_together(count) for _ in range(2))
    rows.append(row(f"{count} fig1b --quick processes together vs one alone", together,
                    "one alone", alone, None, f"together / alone = {together / alone:.2f} "
                    f"(goal <= 3 on 2 cores; 68 before BLAS threads were set)"))


def bench_sweep(rows, lrs=(0.01, 0.02, 0.03, 0.04), depths=(2, 3, 4), seeds=5):
    """A fig1a grid (lr x depth, 5 seeds, to the threshold) as `sweep` trains it (cells of
    one depth as one batch, one lr per network) against its runs one by one (each alone on
    the fastest single-network path); training and measuring, not the files."""
    exp = experiments.EXPERIMENTS["fig1a"]
    args = runner.parser(experiments.EXPERIMENTS, "fig1a").parse_args(["fig1a", "--seeds", str(seeds), "-q"])
    args.command = ""
    cfg = runner.configure(exp, "fig1a", args, np)
    grid = {"lr": list(lrs), "depth": list(depths)}
    start = time.perf_counter()
    runs, _ = sweeps.run_sweep("fig1a", exp, cfg, grid, None, runner.train_problems, runner.thinned)
    swept = time.perf_counter() - start
    start, alone = time.perf_counter(), {}
    for cell in sweeps.cells(grid):
        for p in exp.problems(dataclasses.replace(cfg, **cell)):
            runner.train_problems(cfg, alone, "", [dataclasses.replace(p, name=f"{cell} {p.name}")])
    one_by_one = time.perf_counter() - start
    steps = sum(r["final_step"] for r in alone.values())
    rows.append(row(f"fig1a grid {len(lrs)} lr x {len(depths)} depths x {seeds} seeds (sweep)", swept,
                    f"its {len(alone)} runs one by one", one_by_one, None,
                    f"{steps:,} steps in all; sweep / one by one = {swept / one_by_one:.2f} (goal <= 0.2)"))


def row(name, ours, baseline_name, baseline, floor, note):
    return {"name": name, "ours_s": ours, "baseline": baseline_name, "baseline_s": baseline,
            "ratio": baseline / ours, "floor_s": floor,
            "ours_vs_floor": ours / floor if floor else None, "note": note}


def table(rows):
    w = max(len(r["name"]) for r in rows) + 2
    lines = [f"{'benchmark':<{w}}{'ours':>11}{'baseline':>11}{'ratio':>8}{'x floor':>9}  baseline / note"]
    for r in rows:
        if "baseline_s" not in r:
            ours = _t(r["ours_s"]) if "ours_s" in r else ""
            lines.append(f"{r['name']:<{w}}{ours:>11}{'':>28}  {r['note']}")
            continue
        floor = f"{r['ours_vs_floor']:.1f}" if r["ours_vs_floor"] else "-"
        lines.append(f"{r['name']:<{w}}{_t(r['ours_s']):>11}{_t(r['baseline_s']):>11}"
                     f"{r['ratio']:>7.1f}x{floor:>9}  {r['baseline']}; {r['note']}")
    return "\n".join(lines)


def _t(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=runner.DEVICES, default="cpu")
    p.add_argument("--steps", type=int, default=200,
                   help="steps timed per GD benchmark (200; on a GPU use ~2000, since each "
                        "timed run also captures its CUDA graphs)")
    p.add_argument("--seed-steps", type=int, default=2000,
                   help="steps of the batched-seeds benchmark (2000)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also run fig1a, fig1b, fig1c and fig2b to their thresholds (minutes)")
    p.add_argument("--parts", default="step,measure,cor1,seeds,parallel",
                   help="comma-separated benchmarks to run (default step,measure,cor1,seeds,"
                        "parallel; also sweep, minutes; end-to-end is --end-to-end)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    parts = set(args.parts.split(",")) | ({"end-to-end"} if args.end_to_end else set())
    unknown = parts - {"step", "measure", "cor1", "seeds", "parallel", "sweep", "end-to-end"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; choose from step, measure, cor1, seeds, "
                "parallel, sweep, end-to-end")
    try:
        runner.check_output_folder(args.out)
        xp = runner.select_device(args.device)
    except (outputs.ExperimentError, runner.DeviceError) as exc:
        sys.exit(f"error: {exc}")
    rows = []
    peak = bench_step(xp, rows, args.steps) if "step" in parts else peak_rate(xp, np.float32)
    if "measure" in parts:
        bench_measure(xp, rows)
    if "cor1" in parts:
        bench_cor1(xp, rows, args.steps)
    if "seeds" in parts:
        bench_seeds(xp, rows, args.seed_steps)
    if "parallel" in parts and xp is np:
        bench_parallel(rows, args.out)
    if "sweep" in parts and xp is np:
        bench_sweep(rows)
    if "end-to-end" in parts:
        bench_end_to_end("cpu" if xp is np else "gpu", rows, args.out)
    info = runner.environment(argparse.Namespace(xp=xp))
    info.update(date=time.strftime("%Y-%m-%d"), peak_float32_flops=peak, cpus=os.cpu_count(),
                platform=platform.platform())
    print(table(rows))
    print(f"peak float32 matmul: {peak / 1e9:.0f} GFLOP/s; {info}")
    outputs.write_text(os.path.join(args.out, "bench.json"),
                       json.dumps({"environment": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
