"""Runs of gradient-descent steps for align_fast.py: the loop of align.gradient_descent with
the steps between measurements taken as runs, in place on NumPy (align_fast's squared-loss
steps) or replayed from CUDA graphs on CuPy (align_cuda.py), with the same History.

``matmul`` is the product of align_fast's forward and backward passes (A @ B); a CUDA
graph capture swaps in cuBLAS called directly while it records steps.
"""
import operator

import numpy as np

from align import array_module, to_numpy

matmul = operator.matmul


def _descend(ps, grads, lr):
    """The GD update p <- p - lr g in place (align.gradient_descent's step)."""
    for p, g in zip(ps, grads):
        p -= lr * g


def descend_in_runs(ps, loss_and_grads, run, chunks, measure_every):
    """align.gradient_descent's loop with the steps between measurements done as runs of
    ``chunks`` (see step_runs): on a GPU the measurement due at a run's start is taken
    from a copy while the run goes on.  A stop inside a run is replayed step by step, so
    the history is the step-by-step loop's.  Returns (params, History)."""
    before = marks = None
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by run.stops
        try:
            while True:
                due = run.step % measure_every == 0
                span = min(chunks.longest, measure_every - run.step % measure_every,
                           run.max_steps - run.step)
                marks = len(run.hist.steps), len(run.hist.losses)
                launched = span > 1 and chunks.launch(span, keep=due)   # a run to the next measurement
                if due:                                 # (on the GPU while that run goes on)
                    run.measure(chunks.kept if launched else ps)
                if launched:
                    if _advance(run, chunks.wait(), chunks):
                        break
                    continue
                L, grads = loss_and_grads(ps)           # one step, kernel by kernel
                if run.stops(run.step, L):
                    break
                before = [p.copy() for p in ps]
                _descend(ps, grads, run.lr)
                before, run.step = None, run.step + 1
        except KeyboardInterrupt:
            run.hist.stop_reason = "interrupted"
            if chunks.open:                             # a run not taken whole: its records go,
                del run.hist.steps[marks[0]:], run.hist.losses[marks[1]:]
            chunks.cancel()                             # and its steps (back to run.step)
            for p, b in zip(ps, before or ()):          # (a step cut short: undone)
                p[...] = b
    return ps, run.finish(ps)


def _advance(run, losses, chunks):
    """run.stops() for each row of a chunk's losses (vectorised; a chunk ends before
    max_steps); moves run.step to where the parameters are.  True when the run ends
    inside the chunk (then rewound to there), also on Ctrl-C in the callback."""
    hist, step = run.hist, run.step
    if losses.ndim == 1:
        worst = losses
    else:                                  # the largest finite loss of each row (align.worst_loss)
        worst = np.where(np.isfinite(losses), losses, -np.inf).max(axis=-1)
        worst[worst == -np.inf] = np.nan
    at = np.arange(len(losses))
    recorded = (step + at) % run.record_every == 0
    ends = np.flatnonzero(recorded & (~np.isfinite(worst) | (worst < run.tol)))
    end = int(ends[0]) if ends.size else len(losses)
    keep = at[recorded & (at < end)]
    before = len(hist.steps)
    hist.steps.extend((step + keep).tolist())
    hist.losses.extend(losses[keep].tolist() if losses.ndim == 1 else losses[keep])
    j = 0
    try:
        for j, value in zip(keep.tolist(), worst[keep].tolist()) if run.callback else ():
            run.callback(step + j, value, hist)
        j = end
        done = end < len(losses) and run.stops(step + end, losses[end])
    except KeyboardInterrupt:                           # Ctrl-C in the callback at step + j
        if j < end:
            count = before + int(np.searchsorted(keep, j)) + 1
            del hist.steps[count:], hist.losses[count:]
        chunks.rewind(j)
        chunks.open, run.step = False, run.step + j         # (together: Ctrl-C comes between
        raise                                               # statements, not inside one)
    if done:
        chunks.rewind(end)
        chunks.open, run.step = False, run.step + end
        return True
    chunks.open, run.step = False, run.step + len(losses)   # the caller took the whole run
    return False


_pools = {}


def _thread_pool(name, workers):
    """The process's thread pool ``name`` (created on first use)."""
    if name not in _pools:
        import concurrent.futures
        _pools[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"align-{name}")
    return _pools[name]


class _StepChunks:
    """Runs of plain GD steps done in place: ``launch(n)`` starts n steps, ``wait()``
    returns their n losses (host array, one row per step, taken before each update);
    ``rewind(j)`` goes back to the start of the last run and redoes its first j
    steps (a stop inside it); ``cancel()`` goes back to its start.  With
    ``launch(n, keep=True)``, ``kept`` holds the parameters at the start, to measure
    while the run goes on.  This base class steps kernel by kernel at ``launch``;
    align_cuda._CudaGraphChunks replays captured steps asynchronously."""

    def __init__(self, ps, loss_and_grads, lr, longest=100):
        self.ps, self.loss_and_grads, self.lr = ps, loss_and_grads, lr
        self.saved = [p.copy() for p in ps]
        self.kept = self.pending = None
        self.open = False                                # a run launched and not yet taken
        self.longest = longest                           # steps per run at most

    def _step(self):
        L, grads = self.loss_and_grads(self.ps)
        _descend(self.ps, grads, self.lr)
        return L

    def _run(self, n):
        """n steps in place; their losses."""
        return array_module(*self.ps).stack([self._step() for _ in range(n)]) if n else None

    def _save(self):
        for s, p in zip(self.saved, self.ps):
            s[...] = p

    def launch(self, n, keep=False):
        """Start n steps; False when they cannot be launched (nothing changed then)."""
        self.kept = [p.copy() for p in self.ps] if keep else None
        self._save()
        self.open = True
        self.pending = self._run(n)
        return True

    def wait(self):
        losses, self.pending = self.pending, None
        return to_numpy(losses)

    def rewind(self, j):
        """Back to the start of the last run, then its first j steps again (the caller
        closes the run: ``open`` = False with its step count, in one statement)."""
        for s, p in zip(self.saved, self.ps):
            p[...] = s
        self._run(j)

    def cancel(self):
        """Back to the start of a run that was launched and not taken (Ctrl-C)."""
        self.pending = None
        if self.open:
            self.rewind(0)
        self.open = False
