"""align.py's training and measures, faster, and for batches of networks trained together.

Copy it with align.py.  Each public function equals its align.py namesake up to rounding
(tests/test_fast.py holds every path to align.py's reference), so a script can switch:

    import align_fast
    weights, history = align_fast.train(weights, X, Y)        # align.train's iterates, faster

A batch is B networks in one list of 3-D layers (B, k_i, k_{i-1}), with X and Y shared or one
per network (B, k, n) and ``lr`` one number or one per network.  Each network stops where it
would alone: at its first recorded loss below ``tol``, or where its loss stops being finite
(the batch raises DivergenceError only when every network diverged).  ``alignment``,
``invariance`` and ``tracker`` give one value per network of a batch.

Where the speed comes from (docs/performance.md):
- training: the first layer kept in the row space of X when n < k0; Eq. (8)'s products
  grouped the cheaper way; squared-loss steps run in place (NumPy) or replayed from CUDA
  graphs (CuPy, align_cuda.py), chosen by ``steps``;
- measures: Gram-matrix and batched decompositions, the paired rule vectorised where the
  singular values are distinct, networks of a batch that did not move not measured again;
- CUDA kernels (align_cuda.py) for small SVDs, the greedy matching and Corollary 1.
"""
import concurrent.futures
import dataclasses
import functools
import inspect
import math
import operator
import os
import time

import numpy as np

import align
from align import array_module, to_numpy

__all__ = ["train", "gradient_descent", "tracker", "alignment", "invariance",
           "singular_value_dynamics", "STEPS", "GRAPH_STEPS"]

STEPS = ("auto", "plain", "in_place", "graphs")   # how train takes its steps (see train)
GRAPH_STEPS = 100                                 # GD steps per CUDA graph launch


def _T(A):
    return A.swapaxes(-1, -2)


# ----------------------------------------------------------- batches at the boundary --
def _is_batch(weights):
    """Whether ``weights`` are a batch's layers (3-D); ragged input is left to align's errors."""
    try:
        return isinstance(weights, (list, tuple)) and len(weights) > 0 and np.ndim(weights[0]) == 3
    except ValueError:
        return False


def as_batch(weights):
    """A batch's layers converted (align.as_array) and checked: 3-D, one number B of networks,
    finite, chaining (align.as_weights on the first network)."""
    weights = [align.as_array(f"W_{i}", W) for i, W in enumerate(weights, 1)]
    B = weights[0].shape[0]
    for i, W in enumerate(weights, 1):
        if W.ndim != 3 or W.shape[0] != B or B == 0:
            raise ValueError(f"W_{i} must be B x k_{i} x k_{i - 1} with B = {B} >= 1 networks "
                             f"(as W_1), got shape {'x'.join(map(str, W.shape))}")
        align.check_finite(f"W_{i}", W)
    align.as_weights([W[0] for W in weights])                    # the shapes chain
    return weights


def as_problem(weights, X, Y, kind):
    """(weights, X, Y) checked and converted, Y prepared for ``kind``: one network as in
    align.as_network, or a batch (X and Y shared, or one set per network first)."""
    if not _is_batch(weights):
        return align.as_network(weights, X, Y, kind)
    weights = as_batch(weights)
    B, first = weights[0].shape[0], [W[0] for W in weights]
    X = align.as_array("X", X)
    for Xb in (X if X.ndim == 3 else [X]):
        align.as_inputs(first, Xb)
    labels = kind == "ce" and array_module(Y).asarray(Y).dtype.kind in "iu"
    own = np.ndim(Y) == (2 if labels else 3)                  # one set of targets per network
    for name, a, given in (("X", X, X.ndim == 3), ("Y", Y, own)):
        if given and len(a) != B:
            raise ValueError(f"{name} holds data for {len(a)} networks but the batch has B = {B}: "
                             f"give one set per network, or one shared set")
    kd, n = weights[-1].shape[-2], X.shape[-1]
    Ys = [align.as_targets(Yb, kind, kd, n) for Yb in (Y if own else [Y])]
    return weights, X, array_module(Ys[0]).stack(Ys) if own else Ys[0]


def network_rates(lr, weights):
    """``lr`` as train applies it: a number, or for a batch one per network as a (B, 1, 1)
    array (network b steps W_i <- W_i - lr_b dL/dW_i)."""
    if np.ndim(lr) == 0:
        return lr
    try:
        rates, W = np.asarray(to_numpy(lr), dtype=np.float64), weights[0]
    except (ValueError, TypeError):
        raise ValueError(f"lr must be a number or one number per network, got {lr!r}") from None
    if W.ndim != 3 or rates.shape != W.shape[:1]:
        raise ValueError(f"lr of shape {rates.shape}: give one number, or one per network of a "
                         f"batch ({W.shape[0] if W.ndim == 3 else 'these weights are not a batch'})")
    if not (np.all(rates > 0) and np.all(np.isfinite(rates))):
        raise ValueError(f"lr must hold positive finite numbers, got {lr}")
    return array_module(W).asarray(rates.reshape(-1, 1, 1), dtype=W.dtype)


def _check(lr, max_steps, record_every, measure_every, tol, steps, callback):
    """align.check_schedule for a number or per-network rates, and the ``steps`` choice."""
    if steps not in STEPS:
        raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
    align.check_schedule(lr if np.ndim(lr) == 0 else float(lr.max()), max_steps, record_every,
                         measure_every, tol, callback)


# ----------------------------------------------------------------------- training --
def train(weights, X, Y, kind="mse", lr=1e-2, max_steps=10_000, tol=1e-4, record_every=1,
          measure_every=100, measures=None, callback=None, steps="auto"):
    """align.train with the same iterates (to rounding; tested), faster, and for batches.

    Parameters
    ----------
    weights, X, Y, kind, lr, max_steps, tol, record_every, measure_every, measures, callback
        As in align.train; a batch as in the module docstring (``measures`` get the batch
        and return one value per network, as ``tracker`` does).
    steps : {"auto", "plain", "in_place", "graphs"}
        How the steps between measurements run: "in_place", a squared loss's steps into
        preallocated NumPy arrays (dense layers of one dtype); "graphs", GRAPH_STEPS steps per
        CUDA graph (CuPy); "plain", one step at a time, as align.train; "auto" (default),
        the first of graphs and in_place that applies, else plain.

    Returns, Raises
    ---------------
    As align.train: (weights, History), DivergenceError, Interrupted.
    """
    weights, X, Y = as_problem(weights, X, Y, kind)
    Y, lr = Y.astype(weights[0].dtype), network_rates(lr, weights)
    _check(lr, max_steps, record_every, measure_every, tol, steps, callback)
    schedule = (lr, max_steps, tol, record_every, measure_every, align.as_measures(measures),
                callback)
    if X.shape[-1] < X.shape[-2]:
        return _train_in_row_space(weights, X, Y, kind, schedule, steps)
    in_place = None
    if kind in ("mse", "mse_mean") and array_module(X) is np and \
            all(a.dtype == X.dtype for a in weights + [Y]) and \
            not _cheaper_at_outputs(tuple(W.shape[-2:] for W in weights), X.shape[-1]):
        if X.ndim == 2 and all(a.ndim == 2 for a in weights + [Y]):
            in_place = lambda ps: _SquaredLossSteps(ps, X, Y, kind, lr)
        elif all(W.ndim == 3 for W in weights):
            in_place = lambda ps: _BatchSquaredLossSteps(ps, X, Y, kind, lr, tol)
    loss_and_grads = _frozen_below(lambda ws, matmul=operator.matmul: _chain_gradients(
        ws, X, lambda F: _loss_at_outputs(F, Y, kind), matmul), tol, weights[0].ndim == 3)
    return _descend(weights, loss_and_grads, schedule, _runner(steps, loss_and_grads, lr, in_place))


def gradient_descent(params, loss_and_grads, lr=1e-2, max_steps=10_000, tol=1e-4,
                     record_every=1, measure_every=100, measures=None, callback=None,
                     steps="auto"):
    """align.gradient_descent with the same iterates and History; on CuPy the steps between
    measurements replay from CUDA graphs (``steps`` "auto" or "graphs"; "plain": one by one).
    A ``loss_and_grads(params, matmul)`` that takes ``matmul`` does its products with it,
    so that a graph can call cuBLAS directly (CuPy refuses cuBLAS during a capture).

    Parameters, Returns, Raises: as align.gradient_descent (one ``lr`` for every parameter).
    """
    if np.ndim(lr) != 0:
        raise ValueError(f"gradient_descent takes one lr (a number), got {lr!r}; for one rate "
                         "per network of a batch use train(lr=[...])")
    _check(lr, max_steps, record_every, measure_every, tol, steps, callback)
    params = align.as_params(params)
    if steps == "in_place":
        raise ValueError("steps='in_place' needs train's squared loss; gradient_descent takes "
                         "'auto', 'plain' or 'graphs'")
    if "matmul" not in inspect.signature(loss_and_grads).parameters:
        loss_and_grads = functools.partial(_without_matmul, loss_and_grads)
    schedule = (lr, max_steps, tol, record_every, measure_every, align.as_measures(measures),
                callback)
    return _descend(params, loss_and_grads, schedule, _runner(steps, loss_and_grads, lr))


def _without_matmul(loss_and_grads, ps, matmul=None):
    return loss_and_grads(ps)


def _runner(steps, loss_and_grads, lr, in_place=None):
    """``runner(ps)``: the runs of steps that ``steps`` chooses for these parameters (None:
    one by one).  CUDA graphs for CuPy arrays; ``in_place(ps)`` for NumPy."""
    def runner(ps):
        gpu = array_module(*ps) is not np
        if steps == "graphs" and not gpu or steps == "in_place" and in_place is None:
            raise ValueError(f"steps={steps!r} does not apply here: 'graphs' needs CuPy arrays, "
                             "'in_place' a squared loss on NumPy arrays of one dtype")
        if steps in ("auto", "graphs") and gpu:
            import align_cuda
            return align_cuda.GraphSteps(ps, functools.partial(_step, loss_and_grads, lr),
                                         GRAPH_STEPS)
        return in_place(ps) if steps in ("auto", "in_place") and in_place else None
    return runner


def _step(loss_and_grads, lr, ps, matmul=operator.matmul):
    """One GD step p <- p - lr g in place, its products by ``matmul``; the loss before it."""
    L, grads = loss_and_grads(ps, matmul)
    for p, g in zip(ps, grads):
        p -= lr * g
    return L


def _frozen_below(loss_and_grads, tol, batched):
    """For a batch of more than one network: the gradients of those whose loss is below tol,
    or no longer finite, set to zero, so that each stops where its own run would (a lone
    network is left to the run's stop)."""
    def wrapped(ps, matmul=operator.matmul):
        L, grads = loss_and_grads(ps, matmul)
        xp = array_module(L)
        active = None if L.shape[0] == 1 else (L >= tol) & xp.isfinite(L)
        if active is None or (xp is np and bool(active.all())):
            return L, grads                                   # (a host check: cheaper)
        return L, [xp.where(active[:, None, None], g, 0.0) for g in grads]
    return wrapped if batched else loss_and_grads


def _loss_at_outputs(F, Y, kind):
    """align.loss_and_output_gradient, and each network's loss for a batch (3-D F)."""
    if F.ndim == 3 and kind in ("mse", "mse_mean"):
        kd, n = F.shape[-2:]
        R = F - Y
        if kind == "mse":
            return (R * R).sum((-2, -1)) / (2 * n), R / n
        return (R * R).sum((-2, -1)) / (kd * n), R * (2.0 / (kd * n))
    return align.loss_and_output_gradient(F, Y, kind)


# ------------------------------------------------------- the loop of steps, in runs --
@dataclasses.dataclass
class _Run:
    """The bookkeeping of one run: its rules, its ``step``, what it recorded (``hist``)."""
    lr: object
    max_steps: int
    tol: float
    record_every: int
    callback: object
    measures: dict
    params0: list
    hist: align.History = dataclasses.field(default_factory=align.History)
    step: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def measure(self, at):
        """Record every measure of ``at`` (align.measure_into); networks of a batch that
        diverged are measured at their start and recorded as NaN."""
        bad = _diverged(at)
        if bad is None:
            return align.measure_into(self.hist, self.measures, at, self.params0, self.step)
        xp = array_module(*at)
        at = [xp.where(bad[:, None, None], p0, p) for p, p0 in zip(at, self.params0)]
        masked = {name: functools.partial(_masked, fn, bad) for name, fn in self.measures.items()}
        align.measure_into(self.hist, masked, at, self.params0, self.step)

    def stops(self, step, L):
        """Record the loss of ``step`` (before its update); True when the run ends there."""
        hist = self.hist
        if step % self.record_every == 0 or step == self.max_steps:
            value = to_numpy(L).copy() if getattr(L, "ndim", 0) else float(L)   # a batch: a row
            worst = value if isinstance(value, float) else _worst_loss(value)
            if not math.isfinite(worst):
                hist.stop_reason, hist.final_step = "diverged", step
                hist.wall_time = time.perf_counter() - self.start
                lr = np.asarray(to_numpy(self.lr)).max()
                raise align.DivergenceError(
                    f"loss became {worst} at step {step} with lr = {lr:g}"
                    f"{'' if np.ndim(self.lr) == 0 else ' (the largest)'}; try a smaller "
                    f"learning rate (e.g. {lr / 10:g})", hist)
            hist.steps.append(step)
            hist.losses.append(value)
            if self.callback:
                self.callback(step, worst, hist)
            if worst < self.tol:
                hist.stop_reason = "tol"
        if step >= self.max_steps and not hist.stop_reason:
            hist.stop_reason = "max_steps"
        return bool(hist.stop_reason)

    def finish(self, ps):
        """The final measurement (unless taken at this step); the History."""
        self.hist.final_step = self.step
        if self.hist.measure_steps[-1:] != [self.step]:
            try:
                self.measure(ps)
            except KeyboardInterrupt:            # a second Ctrl-C: the run ends without it
                self.hist.stop_reason = "interrupted"
        self.hist.wall_time = time.perf_counter() - self.start
        return self.hist


def _masked(fn, bad, at, at0):
    """fn's values with those of the networks ``bad`` NaN."""
    value = fn(at, at0)
    out = {}
    for key, v in (value.items() if isinstance(value, dict) else [(None, value)]):
        if getattr(v, "shape", ())[:1] == bad.shape:            # one value per network
            mask = bad.reshape(bad.shape + (1,) * (v.ndim - 1))
            v = array_module(v).where(mask, math.nan, v.astype(float))
        out[key] = v
    return out if isinstance(value, dict) else out[None]


def _worst_loss(losses):
    """The largest finite loss of a batch's row; NaN when none is (every network diverged)."""
    finite = losses[np.isfinite(losses)]
    return float(finite.max()) if finite.size else math.nan


def _diverged(params):
    """For a batch: a mask of the networks with a non-finite entry, or None when none has
    (or no batch)."""
    if params[0].ndim != 3:
        return None
    xp = array_module(*params)
    bad = ~xp.stack([xp.isfinite(p).all(axis=(1, 2)) for p in params]).all(axis=0)
    return bad if bool(bad.any()) else None


def _descend(params, loss_and_grads, schedule, runner):
    """align.gradient_descent's loop, the steps between measurements taken as runs where
    ``runner(ps)`` gives them (on a GPU the measurement due at a run's start is taken from a
    copy while the run goes on); a stop inside a run is replayed step by step, so the
    History is the step-by-step loop's.  Returns (params, History)."""
    lr, max_steps, tol, record_every, measure_every, measures, callback = schedule
    ps = [p.copy() for p in params]
    run = _Run(lr, max_steps, tol, record_every, callback, measures, [p.copy() for p in params])
    chunks, xp = runner(ps), array_module(*ps)
    spare = None if chunks else [p.copy() for p in ps]
    before = marks = None
    with np.errstate(over="ignore", invalid="ignore"):    # divergence is reported by run.stops
        try:
            while True:
                due = run.step % measure_every == 0
                span = min(chunks.longest, measure_every - run.step % measure_every,
                           run.max_steps - run.step) if chunks else 0
                marks = len(run.hist.steps), len(run.hist.losses)
                launched = span > 1 and chunks.launch(span, keep=due)   # a run to the next measurement
                if due:                                 # (on the GPU while that run goes on)
                    run.measure(chunks.kept if launched else ps)
                if launched:
                    if _advance(run, chunks.wait(), chunks):
                        break
                    continue
                L, grads = loss_and_grads(ps)           # one step, kernel by kernel
                align.check_gradients(grads, ps)
                if run.stops(run.step, L):
                    break
                if chunks is None:                      # into the spare arrays, then swapped
                    for p, g, new in zip(ps, grads, spare):
                        xp.subtract(p, lr * g, out=new)
                    ps, spare, run.step = spare, ps, run.step + 1   # (a whole step or none)
                    continue
                before = [p.copy() for p in ps]         # (the runs hold ps: updated in place)
                for p, g in zip(ps, grads):
                    p -= lr * g
                before, run.step = None, run.step + 1
        except KeyboardInterrupt:
            run.hist.stop_reason = "interrupted"
            if chunks and chunks.open:                  # a run not taken whole: its records go,
                del run.hist.steps[marks[0]:], run.hist.losses[marks[1]:]
            if chunks:
                chunks.cancel()                         # and its steps (back to run.step)
            for p, b in zip(ps, before or ()):          # (a step cut short: undone)
                p[...] = b
    hist = run.finish(ps)
    if hist.stop_reason == "interrupted":
        raise align.Interrupted(ps, hist)
    return ps, hist


def _advance(run, losses, chunks):
    """run.stops() for each row of a run's losses (vectorised; a run ends before max_steps);
    moves run.step to where the parameters are.  True when the run ends inside the chunk
    (then rewound to there), also on Ctrl-C in the callback."""
    hist, step = run.hist, run.step
    if losses.ndim == 1:
        worst = losses
    else:                                  # the largest finite loss of each row (_worst_loss)
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


class _StepRuns:
    """Runs of GD steps in place: ``launch(n)`` takes n steps, ``wait()`` returns their n
    losses (one row per step, each before its update); ``rewind(j)`` goes back to the start
    of the last run and redoes its first j steps (a stop inside it); ``cancel()`` goes back
    to its start.  With ``launch(n, keep=True)``, ``kept`` holds the parameters at the start.
    Here ``step(ps)`` takes each step kernel by kernel; subclasses step in ``_run(n)``;
    align_cuda.GraphSteps keeps the same protocol."""

    def __init__(self, ps, lr, longest, step=None):
        self.ps, self.lr, self.longest, self.step = ps, lr, longest, step
        self.saved = [p.copy() for p in ps]
        self.kept = self.pending = None
        self.open = False                                # a run launched and not yet taken

    def _save(self):
        for s, p in zip(self.saved, self.ps):
            s[...] = p

    def _run(self, n):
        """n steps in place; their losses."""
        if n > self.longest:
            raise ValueError(f"a run of {n} steps is longer than this runner's {self.longest}")
        return array_module(*self.ps).stack([self.step(self.ps) for _ in range(n)])

    def launch(self, n, keep=False):
        self.kept = [p.copy() for p in self.ps] if keep else None
        self._save()
        self.open = True
        self.pending = self._run(n)
        return True

    def wait(self):
        losses, self.pending = self.pending, None
        return to_numpy(losses)

    def rewind(self, j):
        """Back to the start of the last run, then its first j steps again (the caller closes
        the run: ``open`` = False with its step count, in one statement)."""
        for s, p in zip(self.saved, self.ps):
            p[...] = s
        if j:
            self._run(j)

    def cancel(self):
        """Back to the start of a run that was launched and not taken (Ctrl-C)."""
        self.pending = None
        if self.open:
            self.rewind(0)
        self.open = False


class _SquaredLossSteps(_StepRuns):
    """Runs of GD steps of one dense network (NumPy, one dtype) under a squared loss:
    Eq. (8)'s backward pass into preallocated arrays, with lr applied once to dL/dF (so the
    products give lr dL/dW_i directly: align's update to rounding), the d updates done as
    one on a flat copy of the parameters, and for k x k layers the d gradient products as
    one batched product.  Small networks are bound by the number of NumPy calls, not by
    flops: this makes a step about half as many."""

    def __init__(self, ps, X, Y, kind, lr):
        super().__init__(ps, lr, longest=1000)
        ends = np.cumsum([0] + [p.size for p in ps])
        self.flat, self.grad = (np.empty(ends[-1], dtype=X.dtype) for _ in range(2))
        self.W = [self.flat[a:b].reshape(p.shape) for a, b, p in zip(ends, ends[1:], ps)]
        self.G = [self.grad[a:b].reshape(p.shape) for a, b, p in zip(ends, ends[1:], ps)]
        (k0, n), kd, d = X.shape, Y.shape[0], len(ps)
        self.stacked = all(p.shape == (k0, k0) for p in ps)
        if self.stacked:                                 # acts[i], deltas[i] as stacks
            self.stack, self.deltas = np.empty((d + 1, k0, n), X.dtype), np.empty((d, k0, n), X.dtype)
            self.stack[0] = X
            self.acts = list(self.stack)
        else:
            self.acts = [X] + [np.empty((p.shape[0], n), X.dtype) for p in ps]
            self.deltas = [np.empty((p.shape[0], n), X.dtype) for p in ps]   # dL/d(acts[i + 1])
        self.Y = Y
        # Small outputs: each step's residual F - Y kept, the losses summed after the run
        # (one NumPy call less a step); large ones: each loss at its step.
        small = self.longest * Y.size * Y.itemsize <= RESIDUALS_BYTES
        self.residuals = np.empty((self.longest,) + Y.shape, Y.dtype) if small else None
        self.rows = list(self.residuals) if small else [self.acts[-1]] * self.longest
        self.divisor = 2 * n if kind == "mse" else kd * n
        self.rate = lr * (1.0 / n if kind == "mse" else 2.0 / (kd * n))   # lr dL/dF = rate (F - Y)

    def _run(self, n):
        if n > self.longest:
            raise ValueError(f"a run of {n} steps is longer than this runner's {self.longest}")
        mm, W, acts, deltas = np.matmul, self.W, self.acts, self.deltas
        forward = list(zip(W, acts, acts[1:]))
        backward = [(W[i].T, deltas[i], deltas[i - 1]) for i in range(len(W) - 1, 0, -1)]
        if self.stacked:                                 # all d gradients in one product
            grads = [(deltas, self.stack[:-1].swapaxes(1, 2), self.grad.reshape(len(W), *W[0].shape))]
        else:
            grads = [(deltas[i], acts[i].T, self.G[i]) for i in range(len(W))]
        top, Y, rate, F = deltas[-1], self.Y, self.rate, self.acts[-1]
        subtract, multiply, vdot = np.subtract, np.multiply, np.vdot
        flat, grad, buffered = self.flat, self.grad, self.residuals is not None
        losses = np.empty(n, dtype=F.dtype)
        for w, p in zip(W, self.ps):
            w[...] = p
        for t, R in zip(range(n), self.rows):           # (all names local: fewer lookups)
            for w, a, out in forward:
                mm(w, a, out)
            subtract(F, Y, R)
            if not buffered:
                losses[t] = vdot(R, R)
            multiply(R, rate, top)                       # lr times dL/dF: lr-scaled gradients
            for w_t, delta, below in backward:
                mm(w_t, delta, below)
            for delta, a_t, g in grads:
                mm(delta, a_t, g)
            subtract(flat, grad, flat)
        for w, p in zip(W, self.ps):
            p[...] = w
        if buffered:
            R = self.residuals[:n]
            losses = np.einsum("tij,tij->t", R, R)
        return losses / self.divisor


RESIDUALS_BYTES = 1 << 22      # _SquaredLossSteps keeps a run's residuals up to this size


class _BatchSquaredLossSteps(_StepRuns):
    """Runs of GD steps of a batch of dense networks (NumPy) under a squared loss, with the
    plain loop's iterates on _frozen_below's gradients bit for bit: the same products, sums
    and updates in the same order, into preallocated arrays, and only the networks still
    moving stepped.  A network stops for good at the first step whose loss is below tol or
    not finite (where _frozen_below zeroes its gradient): it then leaves the arrays, and
    the batch's steps cost what the moving networks' cost.  A batch of one never stops
    inside a run (_frozen_below leaves a lone network to the run's stop)."""

    def __init__(self, ps, X, Y, kind, lr, tol):
        super().__init__(ps, lr, longest=1000)
        b, dtype = ps[0].shape[0], ps[0].dtype
        self.X, self.Y = (np.broadcast_to(a, (b,) + a.shape[-2:]) for a in (X, Y))
        self.kind, self.tol, self.freezes = kind, tol, b > 1
        self.rates = np.broadcast_to(np.asarray(lr, dtype=dtype).reshape(-1), (b,))
        self.moving = np.ones(b, dtype=bool)             # not yet stopped
        self.still = np.full(b, np.nan, dtype=dtype)     # the loss where each stopped (read
        self.saved_moving = self.moving.copy()           # only for those not moving)
        self.n, self.kd = X.shape[-1], Y.shape[-2]

    def _save(self):
        super()._save()
        self.saved_moving[...] = self.moving

    def rewind(self, j):
        self.moving[...] = self.saved_moving
        super().rewind(j)

    def _arrays(self, idx):
        """The moving networks ``idx``'s parameters (copies, one flat array laid out layer
        by layer) and buffers for their steps: [W_i], acts, deltas, gradients, rates."""
        ps, m, dtype = self.ps, idx.size, self.ps[0].dtype
        ends = np.cumsum([0] + [m * p[0].size for p in ps])
        flat, grad = np.empty(ends[-1], dtype), np.empty(ends[-1], dtype)
        W = [flat[a:e].reshape((m,) + p.shape[1:]) for a, e, p in zip(ends, ends[1:], ps)]
        for w, p in zip(W, ps):
            np.take(p, idx, axis=0, out=w)
        X, n = self.X[idx], self.n
        if all(p.shape[1:] == X.shape[1:2] * 2 for p in ps):          # k x k layers: stacks
            acts = np.empty((len(ps) + 1,) + X.shape, dtype)
            deltas = np.empty((len(ps),) + X.shape, dtype)
            acts[0] = X
            grads = [(deltas, acts[:-1].swapaxes(-1, -2), grad.reshape((len(ps),) + W[0].shape))]
        else:
            acts = [X] + [np.empty((m, p.shape[1], n), dtype) for p in ps]
            deltas = [np.empty((m, p.shape[1], n), dtype) for p in ps]
            G = [grad[a:e].reshape((m,) + p.shape[1:]) for a, e, p in zip(ends, ends[1:], ps)]
            grads = [(deltas[i], acts[i].swapaxes(-1, -2), G[i]) for i in range(len(ps))]
        rates = np.concatenate([np.repeat(self.rates[idx], p[0].size) for p in ps]) \
            if np.ndim(self.lr) else self.lr
        return flat, grad, W, list(acts), list(deltas), grads, rates

    def _run(self, n):
        if n > self.longest:
            raise ValueError(f"a run of {n} steps is longer than this runner's {self.longest}")
        losses = np.empty((n, self.moving.size), dtype=self.ps[0].dtype)
        t = 0
        while t < n:
            t = self._run_moving(losses, t, n)
        return losses

    def _run_moving(self, losses, t0, n):
        """Steps t0.. of the run on the networks still moving, until one stops (then it
        leaves: the arrays are made again) or the run ends; the step reached."""
        idx = np.flatnonzero(self.moving)
        losses[t0:] = self.still
        if not idx.size:
            return n
        flat, grad, W, acts, deltas, grads, rates = self._arrays(idx)
        Y, F, R, top = self.Y[idx], acts[-1], np.empty_like(acts[-1]), deltas[-1]
        squares, sq = np.empty_like(R), np.empty(idx.size, R.dtype)
        by_network = squares.reshape(idx.size, -1)       # (the sum over both axes: bit for bit)
        rows = np.empty((n, idx.size), R.dtype)          # the moving networks' losses
        mm, subtract, multiply, divide, add = np.matmul, np.subtract, np.multiply, np.divide, np.add
        least, most, inf = np.minimum.reduce, np.maximum.reduce, np.inf
        forward = list(zip(W, acts, acts[1:]))
        backward = [(W[i].swapaxes(-1, -2), deltas[i], deltas[i - 1]) for i in range(len(W) - 1, 0, -1)]
        # _loss_at_outputs's loss and dL/dF, the same operations:
        if self.kind == "mse":
            loss_divisor, grad_op, grad_by = 2 * self.n, divide, self.n
        else:
            loss_divisor, grad_op, grad_by = self.kd * self.n, multiply, 2.0 / (self.kd * self.n)
        tol, freezes, t = self.tol, self.freezes, t0
        while t < n:
            for w, a, out in forward:
                mm(w, a, out)
            subtract(F, Y, R)
            multiply(R, R, squares)
            add.reduce(by_network, axis=1, out=sq)
            L = rows[t]
            divide(sq, loss_divisor, out=L)
            if freezes and not (least(L) >= tol and most(L) < inf):   # some stop here
                stop = ~((L >= tol) & np.isfinite(L))        # (_frozen_below's rule)
                self.still[idx[stop]] = L[stop]
                self.moving[idx[stop]] = False
                break
            grad_op(R, grad_by, top)
            for w_t, delta, below in backward:
                mm(w_t, delta, below)
            for delta, a_t, g in grads:
                mm(delta, a_t, g)
            multiply(rates, grad, grad)
            subtract(flat, grad, flat)
            t += 1
        losses[t0:t, idx] = rows[t0:t]
        for p, w in zip(self.ps, W):                     # the moving networks back in the batch
            p[idx] = w
        return t


# -------------------------------------------------------------- Eq. (8), grouped --
def _chain_gradients(weights, X, output_grad, matmul=operator.matmul, input_grad=False):
    """(L, [dL/dW_i], and with ``input_grad`` dL/dX) for F = W_d ... W_1 X and
    ``output_grad(F) -> (L, dL/dF)``: Eq. (8) with its products (``matmul``) grouped the
    cheaper way for the shapes, layer by layer (backpropagation) or at the outputs."""
    if not weights:
        L, delta = output_grad(X)
        return (L, [], delta) if input_grad else (L, [])
    if _cheaper_at_outputs(tuple(W.shape[-2:] for W in weights), X.shape[-1]):
        return _grouped_at_outputs(weights, X, output_grad, matmul, input_grad)
    acts = [X]
    for W in weights:                                    # Eq. (1)
        acts.append(matmul(W, acts[-1]))
    L, delta = output_grad(acts[-1])
    grads = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):            # Eq. (8), as align.backward
        grads[i] = matmul(delta, _T(acts[i]))
        if i or input_grad:
            delta = matmul(_T(weights[i]), delta)
    return (L, grads, delta) if input_grad else (L, grads)


def _chain_costs(shapes, n):
    """Multiply-adds of Eq. (8)'s products with the input's gradient, for layers of shapes
    ((k_1, k_0), ..., (k_d, k_{d-1})) on n samples: (layer by layer, grouped at the
    outputs).  Layer by layer: 3 n sum k_i k_{i-1}; at the outputs 3 k_d k_0 n plus
    products of the weights alone.  So the outputs win when k_d and k_0 are small next to
    n and the hidden widths."""
    (_, k0), (kd, _) = shapes[0], shapes[-1]
    by_layer = 3 * n * sum(r * c for r, c in shapes)
    at_outputs = 3 * kd * k0 * n + sum(r * c * k0 + kd * k0 * c for r, c in shapes[1:]) + \
        sum(kd * r * c for r, c in shapes[:-1]) + sum(kd * r * c for r, c in shapes[1:-1])
    return by_layer, at_outputs


AT_OUTPUTS_GAIN = 2     # group at the outputs for at least this factor fewer flops (it
                        # takes more, smaller products: tiny networks are bound by calls)


@functools.lru_cache(maxsize=None)
def _cheaper_at_outputs(shapes, n):
    """Whether _chain_gradients groups at the outputs (see _chain_costs)."""
    by_layer, at_outputs = _chain_costs(shapes, n)
    return AT_OUTPUTS_GAIN * at_outputs < by_layer


def _grouped_at_outputs(weights, X, output_grad, matmul, input_grad):
    """Eq. (8) with S_j = W_j ... W_1 and T_j = W_d ... W_{j+1} formed first: F = S_d X,
    E = dL/dF X^T (k_d x k_0), dL/dW_j = T_j^T E S_{j-1}^T, dL/dX = S_d^T dL/dF."""
    S = [weights[0]]
    for W in weights[1:]:
        S.append(matmul(W, S[-1]))
    L, delta = output_grad(matmul(S[-1], X))
    E = matmul(delta, _T(X))
    grads, T = [None] * len(weights), None          # T = T_{j+1} (None: the identity)
    for j in range(len(weights) - 1, -1, -1):
        G = matmul(E, _T(S[j - 1])) if j else E
        grads[j] = G if T is None else matmul(_T(T), G)
        if j:
            T = weights[j] if T is None else matmul(T, weights[j])
    return (L, grads, matmul(_T(S[-1]), delta)) if input_grad else (L, grads)


# ---------------------------------------------------------------------- row space --
def _train_in_row_space(weights, X, Y, kind, schedule, steps):
    """GD with the same iterates as plain GD, in fewer flops when n < k0.  Three exact steps:

    1. Row space: every gradient of W_1 is D X^T (Eq. (8)), so W_1 = W_1(0) + C X^T and
       the first layer's output is W_1(0) X + C (X^T X); C <- C - lr D reproduces
       W_1 <- W_1 - lr D X^T, and the k_1 x k_0 matrix is never touched.
    2. Rotated samples: with X = P S R^T (SVD), linear layers map X R to f(X) R, and
       (X R)^T (X R) is the diagonal S^2, so step 1 costs k_1 n instead of k_1 n^2.
       Squared losses only see ||Y - f(X)||_F: the data (X R, Y R) give the same
       iterates.  Other losses see the samples: their outputs are turned back,
       f(X) = (f(X) R) R^T, and dL/d(f(X) R) = dL/df(X) R, two k_d n^2 products for one
       of k_1 n^2 (so only where k_1 >= ROTATE_BACK_MIN k_d: the two read R twice).
    3. The first hidden space: the columns of W_1 X and the rows of W_2 stay in
       span(W_1(0) X) + span(W_2(0)^T) (each update of one lies in the span of the
       other), of dimension m <= n + k_2 (the rank of [W_1(0) X, W_2(0)^T]); GD runs
       on its coordinates Q^T (W_1 X) and W_2 Q, so k_1 becomes m.  (Unbatched
       networks of depth >= 2.)  Measurements then use ``_split_first_layers``.
    """
    lr, max_steps, tol, record_every, measure_every, measures, callback = schedule
    xp, W10 = array_module(weights[0]), weights[0]
    Q = _first_hidden_basis(weights, X)
    squared = kind in ("mse", "mse_mean")
    hidden = W10.shape[-2] if Q is None else Q.shape[1]
    rotated = squared or hidden >= ROTATE_BACK_MIN * Y.shape[-2]
    if rotated:
        X, Y, K, R = _rotated_samples(X, Y, squared)
        Rt = None if R is None else xp.ascontiguousarray(_T(R))
    else:
        K = _T(X) @ X
    Xt = _T(X)
    A0 = W10 @ X if Q is None else _T(Q) @ (W10 @ X)
    rest = [W.copy() for W in weights[1:]]
    if Q is not None:
        rest[0] = rest[0] @ Q
    start = [xp.zeros(A0.shape[:-1] + (X.shape[-1],), dtype=W10.dtype)] + rest

    def output_grad(F, matmul):
        if squared or not rotated:
            return _loss_at_outputs(F, Y, kind)
        L, delta = _loss_at_outputs(matmul(F, Rt), Y, kind)          # the samples' own outputs
        return L, matmul(delta, R)

    def loss_and_grads(ps, matmul=operator.matmul):
        H = A0 + ps[0] * K if rotated else A0 + matmul(ps[0], K)
        L, grads, dH = _chain_gradients(ps[1:], H, lambda F: output_grad(F, matmul), matmul,
                                        input_grad=True)
        return L, [dH] + grads

    def weights_of(ps):
        if Q is None:
            return [W10 + ps[0] @ Xt] + list(ps[1:])
        return [W10 + Q @ (ps[0] @ Xt), ps[1] @ _T(Q)] + list(ps[2:])
    split, same_start = [], {}                   # built at the first measurement

    def measured(fn, ps):
        if id(fn) not in same_start:             # a tracker of this run's start (else its own)
            same_start[id(fn)] = isinstance(fn, Tracker) and fn.starts_at(weights)
        if Q is not None and same_start[id(fn)]:
            if not split:
                split.append(_split_measure(W10, Q, Xt, start))
            value = split[0] and split[0](fn, ps)
            if value is not None:
                return value
        return fn(weights_of(ps), weights)
    wrapped = {name: (lambda ps, _, fn=fn: measured(fn, ps)) for name, fn in measures.items()}
    per_network = _frozen_below(loss_and_grads, tol, W10.ndim == 3)
    inner = (lr, max_steps, tol, record_every, measure_every, wrapped, callback)
    try:
        out, hist = _descend(start, per_network, inner, _runner(steps, per_network, lr))
    except align.Interrupted as stop:
        raise align.Interrupted(weights_of(stop.weights), stop.history) from None
    return weights_of(out), hist


ROTATE_BACK_MIN = 8     # see _train_in_row_space, step 2


def _first_hidden_basis(weights, X):
    """Q, an orthonormal basis of span(W_1(0) X) + span(W_2(0)^T) (step 3 of
    _train_in_row_space), or None where it would not be smaller than k_1 (or for a batch
    or one layer).  Its rank is taken at the weights' precision."""
    W10 = weights[0]
    if len(weights) < 2 or W10.ndim != 2 or X.ndim != 2 or \
            X.shape[1] + weights[1].shape[0] >= W10.shape[0]:
        return None
    f64 = np.float64
    both = array_module(W10).concatenate([W10.astype(f64) @ X.astype(f64),
                                          _T(weights[1]).astype(f64)], axis=1)
    return _range_basis(both, 100 * np.finfo(W10.dtype).eps).astype(W10.dtype)


def _rotated_samples(X, Y, squared):
    """Step 2 of _train_in_row_space: (X R, Y', K, R') with X = P S R^T and K = S^2 as a
    row (the diagonal of (X R)^T (X R)); for a squared loss Y' = Y R and R' = None, else
    Y' = Y and R' = R (contiguous), to turn the outputs back to the samples."""
    xp = array_module(X)
    R = _T(xp.linalg.svd(X, full_matrices=False)[2])             # n x n orthogonal
    X = X @ R
    K = (X * X).sum(axis=-2, keepdims=True)
    return (X, Y @ R, K, None) if squared else (X, Y, K, xp.ascontiguousarray(R))


def _range_basis(A, rtol):
    """Orthonormal basis of the column space of A (rank: singular values above rtol * max)."""
    U, s, _ = array_module(A).linalg.svd(A, full_matrices=False)
    return U[:, :max(int((s > rtol * s[:1]).sum()), 1)]     # (s[:1]: none for no columns)


def _orth_complement(Q, k):
    """An orthonormal basis of span(Q)^perp in R^k (Q with orthonormal columns)."""
    return np.linalg.qr(Q, mode="complete")[0][:, Q.shape[1]:] if Q.shape[1] else np.eye(k)


def _split_first_layers(W10, Q, Xt):
    """Layers 1 and 2 for the measures without decomposing W_1 = W_1(0) + Q C X^T.

    Then W_1 W_1^T - W_1(0) W_1(0)^T has its range in span(Q).  If span(Q) is also an
    invariant subspace of W_1(0) W_1(0)^T (as for the aligned starts of Figure 1b,
    whose W_1(0) = D_1 U_X^T), the left singular vectors split: the static ones, in
    span(Q)^perp, never change, and the others are those of the m x k0 matrix
    Q^T W_1.  The measures need no static vector: each matches itself exactly
    between two times, and is orthogonal to V_2, which lies in span(Q) (so is every
    row of W_2 = W~_2 Q^T).  Returns ``split(params) -> ([svd_1, svd_2], static)``:
    svd_1 = (U_1 in Q's coordinates with zero columns for static directions, all
    singular values, None: V_1 is never measured), svd_2 = (U_2, s_2, V_2 in Q's
    coordinates), ``static`` the mask of static directions; ``split`` gives None
    where W_1 is rank deficient.  Returns None when the condition fails (relative
    tolerance 1000 eps of the dtype: a float32 start is invariant only to its
    rounding).
    """
    W0, Qh, Xh = (to_numpy(a).astype(np.float64) for a in (W10, Q, Xt))
    G0Q = W0 @ (W0.T @ Qh)
    tol = 1e3 * np.finfo(W10.dtype).eps * np.linalg.norm(W0, 2) ** 2
    if np.linalg.norm(G0Q - Qh @ (Qh.T @ G0Q), 2) > tol:
        return None
    P = _orth_complement(Qh, W0.shape[0])
    static_values = _svd_by_gram(P.T @ W0)[1]
    QtW0, r = Qh.T @ W0, min(W0.shape)
    xp = np if Qh.shape[1] <= HOST_EIGH_MAX else array_module(W10)  # where eigh is faster
    G0, B, K = (xp.asarray(a) for a in (QtW0 @ QtW0.T, Xh @ QtW0.T, Xh @ Xh.T))

    def split(ps):
        C = (to_numpy(ps[0]) if xp is np else ps[0]).astype(np.float64)   # A = Q^T W_1 = QtW0 + C Xh
        CB = C @ B
        w, Ud = (to_numpy(a) for a in xp.linalg.eigh(G0 + CB + CB.T + (C @ K) @ C.T))   # A A^T
        sd, Ud = np.sqrt(np.maximum(w[::-1], 0)), Ud[:, ::-1]
        s = np.concatenate([sd, static_values])
        order = np.argsort(-s, kind="stable")[:r]
        if s[order[-1]] <= 1e-7 * s[order[0]]:
            return None                                              # rank deficient
        dynamic = order < sd.size
        U1 = np.zeros((Qh.shape[1], r))
        U1[:, dynamic] = Ud[:, order[dynamic]]
        U2, s2, V2 = _reduced_svd(ps[1])
        return [(U1, s[order], None), (U2, s2, V2)], ~dynamic
    return split


def _split_measure(W10, Q, Xt, start):
    """``m(fn, params)``: the tracker ``fn``'s measures with layer 1 split (see
    _split_first_layers), or None where that is not exact; None when the split does
    not apply.  ``start``: the parameters at step 0 (measured once, as "then")."""
    layers = _split_first_layers(W10, Q, Xt)
    at_start = layers and layers(start)
    if not at_start:
        return None
    deeper = lambda ps: reduced_svds(ps[2:])
    then, static0 = at_start[0] + deeper(start), at_start[1]
    widths = list(W10.shape[::-1]) + [W.shape[-2] for W in start[1:]]

    def measure(fn, ps):
        now = layers(ps)
        return now and fn.from_svds(now[0] + deeper(ps), then=then, widths=widths,
                                    static=(now[1], static0))
    return measure


# ---------------------------------------------------------- decompositions --
HOST_SVD_MAX = 256      # layers whose smaller side is at most this are decomposed on the host
HOST_EIGH_MAX = 128     # larger Gram matrices of layer 1's split go to the GPU's eigh
THREADED_BATCH_MIN = 64  # matrices per thread at least (fewer: the threads cost more than they save)
THREADED_SIDE_MAX = 64   # matrices at most this size are split across threads
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_POOL = []               # the LAPACK threads (made on first use)


def _linalg(fn, A):
    """fn(A), a NumPy or CuPy decomposition (svd, eigh) of a matrix or a batch.  A large
    batch of small matrices on the host is split across the cores: NumPy loops over
    them in LAPACK without holding the GIL, so each matrix gets the same result, in
    1/cores the time (larger matrices use the cores inside LAPACK already)."""
    small = A.ndim == 3 and array_module(A) is np and max(A.shape[1:]) <= THREADED_SIDE_MAX
    threads = min(_CORES, A.shape[0] // THREADED_BATCH_MIN) if small else 1
    if threads < 2:
        return fn(A)
    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(_CORES, thread_name_prefix="align-lapack"))
    outs = _POOL[0].map(fn, np.array_split(A, threads))
    return tuple(np.concatenate(pieces) for pieces in zip(*outs))


def _reduced_svd(W, keep=False):
    """Reduced SVD (U, s, V) as float64 host arrays, s descending.

    float32 layers: from the eigenvectors of the float64 Gram matrix of the smaller
    side, several times faster than an SVD and more accurate than a float32 SVD
    (vector errors ~ 1e-16 ||W||^2 / (sigma gap) instead of ~ 6e-8 ||W|| / gap).
    With ``keep``, a batch on the GPU stays there: matrices up to SMALL_SVD_KERNEL_MAX
    on a side go to align_cuda.small_svd, larger ones to CuPy's batched svd.
    """
    if keep and W.ndim == 3 and array_module(W) is not np:
        import align_cuda
        if max(W.shape[-2:]) <= SMALL_SVD_KERNEL_MAX:
            return align_cuda.small_svd(array_module(W), W)
        U, s, Vt = array_module(W).linalg.svd(W.astype(np.float64), full_matrices=False)
        return U, s, _T(Vt)
    if min(W.shape[-2:]) <= HOST_SVD_MAX:   # small: LAPACK on the host beats GPU solvers
        W = to_numpy(W)
    xp = array_module(W)
    if W.dtype == xp.float32 and min(W.shape[-2:]) > 1:
        return _svd_by_gram(W.astype(xp.float64))
    U, s, Vt = _linalg(lambda A: xp.linalg.svd(A, full_matrices=False), W)
    return to_numpy(U).astype(np.float64), to_numpy(s).astype(np.float64), \
        to_numpy(_T(Vt)).astype(np.float64)


SMALL_SVD_KERNEL_MAX = 16     # GPU batches of matrices up to this side: align_cuda.small_svd


def reduced_svds(weights, keep=False):
    """align.reduced_svds (the same decompositions to rounding), faster, and for a batch
    (leading axis kept): in one call when small layers (or a GPU batch's) share a shape;
    ``keep``: a GPU batch's stay on the GPU."""
    if not weights:
        return []
    xp, same = array_module(*weights), len({(W.shape, W.dtype) for W in weights}) == 1
    batched = weights[0].ndim == 3
    if same and (len(weights) > 1 or batched) and \
            (min(weights[0].shape[-2:]) <= HOST_SVD_MAX or keep and batched and xp is not np):
        stacked = xp.stack(weights)                       # (layers, [networks,] rows, columns)
        svd = _reduced_svd(stacked.reshape((-1,) + stacked.shape[-2:]), keep)
        return list(zip(*(a.reshape(stacked.shape[:-2] + a.shape[1:]) for a in svd)))
    return [_reduced_svd(W, keep) for W in weights]


def _svd_by_gram(A):
    """Reduced SVD of A (float64) via eigh of the Gram matrix of its smaller side."""
    xp = array_module(A)
    wide = A.shape[-2] < A.shape[-1]
    B = _T(A) if wide else A                     # m x n with n <= m
    w, V = _linalg(xp.linalg.eigh, _T(B) @ B)
    w, V = xp.flip(w, axis=-1), xp.ascontiguousarray(xp.flip(V, axis=-1))   # (BLAS: no copy per use)
    s = xp.sqrt(xp.maximum(w, 0))
    U, s, V = to_numpy(B @ V), to_numpy(s), to_numpy(V)
    tiny = s <= 1e-7 * s[..., :1]                # below float32 resolution (and the Gram's)
    U = U / np.where(tiny, 1.0, s)[..., None, :]
    if tiny.any():                               # directions of zero singular values
        U = np.stack([_complete(u, t) for u, t in zip(U.reshape((-1,) + U.shape[-2:]),
                                                      tiny.reshape(-1, tiny.shape[-1]))]).reshape(U.shape)
    return (V, s, U) if wide else (U, s, V)


def _complete(U, missing):
    """U with its ``missing`` columns replaced by an orthonormal completion: the
    coordinate vectors farthest from span(the other columns), projected off it (twice:
    orthogonal to rounding) and orthonormalised, in O(m n t) for t missing columns;
    a complete QR (O(m^3)) where those projections are not clearly independent."""
    U, kept, t = U.copy(), U[:, ~missing], int(missing.sum())
    rows = np.argsort((kept * kept).sum(axis=1), kind="stable")[:t]      # farthest from span
    Z = np.zeros((U.shape[0], t))
    Z[rows, np.arange(t)] = 1.0
    for _ in range(2):
        Z -= kept @ (kept.T @ Z)
    Q, R = np.linalg.qr(Z)
    independent = t and np.abs(np.diagonal(R)).min() > COMPLETION_MIN
    U[:, missing] = Q if independent else _orth_complement(kept, U.shape[0])[:, :t]
    return U


COMPLETION_MIN = 1e-3   # projections smaller than this: the complete QR instead


# ------------------------------------------------------------ the greedy matching --
def greedy_match(C, capacity):
    """align.greedy_match (the paired rule's matching, the same values) for one matrix or a
    batch (B x p x m; capacity (m,) or (B, m)).

    Small inputs go entry by entry (GREEDY_ONE_BY_ONE_MAX entries at most), batches of
    matrices with few rows by taking every matrix's largest open entry p times; larger
    ones in vectorised rounds: a free row takes its best open entry when fewer than
    the column's room entries of free rows come before that entry in the order (the
    one-by-one greedy then takes it too, whatever it does before), so each round
    takes at least the first open entry of all.  On a GPU one CUDA thread per matrix
    takes the best open entry as long as one is left (align_cuda.greedy_match).
    """
    xp = array_module(C)
    single = C.ndim == 2
    C = C[None] if single else C
    nb, p, m = C.shape
    room = xp.broadcast_to(xp.asarray(capacity, dtype=np.int64), (nb, m)).copy()
    if xp is not np:
        import align_cuda
        value = (align_cuda.greedy_match(xp, C, room) if p * p * m <= GREEDY_KERNEL_MAX else
                 _greedy_rounds(C, room))
    else:
        if C.size > GREEDY_ONE_BY_ONE_MAX:
            C, room = _without_zero_columns(C, room)
        value = (_greedy_one_by_one if C.size <= GREEDY_ONE_BY_ONE_MAX else
                 _greedy_by_maxima if p <= GREEDY_BY_MAXIMA_ROWS else _greedy_rounds)(C, room)
    return value[0] if single else value


GREEDY_ONE_BY_ONE_MAX = 1024
GREEDY_BY_MAXIMA_ROWS = 16      # batches of matrices with at most this many rows: p passes
GREEDY_KERNEL_MAX = 1 << 22     # p * p * m: one CUDA thread's work for a p x m matrix


def _without_zero_columns(C, room):
    """C and room without the columns that are zero in every matrix (unless C holds a NaN):
    their entries come after every positive one, so taking them changes no row's value."""
    top = C.max(axis=(0, 1))
    keep = top != 0
    if keep.all() or np.isnan(top).any():
        return C, room
    return C[:, :, keep], room[:, keep]


def _greedy_by_maxima(C, room):
    """greedy_match for a batch of matrices with few rows (NumPy, no NaN): p times, every
    matrix takes its largest open entry, the first in row-major order among equal ones,
    which is the entry the one-by-one greedy takes next.  One pass costs a few array
    operations, where a round of _greedy_rounds costs ~30."""
    nb, p, m = C.shape
    open_ = np.ascontiguousarray(np.where(room[:, None, :] > 0, C, -1.0))  # -1: closed entry
    flat = open_.reshape(nb, p * m)                              # (a view of open_)
    nets, value = np.arange(nb), np.zeros((nb, p))
    for _ in range(p):
        best = flat.argmax(axis=1)
        top = flat[nets, best]
        took = top >= 0
        if not took.any():
            break
        b, best, top = nets[took], best[took], top[took]
        r, c = best // m, best % m
        value[b, r] = top
        open_[b, r, :] = -1.0
        room[b, c] -= 1
        full = room[b, c] == 0
        open_[b[full], :, c[full]] = -1.0
    return value


def _greedy_one_by_one(C, room, free=None):
    """greedy_match entry by entry, as align.greedy_match states the rule (rows ``free``)."""
    nb, p, m = C.shape
    flat = C.reshape(nb, -1)
    order = np.argsort(-flat, axis=1, kind="stable")           # decreasing, ties row-major
    value = np.zeros((nb, p))
    free = np.ones((nb, p), dtype=bool) if free is None else free
    for b, (entries, values, cap, free) in enumerate(zip(order.tolist(), flat.tolist(), room.tolist(),
                                                         free.tolist())):
        left = min(sum(free), sum(cap))
        for e in entries:
            if not left:
                break
            r, c = divmod(e, m)
            if free[r] and cap[c]:
                free[r], cap[c], left = False, cap[c] - 1, left - 1
                value[b, r] = values[e]
    return value


def _greedy_rounds(C, room):
    """greedy_match in vectorised rounds (see there), each on the networks, rows and
    columns left."""
    xp, (nb, p, m) = array_module(C), C.shape
    value, free = xp.zeros((nb, p)), xp.ones((nb, p), dtype=bool)
    while True:                                  # each round on what is left
        nets = xp.flatnonzero(free.any(axis=1) & (room > 0).any(axis=1))
        rows, cols = (xp.flatnonzero(a[nets].any(axis=0)) for a in (free, room > 0))
        if not (nets.size and rows.size and cols.size):
            break
        at = (nets[:, None], rows[None, :])
        if nets.size == nb and rows.size == p and cols.size == m:
            Cs, fs, rs = C, free, room                                      # (no copies)
        else:
            Cs, fs, rs = C[nets[:, None, None], rows[None, :, None], cols], free[at], room[nets[:, None], cols]
        if Cs.size <= GREEDY_ONE_BY_ONE_MAX and xp is np:                   # small: finish
            value[at] += _greedy_one_by_one(Cs, rs, fs)
            break
        if nets.size == 1:              # one network: every row and column left is open
            live, free_C = xp.ones(fs.shape, dtype=bool), Cs
            best = Cs.argmax(axis=2)
        else:
            open_ = fs[:, :, None] & (rs[:, None, :] > 0)
            live, free_C = open_.any(axis=2), xp.where(fs[:, :, None], Cs, -1.0)
            best = xp.where(open_, Cs, -1.0).argmax(axis=2)        # first best open column
        best_val = xp.take_along_axis(Cs, best[:, :, None], axis=2)[:, :, 0]
        column = xp.take_along_axis(free_C, best[:, None, :], axis=2)
        v = best_val[:, None, :]                                   # column[b, r', r] = C[r', best[r]]
        before = rows[:, None] < rows[None, :]                     # r' ahead of r on ties
        ahead = ((column > v) | ((column == v) & before)).sum(axis=1)
        b, r = xp.nonzero(live & (ahead < xp.take_along_axis(rs, best, axis=1)))
        net, c = nets[b], cols[best[b, r]]
        value[net, rows[r]], free[net, rows[r]] = best_val[b, r], False
        room -= xp.bincount(net * m + c, minlength=nb * m).reshape(nb, m)
    return value


# ------------------------------------------------------------------- the measures --
@dataclasses.dataclass
class SplitPair(align.Pair):
    """A pair with directions common to both sides left out of A and B: ``exact`` of them,
    ``exact_used`` with sigma above rtol (``k`` is the dimension left); ``scale_a``,
    ``scale_b``: the largest singular values of the whole sides (rtol's reference)."""
    exact: int = 0
    exact_used: int = 0
    scale_a: float = None
    scale_b: float = None

    @property
    def top_a(self):
        return self.scale_a

    @property
    def top_b(self):
        return self.scale_b


def _paired_score(pairs, rtol):
    """align.paired_score with this module's matching; SplitPair's common directions
    count as exact matches."""
    total, count = 0.0, 0
    for pair in pairs:
        costs = align.paired_costs(pair, rtol)
        matched, scored = (greedy_match(*costs).sum(), costs[0].shape[0]) if costs else (0.0, 0)
        exact = pair.exact_used if isinstance(pair, SplitPair) else 0
        total, count = total + (float(matched) + exact), count + scored + exact
    return total / count if count else 1.0


def _matched_sums(pairs):
    """The matched rule's parts: ([the sum of the best |cosines| of each group of pairs of one
    shape, one reduction each], the number of B's directions); a network's sum is the same
    in any batch (its values summed in one row)."""
    count, groups = 0, {}
    for pair in pairs:
        M = pair.product                     # A^T B: B's directions are its columns
        if M.size:
            groups.setdefault(M.shape, []).append(M)
            count += M.shape[-1]
    sums = []
    for Ms in groups.values():
        xp = array_module(*Ms)
        best = abs(xp.stack(Ms)).max(axis=-2)                 # (pairs, [batch,] columns)
        rows = xp.ascontiguousarray(xp.moveaxis(best, 0, -2))
        sums.append(rows.reshape(rows.shape[:-2] + (-1,)).sum(axis=-1))
    return sums, count


def _matched_score(pairs):
    """align.matched_score, per network of a batch; SplitPair's common directions count as
    exact matches."""
    sums, count = _matched_sums(pairs)
    exact = sum(pair.exact for pair in pairs if isinstance(pair, SplitPair))
    total, count = 0.0 + exact, count + exact
    for s in sums:
        total = total + s
    return total / count if count else 1.0


def _score(pairs, how, rtol):
    if how not in align.HOW:
        raise ValueError(f"how must be one of {align.HOW}, got {how!r}")
    align.check_number("rtol", rtol, below=1)
    return _paired_score(pairs, rtol) if how == "paired" else float(_matched_score(pairs))


def _layers(weights):
    """One network's layers (align.as_weights) or a batch's (as_batch)."""
    return as_batch(weights) if _is_batch(weights) else align.as_weights(weights)


def _widths(weights):
    """[k_0, ..., k_d] of a network or a batch."""
    return [weights[0].shape[-1]] + [W.shape[-2] for W in weights]


def _one(svds, b):
    """Network b's decompositions from a batch's."""
    return [tuple(a[b] for a in svd) for svd in svds]


def alignment(weights, how="paired", rtol=1e-6):
    """align.alignment (Section 6), the same value; for a batch one value per network."""
    weights = _layers(weights)
    svds, widths = reduced_svds(weights), _widths(weights)
    if svds[0][1].ndim == 1:
        return _score(align.alignment_pairs(svds, widths), how, rtol)
    return np.array([_score(align.alignment_pairs(_one(svds, b), widths), how, rtol)
                     for b in range(svds[0][1].shape[0])])


def invariance(weights_t, weights_0, how="paired", rtol=1e-6):
    """align.invariance (Section 6), the same value; for a batch one value per network."""
    weights_t, weights_0 = _layers(weights_t), _layers(weights_0)
    if [W.shape for W in weights_t] != [W.shape for W in weights_0]:
        raise ValueError(f"weights_t and weights_0 must have the same shapes, got "
                         f"{[W.shape for W in weights_t]} and {[W.shape for W in weights_0]}")
    now, then, widths = reduced_svds(weights_t), reduced_svds(weights_0), _widths(weights_t)
    if now[0][1].ndim == 1:
        return _score(align.invariance_pairs(now, then, widths), how, rtol)
    return np.array([_score(align.invariance_pairs(_one(now, b), _one(then, b), widths), how, rtol)
                     for b in range(now[0][1].shape[0])])


def tracker(weights_0, rtol=1e-6):
    """align.tracker (the same values), for one network or a batch (one value per network):
    a callable ``m(weights)`` -> {MEASURE_KEYS: value, or one per network},
    to pass to train as ``measures``."""
    weights_0 = _layers(weights_0)
    align.check_number("rtol", rtol, below=1)
    return Tracker(weights_0, rtol)


# Batches of at least this many networks are measured where they are (on a GPU: there).
GPU_BATCH_MIN = 64


class Tracker:
    """The measures of align.tracker: ``m(weights, _)`` -> {MEASURE_KEYS: values}, by the
    vectorised rule where every singular value is distinct.  ``from_svds`` measures from
    reduced SVDs instead (layer 1 split by _split_first_layers during row-space training);
    ``starts_at(ws)``: whether ws are this tracker's start."""

    def __init__(self, weights_0, rtol):
        self.weights_0, self.rtol = weights_0, rtol
        self.keep = weights_0[0].ndim == 3 and weights_0[0].shape[0] >= GPU_BATCH_MIN  # GPU: stays
        self.start = reduced_svds(weights_0, self.keep)
        self.start_generic = _generic(self.start, rtol)
        self.last = None                  # (a NumPy batch's weights and values at the last call)

    def __repr__(self):
        return f"Tracker(rtol={self.rtol:g}, layers {[W.shape for W in self.weights_0]})"

    def __call__(self, weights, _=None):
        weights = [align.as_array(f"W_{i}", W) for i, W in enumerate(weights, 1)]
        align.check_like("this tracker", weights, [W.shape for W in self.weights_0])
        if weights[0].ndim == 3 and array_module(*weights) is np:
            return self._batch(weights)
        xp = array_module(*weights)                  # (a batch's diverged networks: _Run masks)
        if weights[0].ndim == 2 and not bool(xp.stack([xp.isfinite(W).all() for W in weights]).all()):
            return dict.fromkeys(align.MEASURE_KEYS, math.nan)            # (one wait for a GPU)
        return self.from_svds(reduced_svds(weights, self.keep))

    def _batch(self, weights):
        """A NumPy batch's measures, the networks unchanged since the last call (those
        stopped by train) not measured again: their values are kept."""
        last = self.last
        if last is None:
            moved = np.ones(weights[0].shape[0], dtype=bool)
        else:
            same = [(W == V).all(axis=(1, 2)) for W, V in zip(weights, last[0])]
            moved = ~np.logical_and.reduce(same)
        if moved.all():
            values = self.from_svds(reduced_svds(weights, self.keep))
        else:
            values = {key: v.copy() for key, v in last[1].items()}
            if moved.any():
                idx = np.flatnonzero(moved)
                then = [tuple(a[idx] for a in svd) for svd in self.start]
                part = self.from_svds(reduced_svds([W[idx] for W in weights]), then)
                for key, v in part.items():
                    values[key][idx] = v
        self.last = ([W.copy() for W in weights],       # (after: Ctrl-C leaves the last call's)
                     {key: np.array(v, dtype=float) for key, v in values.items()})
        return values

    def from_svds(self, now, then=None, widths=None, static=None):
        """The measures from reduced SVDs now (and ``then``, default the start's); with
        ``static`` (masks of layer 1's static directions now and then) None where that
        split cannot be measured exactly."""
        rtol = self.rtol
        generic = _generic(now, rtol) & (self.start_generic if then is None else _generic(then, rtol))
        then = self.start if then is None else then
        widths = widths or _widths(self.weights_0)
        if now[0][1].ndim == 1:
            return _measures(now, then, widths, rtol, static, bool(generic))
        values = _measures(now, then, widths, rtol, generic=True)        # every network
        xp = array_module(generic)                   # (one layer: no pairs, each score 1.0)
        is_generic, *rows = _to_host([generic] + [
            values[key] if np.ndim(values[key]) else xp.full(generic.shape, values[key])
            for key in align.MEASURE_KEYS])
        out, others = dict(zip(align.MEASURE_KEYS, rows)), np.flatnonzero(is_generic == 0)
        if others.size:                          # repeated or zero singular values: one by one
            flat = _to_host([a for svd in now + then for a in svd], others)
            svds = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
            for j, b in enumerate(others):
                one = _one(svds, j)
                for key, value in _measures(one[:len(now)], one[len(now):], widths, rtol).items():
                    out[key][b] = value
        return out

    def starts_at(self, weights):
        return len(weights) == len(self.weights_0) and all(
            a is b or (a.shape == b.shape and bool((a == b).all()))
            for a, b in zip(weights, self.weights_0))


def _measures(now, then, widths, rtol, static=None, generic=None):
    """The four measures from reduced SVDs now and at the start (None: see
    _split_invariance_pairs); the vectorised rule when all singular values are distinct."""
    invariant = align.invariance_pairs(now, then, widths)
    if static and len(now) > 1:
        invariant = _split_invariance_pairs(invariant, now[0], then[0], widths[1], rtol, static)
    if invariant is None:
        return None
    aligned = align.alignment_pairs(now, widths)
    if now[0][1].ndim > 1:                       # a batch: A^T B of each network (align's Pair
        for pair in aligned + invariant:         # computes it for one)
            pair.product = _T(pair.A) @ pair.B
    if generic is None:
        generic = bool(_generic(now, rtol) and _generic(then, rtol))
    paired = _paired_generic(aligned, invariant) if generic else \
        (_paired_score(aligned, rtol), _paired_score(invariant, rtol))
    values = {"alignment_paired": paired[0], "alignment_matched": _matched_score(aligned),
              "invariance_paired": paired[1], "invariance_matched": _matched_score(invariant)}
    return values if generic is True and now[0][1].ndim > 1 else \
        {key: float(v) for key, v in values.items()}


def _split_invariance_pairs(pairs, now, then, k, rtol, static):
    """The invariance pairs with layer 1's (U_1(t), U_1(0)), the first, replaced by its
    moving directions: layer 1 from _split_first_layers has U in the coordinates of Q,
    zero for the static directions (masks ``static``, now and then), which are the same
    vectors at both times and so left out as exact matches.  None when that is not
    exact (a static direction used at one time only)."""
    (U, s, _), (U0, s0, _), (mask, mask0) = now, then, static
    used, used0 = (int(align.used_directions(v[m], rtol, v[0]).sum())
                   for v, m in ((s, mask), (s0, mask0)))
    if used != used0:
        return None
    return pairs[1:] + [SplitPair(U[:, ~mask], s[~mask], U0[:, ~mask0], s0[~mask0], k - used,
                                  exact=int(mask.sum()), exact_used=used, scale_a=s[0],
                                  scale_b=s0[0])]


def _paired_generic(*pair_lists):
    """[The paired score of each list of pairs], for networks (a batch, or one) whose
    singular values are all nonzero and distinct, so every cluster is one direction and
    every direction is used: the vectorised form of _paired_score, with one greedy
    matching per shape for all the lists."""
    totals, counts, groups = [0.0] * len(pair_lists), [0] * len(pair_lists), {}
    for j, pairs in enumerate(pair_lists):
        for pair in pairs:
            M = pair.product
            if M.shape[-2] > M.shape[-1]:
                M = _T(M)
            p, q = M.shape[-2:]
            exact_used = getattr(pair, "exact_used", 0)      # (a SplitPair's; every direction used)
            groups.setdefault((p, q, max(0, min(pair.k, pair.positions or pair.k) - q)), []).append((j, M))
            totals[j], counts[j] = totals[j] + exact_used, counts[j] + p + exact_used
    for (p, q, room), members in groups.items():
        xp = array_module(members[0][1])                          # (a batch on the GPU stays)
        sq = xp.stack([M for _, M in members]) ** 2               # (pairs, [batch,] p, q)
        if room:                                                  # the complement of B's span
            outside = xp.clip(1.0 - sq.sum(axis=-1, keepdims=True), 0.0, 1.0)
            sq = xp.concatenate([sq, outside], axis=-1)
        C = xp.sqrt(xp.clip(sq, 0.0, 1.0))
        value = greedy_match(C.reshape((-1,) + C.shape[-2:]), [1] * q + ([room] if room else []))
        value = value.reshape(C.shape[:-1]).sum(axis=-1)           # (pairs, [batch])
        for (j, _), v in zip(members, value):
            totals[j] = totals[j] + v
    return [t / c if c else 1.0 for t, c in zip(totals, counts)]


def _to_host(arrays, rows=None):
    """float64 host copies of the arrays (of their ``rows`` when given), in one transfer
    from a GPU (each transfer waits for the GPU)."""
    xp = array_module(*arrays)
    rows = None if rows is None else xp.asarray(rows)
    parts = [(a if rows is None else a[rows]).astype(np.float64, copy=False) for a in arrays]
    if xp is np:
        return parts
    flat = to_numpy(xp.concatenate([p.ravel() for p in parts]))
    ends = np.cumsum([0] + [p.size for p in parts])
    return [flat[a:b].reshape(p.shape) for a, b, p in zip(ends, ends[1:], parts)]


def _generic(svds, rtol):
    """For each network of a batch: all singular values nonzero and distinct (up to rtol)."""
    values = [s for _, s, _ in svds]
    xp = array_module(*values)
    stacked = len({s.shape for s in values}) == 1      # layers of one shape: one pass
    ok = True
    for s in [xp.stack(values)] if stacked else values:
        top = s[..., :1]                               # (a layer with no values: generic)
        good = (s[..., -1:] > rtol * top).all(axis=-1) & (abs(xp.diff(s, axis=-1)) > rtol * top).all(axis=-1)
        ok = ok & (good.all(axis=0) if stacked else good)
    return ok


# ----------------------------------------------------------------- Corollary 1 --
def singular_value_dynamics(sigmas0, lam, lam_prime, lr, n, steps, kind="mse", kd=None,
                            record_every=1):
    """align.singular_value_dynamics (Corollary 1), on CuPy from one CUDA kernel
    (align_cuda.sv_dynamics: depth up to align_cuda.SV_KERNEL_MAX_DEPTH, lam and lam_prime
    shared by the runs); otherwise align's."""
    xp = array_module(sigmas0)
    if xp is not np:
        import align_cuda
        sig = align.as_array("sigmas0", sigmas0).astype(np.float64)
        lam, lam_prime = xp.asarray(lam, dtype=sig.dtype), xp.asarray(lam_prime, dtype=sig.dtype)
        if sig.shape[-2] <= align_cuda.SV_KERNEL_MAX_DEPTH and \
                all(a.ndim < 2 or a.shape[-2] == 1 for a in (lam, lam_prime)):
            align.check_number("steps", steps, integer=True)
            align.singular_value_dynamics(sig, lam, lam_prime, lr, n, 0, kind, kd, record_every)
            coef = lr / n if kind == "mse" else 2.0 * lr / (kd * n)
            return align_cuda.sv_dynamics(xp, sig, lam, lam_prime, coef, steps, record_every)
    return align.singular_value_dynamics(sigmas0, lam, lam_prime, lr, n, steps, kind, kd,
                                         record_every)
