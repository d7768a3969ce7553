"""Does measuring overlap the steps?  fig1a with 1 and 1000 seeds: training with a
measurement every 100 steps against training without, so that the cost a measurement adds
to a run can be set beside a measurement taken alone (on the device, and on the host).  On a
GPU, steps replay from CUDA graphs (align_fast.GRAPH_STEPS steps per graph) on their own
stream, launched from the main thread, and the measurement due at a run's start is taken
while the run goes on, so a measurement shorter than the steps should add nothing:

    python benchmarks/overlap.py --device gpu
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import align  # noqa: E402
import align_fast  # noqa: E402
import runner  # noqa: E402
from bench import alternating, seconds, seeds_problem, synchronize, trained  # noqa: E402

MEASURE_EVERY = 100


def train_seconds(ws, X, Y, steps, measure, xp):
    """Seconds of align_fast.train over ``steps`` steps, measuring every MEASURE_EVERY steps
    or never (the second of two runs: the first captures the graphs)."""
    options = {"measure_every": MEASURE_EVERY, "measures": align_fast.tracker(ws)} if measure else \
        {"measure_every": 10 ** 9}
    for _ in range(2):
        start = time.perf_counter()
        align_fast.train(ws, X, Y, "mse_mean", lr=1e-2, max_steps=steps, tol=0.0, **options)
        synchronize(xp)
        took = time.perf_counter() - start
    return took


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=runner.DEVICES, default="cpu")
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        xp = runner.select_device(args.device)
    except runner.DeviceError as exc:
        sys.exit(f"error: {exc}")
    count_measures = args.steps // MEASURE_EVERY
    print(f"{'seeds':>6} {'training ms':>12} {'measuring ms':>13} {'added a measurement':>20}"
          f" {'measurement alone':>18} {'on the host':>12}")
    for count in (1, 1000):
        ws, X, Y = seeds_problem(xp, count)
        later = trained(ws, X, Y)
        alone = seconds(alternating(align_fast.tracker(ws), later), xp, 5)
        host_ws, host_later = ([align.to_numpy(W) for W in w] for w in (ws, later))
        host = seconds(alternating(align_fast.tracker(host_ws), host_later), xp, 5)
        plain = train_seconds(ws, X, Y, args.steps, False, xp)
        measuring = train_seconds(ws, X, Y, args.steps, True, xp)
        added = (measuring - plain) / count_measures
        print(f"{count:>6} {1e3 * plain:>12.1f} {1e3 * measuring:>13.1f} {1e3 * added:>20.3f}"
              f" {1e3 * alone:>18.3f} {1e3 * host:>12.3f}")
    print("Overlapped: a measurement adds much less than it takes alone; serialised: about as much.")


if __name__ == "__main__":
    main()
