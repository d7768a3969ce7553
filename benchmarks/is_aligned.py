"""is_aligned (Definition 2) on random, trained and aligned networks: the answer, its residual
and the time, float32 and float64 (issue #23's table).  python benchmarks/is_aligned.py"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import align  # noqa: E402

RANDOM_WIDTHS = [[5, 8, 4, 3], [10, 12, 8, 3], [6, 6, 6, 6], [3, 10, 10, 3], [30, 40, 20],
                 [20, 30, 15, 5], [20, 30, 15, 20], [100, 200, 50, 10], [784, 1024, 64, 10]]
FIG1B = [784, 1024, 64, 10]


def timed(label, weights, tol):
    start = time.perf_counter()
    test = align.is_aligned(weights, tol=tol)
    seconds = time.perf_counter() - start
    print(f"| {label} | {weights[0].dtype} | {bool(test)} | {test.residual:.3g} | {seconds:.2f} |",
          flush=True)
    return test, seconds


def random_networks():
    rng = np.random.default_rng(0)
    for widths in RANDOM_WIDTHS:
        weights = [rng.standard_normal((widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        for dtype in (np.float64, np.float32):
            timed("random " + "-".join(map(str, widths)), [W.astype(dtype) for W in weights], 1e-6)


def aligned_chains():
    """aligned_init at fig1b's widths: generic values; repeated, zero and signed values."""
    rng = np.random.default_rng(1)
    U, V = (np.linalg.qr(rng.standard_normal((k, k)))[0] for k in (FIG1B[-1], FIG1B[0]))
    generic = align.aligned_init(U, V, FIG1B, seed=1)
    sigmas = [np.repeat([2.0, -1.0, 0.0, 0.5], min(a, b) // 4 + 1)[:min(a, b)]
              for a, b in zip(FIG1B, FIG1B[1:])]
    special = align.aligned_init(U, V, FIG1B, sigmas=sigmas)
    for label, weights in (("aligned_init fig1b", generic), ("repeated/zero/signed", special)):
        timed(label, weights, 1e-8)
        timed(label, [W.astype(np.float32) for W in weights], 1e-4)


def trained_fig1b(steps=2000):
    """fig1b's aligned start trained 2,000 steps on its MNIST data (experiments.py's set-up;
    trained by align_fast, the same iterates as align.train to rounding, faster)."""
    import align_fast
    import experiments
    import runner
    exp = experiments.EXPERIMENTS["fig1b"]
    args = runner.parser(experiments.EXPERIMENTS, "fig1b").parse_args(["fig1b"])
    args.command = ""
    cfg = runner.configure(exp, "fig1b", args, np)
    X, labels = experiments.mnist_data(cfg, 256)
    Y = np.eye(10)[:, labels]
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], FIG1B, seed=0)
    out, _ = align_fast.train(weights, X, Y, "mse_mean", lr=cfg.lr, max_steps=steps, tol=0.0)
    timed(f"fig1b after {steps} steps", out, 1e-6)


if __name__ == "__main__":
    print("| network | dtype | aligned | residual | seconds |\n| --- | --- | --- | ---: | ---: |")
    random_networks()
    aligned_chains()
    trained_fig1b()
