"""Does measuring overlap the steps?  fig1a with 1 and 1000 seeds, a measurement every 100
steps: for each run of steps, how long its launch, the measurement taken meanwhile and the
wait for the steps afterwards took (medians), against the same without measuring and the
measurement alone (also taken on the host, as a batch of fewer than align_fast.GPU_BATCH_MIN
networks would be).  On a GPU, steps replay from CUDA graphs (align_fast.GRAPH_STEPS steps
per graph) on their own stream, launched from the main thread, so a measurement shorter than
the steps should cost nothing:

    python benchmarks/overlap.py --device gpu
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import align_fast  # noqa: E402
import runner  # noqa: E402
from bench import alternating, seconds, seeds_problem, trained  # noqa: E402


def timed_run(ws, X, Y, steps, measure):
    """align_fast.train with each launch, wait and measurement timed; medians in ms."""
    times = {"launch": [], "measure": [], "wait": []}

    def clock(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - t)
            return out
        return call

    make_runner = align_fast._runner

    def timed_runner(*args, **kwargs):
        runs_for = make_runner(*args, **kwargs)

        def runs_of(ps):                        # the runs of steps train takes (None: one by one)
            runs = runs_for(ps)
            if runs is not None:
                runs.launch, runs.wait = clock("launch", runs.launch), clock("wait", runs.wait)
            return runs
        return runs_of
    align_fast._runner = timed_runner
    try:
        track = align_fast.tracker(ws)
        timed_track = clock("measure", track)
        timed_track.from_svds, timed_track.starts_at = track.from_svds, track.starts_at
        t = time.perf_counter()
        align_fast.train(ws, X, Y, "mse_mean", lr=1e-2, max_steps=steps, tol=0.0,
                         measure_every=100 if measure else 10 ** 9,
                         measures={"m": timed_track} if measure else None)
        total = time.perf_counter() - t
    finally:
        align_fast._runner = make_runner
    return total, {k: 1e3 * statistics.median(v) if v else float("nan") for k, v in times.items()}


def measure_alone(ws, later, xp, gpu_batch_min):
    """Seconds of one measurement of ``later`` by a tracker of ``ws``, with batches of at
    least ``gpu_batch_min`` networks measured on the GPU (the others on the host), each in
    full (bench.alternating: a NumPy batch's tracker keeps the values of unmoved networks)."""
    saved, align_fast.GPU_BATCH_MIN = align_fast.GPU_BATCH_MIN, gpu_batch_min
    try:
        track = align_fast.tracker(ws)
        return seconds(alternating(track, later), xp, 5)
    finally:
        align_fast.GPU_BATCH_MIN = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=runner.DEVICES, default="cpu")
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        xp = runner.select_device(args.device)
    except runner.DeviceError as exc:
        sys.exit(f"error: {exc}")
    print(f"{'seeds':>6} {'measuring':>9} {'total ms':>9} {'launch':>7} {'measure':>8}"
          f" {'wait':>7}  {'measure alone':>13} {'on the host':>11}")
    for count in (1, 1000):
        ws, X, Y = seeds_problem(xp, count)
        later = trained(ws, X, Y)
        alone, host = (1e3 * measure_alone(ws, later, xp, least)
                       for least in (align_fast.GPU_BATCH_MIN, 10 ** 9))
        for measure in (False, True):
            timed_run(ws, X, Y, args.steps, measure)                # warm-up: graphs captured
            total, t = timed_run(ws, X, Y, args.steps, measure)
            print(f"{count:>6} {str(measure):>9} {1e3 * total:>9.1f} "
                  f"{t['launch']:>7.3f} {t['measure']:>8.3f} {t['wait']:>7.3f}  {alone:>13.3f}"
                  f" {host:>11.3f}")
    print("Overlapped: with measuring, measure + wait ~ max(measure alone, wait without "
          "measuring); serialised: ~ their sum.")


if __name__ == "__main__":
    main()
