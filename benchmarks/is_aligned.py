"""is_aligned (Definition 2) on random, trained and aligned networks: the answer, its residual
and the time, float32 and float64 (issue #23's table); and its "no" on large random networks
against the Gram products the commutator check needs, as a ratio measured in one run.

    python benchmarks/is_aligned.py                                  # both tables (minutes)
    python benchmarks/is_aligned.py --gram [--against OLD/align.py]  # the ratio only (seconds)
"""
import argparse
import importlib.util
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


def gram_products(weights):
    """What the commutator check cannot do without, per pair of layers: A = W_i W_i^T,
    B = W_{i+1}^T W_{i+1} and ||A B - B A||_F."""
    for W, V in zip(weights, weights[1:]):
        A, B = W @ W.T, V.T @ V
        np.linalg.norm(A @ B - B @ A)


def against_gram_products(against=None, rounds=3):
    """is_aligned's "no" (the commutator check) on random float64 networks, 1500-1500-1500
    (standard normal) and fig1b's widths with torch's default weights U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), against gram_products: the best of ``rounds`` rounds, each timing every
    function once in turn, so that the ratios come from one run.  ``against``: another
    align.py (say the version before) timed in the same rounds."""
    rng = np.random.default_rng(0)
    networks = {"random 1500-1500-1500": [rng.standard_normal((1500, 1500)) for _ in range(2)],
                "random 784-1024-64-10, torch init": [rng.uniform(-1, 1, (b, a)) / np.sqrt(a)
                                                      for a, b in zip(FIG1B, FIG1B[1:])]}
    runs = {"is_aligned": align.is_aligned}
    if against:
        spec = importlib.util.spec_from_file_location("align_against", against)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        runs[f"is_aligned of {against}"] = other.is_aligned
    print("| network | function | answer | residual | seconds | Gram products (s) | ratio |\n"
          "| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for label, weights in networks.items():
        best, answers = dict.fromkeys(["gram", *runs], float("inf")), {}
        for _ in range(rounds):
            for name, fn in [("gram", gram_products), *runs.items()]:
                start = time.perf_counter()
                answers[name] = fn(weights)
                best[name] = min(best[name], time.perf_counter() - start)
        for name in runs:
            out = answers[name]
            assert not out and "do not commute" in out.reason, out.reason       # the check's "no"
            print(f"| {label} | {name} | {bool(out)} | {out.residual:.3g} | {best[name]:.3f} | "
                  f"{best['gram']:.3f} | {best[name] / best['gram']:.1f}x |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gram", action="store_true", help="only the table against the Gram products")
    parser.add_argument("--against", metavar="ALIGN_PY", help="also time this align.py's is_aligned")
    args = parser.parse_args()
    if not args.gram:
        print("| network | dtype | aligned | residual | seconds |\n| --- | --- | --- | ---: | ---: |")
        random_networks()
        aligned_chains()
        trained_fig1b()
        print()
    against_gram_products(args.against)
