"""How soon does Ctrl-C take effect?  The latency the tests no longer time (issue #36).

    python benchmarks/interrupt.py [--points 10]

1. **The library.** fig1b's problem (float32, a measurement every 100 steps) is trained with
   `align.train` and `align_fast.train`; SIGINT arrives at a spread of moments in the run, and
   the time from the signal's handler to `align.Interrupted` reaching the caller is the
   library's latency: the rest of the step or measurement under way, then the measurement of
   the step reached (so Interrupted carries a measured network; the reference's full SVDs
   at fig1b's size take most of a second, and a second Ctrl-C skips them).
2. **The command line.** `python experiments.py fig1b` is started and sent SIGINT at a spread
   of moments after its set-up; the time from the signal to the process's exit includes
   writing the interrupted run's JSON, CSV and figure.

Prints the median and the largest of each; nothing is written.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import align  # noqa: E402
import align_fast  # noqa: E402
from bench import fig1b_problem  # noqa: E402


def library_latency(module, problem, delay):
    """Seconds from SIGINT's handler to ``module.train`` raising (align.Interrupted in the
    steps; a plain KeyboardInterrupt in the set-up before them)."""
    w, X, Y = problem
    track, signalled = module.tracker(w), []

    def handler(signum, frame):
        signalled.append(time.perf_counter())
        signal.default_int_handler(signum, frame)
    previous = signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        module.train(w, X, Y, "mse_mean", lr=1e-2, max_steps=10 ** 6, tol=0.0, measure_every=100,
                     measures=track)
    except KeyboardInterrupt:             # align.Interrupted once the steps began
        return time.perf_counter() - signalled[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, previous)
    raise RuntimeError("the run ended before the signal")


def command_line_latency(delay):
    """Seconds from SIGINT to the exit of ``experiments.py fig1b`` signalled ``delay`` s in."""
    with tempfile.TemporaryDirectory() as out:
        process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "experiments.py"),
                                    "fig1b", "-q", "--out", out], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        start = time.perf_counter()
        process.send_signal(signal.SIGINT)
        status = process.wait()
        took = time.perf_counter() - start
        if status != 130:
            raise RuntimeError(f"experiments.py fig1b exited {status}, not 130")
        return took


def line(label, seconds):
    return f"| {label} | {len(seconds)} | {1e3 * statistics.median(seconds):.0f} ms | {1e3 * max(seconds):.0f} ms |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=10, help="signals per row (10)")
    args = parser.parse_args()
    problem = fig1b_problem(np, np.float32)
    delays = np.linspace(0.3, 3.0, args.points)
    print("| Ctrl-C during fig1b's training | signals | median | largest |")
    print("| --- | ---: | ---: | ---: |")
    for module in (align, align_fast):
        print(line(f"`{module.__name__}.train` stops",
                   [library_latency(module, problem, d) for d in delays]), flush=True)
    print(line("`python experiments.py fig1b` exits 130, files written",
               [command_line_latency(3 + d) for d in delays]), flush=True)


if __name__ == "__main__":
    main()
