"""Deep linear networks and alignment (Radhakrishnan, Nichani, Bernstein, Uhler).

The paper's notation: ``X`` is k0 x n (one example per column), ``Y`` is kd x n, ``weights``
is [W_1, ..., W_d] with W_i of shape (k_i, k_{i-1}), f(X) = W_d ... W_1 X (Eq. (1)), ``lr``
is gamma.  The reference, in the paper's order and complete when copied alone (NumPy only).
Functions take NumPy or CuPy arrays; weights may carry a leading batch axis (B, k_i, k_{i-1})
for networks trained together.  This file runs exactly the code in it and imports no other
module of the project; faster code with the same results is a separate module that a
caller chooses explicitly (README, "How the code is laid out")."""
import collections
import dataclasses
import functools
import json
import math
import operator
import time

import numpy as np

__all__ = [
    # the network, its loss and gradients (Eq. (1), (2), (8)) and gradient descent
    "forward", "loss", "gradients", "layer_gradients", "loss_and_gradients",
    "loss_and_output_gradient", "activations", "backward", "train", "gradient_descent",
    "frozen_below", "network_rates", "History", "Run", "DivergenceError",
    # usSVD (Definition 1), the measures of Section 6 and the exact test of Definition 2
    "ussvd", "ussvd_matrix", "ussvd_reorder", "alignment", "invariance", "tracker",
    "is_aligned", "AlignmentTest", "Pair", "alignment_pairs", "invariance_pairs",
    "paired_score", "pair_matches", "used_directions", "matched_score", "matched_sums",
    "reduced_svds", "greedy_match", "layer_widths",
    # the theory of Sections 3-4
    "rect_diag", "aligned_network", "aligned_init", "invariance_certificate", "Certificate",
    "sensing_certificate", "singular_value_dynamics", "prop2_learning_rate",
    "balanced_factorization", "proposition4",
    # arrays and checks
    "array_module", "to_numpy", "check_array", "check_finite", "check_network",
    "check_tolerance", "check_schedule", "prepare_targets", "as_measures", "worst_loss",
    "LOSSES", "MEASURE_KEYS", "HOW"]

LOSSES = ("mse", "mse_mean", "ce", "logistic", "exp")
MEASURE_KEYS = ("alignment_paired", "alignment_matched", "invariance_paired", "invariance_matched")
HOW = ("paired", "matched")


class DivergenceError(FloatingPointError):
    """Gradient descent produced a non-finite loss; ``history`` holds the run so far."""
    def __init__(self, message, history):
        super().__init__(message)
        self.history = history


# ----------------------------------------------------------------- backends --
def _library(a):
    """The top-level module ``a`` comes from: "numpy", "cupy", ..."""
    return type(a).__module__.split(".")[0]


def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays live in (CuPy is never imported otherwise)."""
    if any(_library(a) == "cupy" for a in arrays):
        import cupy
        return cupy
    return np


def to_numpy(a):
    """A host NumPy copy of a NumPy or CuPy array."""
    return a.get() if _library(a) == "cupy" else np.asarray(a)


def _T(A):
    return A.swapaxes(-1, -2)


# --------------------------------------------------------------- validation --
def _shape(a):
    return "x".join(str(s) for s in a.shape)


def check_finite(name, a):
    """Raise ValueError if ``a`` holds NaN or inf, with the likely fix for ``name``."""
    if not bool(array_module(a).isfinite(a).all()):
        fix = ("weights from a diverged run? lower the learning rate"
               if name.startswith(("W", "params")) else "clean the data")
        raise ValueError(f"{name} contains NaN or inf ({fix})")


def check_array(name, a):
    """Raise ValueError unless ``a`` is a NumPy or CuPy array of float32 or float64."""
    if _library(a) not in ("numpy", "cupy") or not hasattr(a, "dtype"):
        raise ValueError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must hold float32 or float64 numbers, got {a.dtype} "
                         f"(convert with .astype(float))")


def check_tolerance(name, value, below=math.inf):
    """Raise ValueError unless ``value`` is a number with 0 <= value < below."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 <= value < below:
        bound = f" and < {below:g}" if below < math.inf else ""
        raise ValueError(f"{name} must be a number >= 0{bound}, got {value!r}")


def check_network(weights, X=None):
    """Raise ValueError unless ``weights`` (and ``X``) are finite arrays of matching shapes.

    Parameters
    ----------
    weights, X
        As in :func:`forward` (X optional).

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument).
    """
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty list [W_1, ..., W_d] of arrays, got "
                         f"{type(weights).__name__}")
    for i, W in enumerate(weights, 1):
        check_array(f"weights[{i - 1}] (W_{i})", W)
        if W.ndim not in (2, 3):
            raise ValueError(f"weights[{i - 1}] (W_{i}) must be k_{i} x k_{i - 1} "
                             f"(or batched), got shape {_shape(W)}")
        check_finite(f"W_{i}", W)
        if i > 1 and W.shape[-1] != weights[i - 2].shape[-2]:
            raise ValueError(f"W_{i} is {_shape(W)} but W_{i - 1} is {_shape(weights[i - 2])}: "
                             f"W_{i} needs {weights[i - 2].shape[-2]} columns")
    if X is not None:
        check_array("X", X)
        k0, batch = weights[0].shape[-1], weights[0].shape[:-2]
        if X.ndim not in (2, 3) or X.shape[-2] != k0 or X.shape[:-2] not in ((), batch):
            raise ValueError(f"X must be k0 x n = {k0} x n (one example per column; B x k0 x n "
                             f"for a batch of B networks), got shape {_shape(X)}")
        check_finite("X", X)
        if X.shape[-1] == 0:
            raise ValueError("X has no examples (n = 0 columns)")


def prepare_targets(Y, kind, kd, n):
    """Targets as a kd x n float array for loss ``kind``, validated (labels, shapes).

    Parameters
    ----------
    Y : array
        kd x n targets (for "ce" one-hot columns or integer labels of shape (n,); for
        "logistic" and "exp" +-1).
    kind : {"mse", "mse_mean", "ce", "logistic", "exp"}
        The loss: Eq. (2)'s 1/(2n) sum, the mean over kd n entries, cross-entropy, logistic,
        exponential.
    kd, n : int
        Outputs and examples.

    Returns
    -------
    array
        kd x n targets.

    Raises
    ------
    ValueError
        Targets that do not fit the loss or the shapes.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSSES}")
    if _library(Y) not in ("numpy", "cupy"):
        raise ValueError(f"Y must be a NumPy or CuPy array, got {type(Y).__name__}")
    xp = array_module(Y)
    if kind == "ce" and Y.ndim == 1:
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} labels but X has n = {n} columns")
        if Y.dtype.kind not in "iu" or int(Y.min()) < 0 or int(Y.max()) >= kd:
            raise ValueError(f"integer class labels must lie in 0..{kd - 1} (kd = {kd}), "
                             f"got range {Y.min()}..{Y.max()} of dtype {Y.dtype}")
        return (xp.arange(kd)[:, None] == Y[None, :]).astype(xp.float64)
    check_array("Y", Y)
    if Y.ndim not in (2, 3) or Y.shape[-2:] != (kd, n):
        raise ValueError(f"Y must be kd x n = {kd} x {n}, got shape {_shape(Y)}")
    check_finite("Y", Y)
    if kind == "ce" and (bool((Y < 0).any()) or not bool(xp.allclose(Y.sum(-2), 1.0))):
        raise ValueError("cross-entropy targets must be one-hot (or probability) columns "
                         "summing to 1, or integer labels of shape (n,)")
    if kind in ("logistic", "exp") and kd != 1:
        raise ValueError(f"the {kind} loss needs kd = 1 output, got kd = {kd}")
    if kind in ("logistic", "exp") and not bool((xp.abs(Y) == 1).all()):
        raise ValueError(f"{kind} loss labels must be -1 or +1")
    return Y


# ------------------------------------------- Eq. (1), (2), (8): network, loss, gradients --
def forward(weights, X):
    """f(X) = W_d ... W_1 X, Eq. (1).  X: k0 x n; returns kd x n.

    Parameters
    ----------
    weights : list of arrays
        [W_1, ..., W_d], W_i of shape (k_i, k_{i-1}) (or (B, k_i, k_{i-1}) for a batch),
        float32/64, NumPy or CuPy.
    X : array
        k0 x n inputs, one example per column (B x k0 x n: one set per network of a batch).

    Returns
    -------
    F : array
        f(X) = W_d ... W_1 X, kd x n.

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument).
    """
    check_network(weights, X)
    return activations(weights, X)[-1]


def activations(weights, X, product=operator.matmul):
    """[X, W_1 X, W_2 W_1 X, ..., f(X)]: the forward pass of Eq. (1), for checked inputs;
    ``product(A, B)``: the matrix product (A @ B).

    Parameters
    ----------
    weights, X
        As in :func:`forward`.
    product : callable
        The matrix product (default A @ B).

    Returns
    -------
    acts : list of arrays
        [X, W_1 X, ..., f(X)].
    """
    acts = [X]
    for W in weights:
        acts.append(product(W, acts[-1]))
    return acts


def backward(weights, acts, delta, input_grad=False, product=operator.matmul):
    """Eq. (8) layer by layer: dL/dW_i = delta_i a_{i-1}^T with delta_d = dL/dF and
    delta_{i-1} = W_i^T delta_i; with ``input_grad`` also dL/dX = W_1^T delta_1.

    Parameters
    ----------
    weights
        As in :func:`forward`.
    acts : list of arrays
        The forward pass (activations).
    delta : array
        dL/dF.
    input_grad : bool
        Also return dL/dX.
    product : callable
        The matrix product.

    Returns
    -------
    grads (and dL/dX)
        [dL/dW_1, ..., dL/dW_d].
    """
    grads = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = product(delta, _T(acts[i]))
        if i or input_grad:
            delta = product(_T(weights[i]), delta)
    return (grads, delta) if input_grad else grads


def loss_and_gradients(weights, X, Y, kind="mse"):
    """(L, [dL/dW_1, ..., dL/dW_d]) by Eq. (8)'s backward pass, for checked inputs.

    Parameters
    ----------
    weights, X, Y, kind
        As in :func:`loss`.

    Returns
    -------
    L, grads
        The loss and [dL/dW_1, ..., dL/dW_d].
    """
    acts = activations(weights, X)                           # Eq. (1)
    L, delta = loss_and_output_gradient(acts[-1], Y, kind)    # L and dL/dF
    return L, backward(weights, acts, delta)                 # Eq. (8)


def loss_and_output_gradient(F, Y, kind):
    """Loss (one value per batch entry) and dL/dF for outputs F (kd x n): Eq. (2) ("mse"), the
    authors' mean ("mse_mean"), cross-entropy, logistic and exponential losses.

    Parameters
    ----------
    F : array
        Outputs, kd x n (or batched).
    Y, kind
        As in :func:`loss` (Y prepared: kd x n).

    Returns
    -------
    L, dF
        The loss (per network) and dL/dF.
    """
    kd, n = F.shape[-2], F.shape[-1]
    if kind == "mse":                       # Eq. (2): 1/(2n) sum_i ||y_i - f(x_i)||^2
        R = F - Y
        return _squared_norm(R) / (2 * n), R / n
    if kind == "mse_mean":                  # mean over all kd*n entries (PyTorch MSELoss)
        R = F - Y
        return _squared_norm(R) / (kd * n), R * (2.0 / (kd * n))
    xp = array_module(F)
    if kind == "ce":                        # softmax over the kd rows, mean over n
        Z = F - F.max(axis=-2, keepdims=True)
        logp = Z - xp.log(xp.exp(Z).sum(axis=-2, keepdims=True))
        return -(Y * logp).sum((-2, -1)) / n, (xp.exp(logp) - Y) / n
    margin = Y * F
    if kind == "logistic":                  # mean log(1 + exp(-y f))
        return (xp.logaddexp(0, -margin).sum((-2, -1)) / n,
                -Y * xp.exp(-xp.logaddexp(0, margin)) / n)
    if kind == "exp":                       # mean exp(-y f)
        e = xp.exp(-margin)
        return e.sum((-2, -1)) / n, -Y * e / n
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSSES}")


def _squared_norm(R):
    """||R||_F^2 of each matrix of R."""
    return array_module(R).vdot(R, R) if R.ndim == 2 else (R * R).sum((-2, -1))


def loss(weights, X, Y, kind="mse"):
    """Training loss of kind in {"mse" (Eq. (2)), "mse_mean", "ce", "logistic", "exp"}.

    Parameters
    ----------
    weights, X
        As in :func:`forward`.
    Y : array
        kd x n targets (for "ce" one-hot columns or integer labels of shape (n,); for
        "logistic" and "exp" +-1).
    kind : {"mse", "mse_mean", "ce", "logistic", "exp"}
        The loss: Eq. (2)'s 1/(2n) sum, the mean over kd n entries, cross-entropy, logistic,
        exponential.

    Returns
    -------
    L : float or array
        The training loss (one value per network of a batch).

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument). Or an unknown kind.
    """
    check_network(weights, X)
    Y = prepare_targets(Y, kind, weights[-1].shape[-2], X.shape[-1])
    return loss_and_output_gradient(activations(weights, X)[-1], Y, kind)[0]


def gradients(weights, X, Y, kind="mse"):
    """[dL/dW_1, ..., dL/dW_d], written by hand (Eq. (8) for the squared loss).

    Parameters
    ----------
    weights, X, Y, kind
        As in :func:`loss`.

    Returns
    -------
    grads : list of arrays
        [dL/dW_1, ..., dL/dW_d], shaped as the weights.

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument).
    """
    check_network(weights, X)
    return loss_and_gradients(weights, X, prepare_targets(Y, kind, weights[-1].shape[-2],
                                                          X.shape[-1]), kind)[1]


def layer_gradients(weights, X, dF):
    """[dL/dW_1, ..., dL/dW_d] given dL/dF at F = f(X) (Eq. (8)); with X = I, for a loss of
    the end-to-end matrix W_d ... W_1 (matrix sensing, Section 4.2).

    Parameters
    ----------
    weights, X
        As in :func:`forward`.
    dF : array
        dL/dF at F = f(X), kd x n.

    Returns
    -------
    grads : list of arrays
        [dL/dW_1, ..., dL/dW_d].

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument).
    """
    check_network(weights, X)
    return backward(weights, activations(weights, X), dF)


# --------------------------------------------------------- gradient descent --
def train(weights, X, Y, kind="mse", lr=1e-2, max_steps=10_000, tol=1e-4,
          record_every=1, measure_every=100, measures=None, callback=None):
    """Full-batch GD W_i <- W_i - lr dL/dW_i (Eq. (8)) by :func:`gradient_descent`; a batch (3-D
    weights) trains together, each network frozen below ``tol`` (or where it diverged).
    ``measures``: {name: m(weights, weights_0)} or one such m, e.g. ``tracker(weights)``
    (alignment and invariance), taken at step 0, every ``measure_every`` steps and at the
    end into History.measurements.  Returns (weights, History).

    Parameters
    ----------
    weights, X, Y, kind
        As in :func:`loss`.
    lr : float or sequence
        The learning rate gamma (> 0); for a batch, one per network may be given.
    max_steps : int
        The step budget.
    tol : float
        Stop at the first recorded step whose loss (the largest of a batch) is below tol.
    record_every, measure_every : int
        Steps between recorded losses, and between measurements.
    measures : dict or callable, optional
        {name: m(params, params_0)} (or one m, e.g. tracker(weights)), taken at step 0,
        every measure_every steps and at the end.
    callback : callable, optional
        callback(step, loss, history) at recorded steps.

    Returns
    -------
    weights, history : list of arrays, History
        The trained weights and what the run recorded.

    Raises
    ------
    ValueError
        Weights or data of the wrong type, shape or dtype, or not finite (the message names
        the argument).
    DivergenceError
        The loss stopped being finite (every network of a batch); .history holds the run.
    """
    check_network(weights, X)
    Y = prepare_targets(Y, kind, weights[-1].shape[-2], X.shape[-1]).astype(weights[0].dtype)
    per_network = frozen_below(lambda ws: loss_and_gradients(ws, X, Y, kind), tol,
                                weights[0].ndim == 3)
    return gradient_descent(weights, per_network, network_rates(lr, weights), max_steps, tol,
                            record_every, measure_every, measures, callback)


def network_rates(lr, weights):
    """``lr`` as train applies it: a number, or one number per network of a batch, as a
    (b, 1, 1) array of the weights' dtype and module, so that network b takes the GD step
    W_i <- W_i - lr_b dL/dW_i with its own rate (Eq. (8)'s gradients).

    Parameters
    ----------
    lr : float or sequence
        One learning rate, or b of them for a batch of b networks.
    weights
        As in :func:`forward`.

    Returns
    -------
    float or array

    Raises
    ------
    ValueError
        Rates for weights that are not a batch, or not one per network.
    """
    if np.ndim(lr) == 0:
        return lr
    rates, W = np.asarray(to_numpy(lr), dtype=np.float64), weights[0]
    if W.ndim != 3 or rates.shape != W.shape[:1]:
        raise ValueError(f"lr of shape {rates.shape}: give one number, or one per network of a "
                         f"batch ({W.shape[0] if W.ndim == 3 else 'weights are not a batch'})")
    return array_module(W).asarray(rates.reshape(-1, 1, 1), dtype=W.dtype)


def frozen_below(loss_and_grads, tol, batched):
    """For a batch of networks: zero the gradients of those whose loss is below tol, so
    each stops where its own run would (the batch stops when all are below), and of those
    whose loss is no longer finite (diverged: they stay where they diverged, the others
    go on as they would alone).

    Parameters
    ----------
    loss_and_grads : callable
        loss_and_grads(params) -> (L, grads) for a batch.
    tol : float
        The threshold.
    batched : bool
        Whether params carry a batch axis (else loss_and_grads is returned as it is).

    Returns
    -------
    callable
        The same, with the gradients of converged or diverged networks zero.
    """
    def wrapped(ps):
        L, grads = loss_and_grads(ps)
        xp = array_module(L)
        active = None if L.shape[0] == 1 else (L >= tol) & xp.isfinite(L)   # (one: the run)
        if active is None or (xp is np and bool(active.all())):
            return L, grads                                   # (a host check: cheaper)
        return L, [xp.where(active[:, None, None], g, 0.0) for g in grads]
    return wrapped if batched else loss_and_grads


def gradient_descent(params, loss_and_grads, lr=1e-2, max_steps=10_000, tol=1e-4,
                     record_every=1, measure_every=100, measures=None, callback=None):
    """Plain GD p <- p - lr g, with ``loss_and_grads(params) -> (L, grads)`` (Eq. (8)).  Stops
    when the loss (the largest over a batch) is below ``tol`` at a recorded step, after
    ``max_steps``, or on Ctrl-C.  ``measures``: {name: m(params, params_0)} at step 0, every
    ``measure_every`` steps and at the end; ``callback(step, loss, history)`` at recorded
    steps.  Returns (params, History); DivergenceError on NaN.

    Parameters
    ----------
    params : list of arrays
        The parameters (copied; the originals are not changed).
    loss_and_grads : callable
        loss_and_grads(params) -> (L, [dL/dp]).
    lr, max_steps, tol, record_every, measure_every, measures, callback
        As in :func:`train`.

    Returns
    -------
    params, history : list of arrays, History

    Raises
    ------
    ValueError
        A bad schedule (lr, tol, counts).
    DivergenceError
        The loss stopped being finite; .history holds the run.
    """
    check_schedule(lr, max_steps, record_every, measure_every, tol)
    ps, params0 = [p.copy() for p in params], [p.copy() for p in params]
    run = Run(lr, max_steps, tol, record_every, callback, as_measures(measures), params0)
    spare, xp = [p.copy() for p in ps], array_module(*ps)
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by run.stops
        try:
            while True:
                if run.step % measure_every == 0:
                    run.measure(ps)
                L, grads = loss_and_grads(ps)
                if run.stops(run.step, L):
                    break
                for p, g, new in zip(ps, grads, spare):
                    xp.subtract(p, lr * g, out=new)                  # the step, into spare
                ps, spare, run.step = spare, ps, run.step + 1   # (Ctrl-C: a whole step or none)
        except KeyboardInterrupt:
            run.hist.stop_reason = "interrupted"
    return ps, run.finish(ps)


def as_measures(measures):
    """{name: m} from None, a dict of measures or one measure (named "measure").

    Parameters
    ----------
    measures : None, dict or callable

    Returns
    -------
    dict
        {name: m}.

    Raises
    ------
    ValueError
        Anything else.
    """
    if measures is None or isinstance(measures, dict):
        return measures or {}
    if callable(measures):
        return {"measure": measures}
    raise ValueError(f"measures must be a dict {{name: m(params, params_0)}} or one such "
                     f"function (e.g. align.tracker(weights)), got {type(measures).__name__}")


def check_schedule(lr, max_steps, record_every, measure_every, tol):
    """Raise ValueError unless gradient_descent's schedule is valid.

    Parameters
    ----------
    lr, max_steps, record_every, measure_every, tol
        As in gradient_descent.

    Raises
    ------
    ValueError
        A value out of range.
    """
    rates = np.asarray(to_numpy(lr), dtype=np.float64)
    if not (rates.size and np.all(rates > 0) and np.all(np.isfinite(rates))):
        raise ValueError(f"lr must be a positive finite number (or one per network), got {lr}")
    check_tolerance("tol", tol)
    for name, value, least in (("record_every", record_every, 1),
                               ("measure_every", measure_every, 1), ("max_steps", max_steps, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclasses.dataclass
class History:
    """What a run of :func:`train` recorded; ``to_dict`` gives plain JSON types.
    ``losses``: one float per recorded step, or for a batch of networks one NumPy row."""
    steps: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)
    measure_steps: list = dataclasses.field(default_factory=list)
    measurements: dict = dataclasses.field(default_factory=dict)
    stop_reason: str = ""
    final_step: int = 0
    wall_time: float = 0.0

    def __repr__(self):
        return (f"History({len(self.steps)} losses recorded, {len(self.measure_steps)} "
                f"measurements of {sorted(self.measurements)}, stop_reason={self.stop_reason!r}, "
                f"final_step={self.final_step}, wall_time={self.wall_time:.3g} s)")

    def to_dict(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(fields, default=_plain))   # (asdict deep-copies every list)


def _plain(x):
    """A Python float (or nested list) from a scalar or an array of either module."""
    if isinstance(x, (float, int, np.floating)):
        return float(x)
    x = to_numpy(x)
    return x.tolist() if x.ndim else x.item()


def worst_loss(losses):
    """The largest finite loss of a batch's row (diverged networks are frozen); NaN when none
    is finite (every network diverged).

    Parameters
    ----------
    losses : array
        A batch's row of losses.

    Returns
    -------
    float
        The largest finite one; NaN when none is finite.
    """
    finite = losses[np.isfinite(losses)]
    return float(finite.max()) if finite.size else math.nan


def _diverged(params):
    """For a batch (3-D parameters): a mask of the networks with a non-finite entry, or None
    when there are none (or no batch)."""
    if params[0].ndim != 3:
        return None
    xp = array_module(*params)
    bad = ~xp.stack([xp.isfinite(p).all(axis=(1, 2)) for p in params]).all(axis=0)
    return bad if bool(bad.any()) else None


@dataclasses.dataclass
class Run:
    """A :func:`gradient_descent` run's bookkeeping: its ``step``, what it recorded
    (``hist``), its rules."""
    lr: float
    max_steps: int
    tol: float
    record_every: int
    callback: object
    measures: dict
    params0: list
    hist: History = dataclasses.field(default_factory=History)
    step: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def measure(self, at):
        """Record every measure of ``at``, all computed before any is kept (no partial record).
        Networks of a batch that diverged are measured at their start and recorded as NaN."""
        values, bad = {}, _diverged(at)
        if bad is not None:
            at = [array_module(p).where(bad[:, None, None], p0, p)
                  for p, p0 in zip(at, self.params0)]
        for name, fn in self.measures.items():
            value = fn(at, self.params0)
            for key, v in (value.items() if isinstance(value, dict) else [(name, value)]):
                if bad is not None and getattr(v, "shape", ())[:1] == bad.shape:   # per network
                    mask = bad.reshape(bad.shape + (1,) * (v.ndim - 1))
                    v = array_module(v).where(mask, math.nan, v.astype(float))
                values[key] = _plain(v)
        self.hist.measure_steps.append(self.step)
        for key, v in values.items():
            self.hist.measurements.setdefault(key, []).append(v)

    def stops(self, step, L):
        """Record the loss of ``step`` (before its update); True when the run ends there."""
        hist = self.hist
        if step % self.record_every == 0 or step == self.max_steps:
            value = to_numpy(L).copy() if getattr(L, "ndim", 0) else float(L)   # a batch: a row
            worst = value if isinstance(value, float) else worst_loss(value)
            if not math.isfinite(worst):
                hist.stop_reason, hist.final_step = "diverged", step
                hist.wall_time = time.perf_counter() - self.start
                lr = np.asarray(to_numpy(self.lr)).max()
                raise DivergenceError(f"loss became {worst} at step {step} with lr = {lr:g}"
                                      f"{'' if np.ndim(self.lr) == 0 else ' (the largest)'}; "
                                      f"try a smaller learning rate (e.g. {lr / 10:g})", hist)
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
        """The final measurement (unless one was taken at this step); the History."""
        self.hist.final_step = self.step
        if not self.hist.measure_steps or self.hist.measure_steps[-1] != self.step:
            try:
                self.measure(ps)
            except KeyboardInterrupt:            # a second Ctrl-C: the run ends without it
                self.hist.stop_reason = "interrupted"
        self.hist.wall_time = time.perf_counter() - self.start
        return self.hist


# ------------------------------------------------------------------- usSVD --
def ussvd(A):
    """A usSVD (Definition 1): U (m x m), s (min(m, n)), V (n x n) with A = U Sigma V^T.

    Parameters
    ----------
    A : array
        An m x n matrix.

    Returns
    -------
    U, s, V
        U (m x m), s (min(m, n)), V (n x n) with A = U Sigma V^T.

    Raises
    ------
    ValueError
        A is not a finite float array.
    """
    check_array("A", A)
    check_finite("A", A)
    U, s, Vt = array_module(A).linalg.svd(A, full_matrices=True)
    return U, s, _T(Vt)


def ussvd_matrix(U, s, V):
    """U Sigma V^T for a usSVD (Definition 1), Sigma rectangular diagonal with entries s.

    Parameters
    ----------
    U, s, V : arrays
        A usSVD.

    Returns
    -------
    A : array
        U Sigma V^T.
    """
    r = s.shape[-1]
    return (U[..., :, :r] * s[..., None, :]) @ _T(V[..., :, :r])


def ussvd_reorder(U, s, V, perm, signs):
    """Another usSVD of the same matrix (Definition 1 leaves order and signs free): the
    triples reordered by ``perm``, then u_j and sigma_j multiplied by signs[j] = +-1.

    Parameters
    ----------
    U, s, V : arrays
        A usSVD.
    perm : sequence of int
        The new order of the triples.
    signs : array of +-1
        Signs for u_j and sigma_j.

    Returns
    -------
    U, s, V
        Another usSVD of the same matrix.
    """
    r = s.shape[-1]
    U, V = U.copy(), V.copy()
    U[..., :, :r] = U[..., :, perm] * signs
    V[..., :, :r] = V[..., :, perm]
    return U, s[..., perm] * signs, V


# ------------------------------------------------------ measures (Section 6) --
def reduced_svds(weights):
    """Reduced SVDs [(U_i, s_i, V_i), ...] of the layers, the singular vectors Section 6
    measures: float64 host arrays, s descending (a batch of networks keeps its leading axis).

    Parameters
    ----------
    weights
        As in :func:`forward`.

    Returns
    -------
    list of (U, s, V)
        float64 host arrays, s descending.
    """
    svds = [np.linalg.svd(to_numpy(W).astype(np.float64), full_matrices=False) for W in weights]
    return [(U, s, _T(Vt)) for U, s, Vt in svds]


def _cluster_bounds(s, rtol, scale):
    """Starts and sizes of the runs of descending values s equal up to rtol * scale."""
    starts = np.flatnonzero(np.abs(np.diff(s)) > rtol * scale) + 1
    starts = np.concatenate([[0], starts]) if s.size else starts
    return starts, np.diff(np.append(starts, s.size))


def _clusters(s, rtol, scale):
    """Index groups of descending values s equal up to rtol * scale."""
    return np.split(np.arange(s.size), _cluster_bounds(s, rtol, scale)[0][1:])


def _adapt_clusters(M, a_bounds, b_sizes):
    """M = A^T B with A's directions rotated, in each A-cluster (a_bounds: starts, sizes), to
    the basis B's clusters (sizes b_sizes) split it into: the eigenvectors of the compression
    of sum_b w_b P_{F_b} (distinct w_b; F_b the B-clusters and span(B)^perp)."""
    M = M.copy()
    # Any distinct w_b work (they only tell the B-clusters apart in the eigenvalues); the
    # fractional parts of multiples of sqrt(2) are distinct and in [0, 1), so w_b in [1, 2),
    # away from the 0.5 that the complement of span(B) gets.
    weights = np.repeat(1.0 + np.sqrt(2.0) * np.arange(1, b_sizes.size + 1) % 1.0, b_sizes)
    starts, sizes = a_bounds
    for size in np.unique(sizes[sizes > 1]):          # clusters of one size in one batched eigh
        rows = starts[sizes == size][:, None] + np.arange(size)
        block = M[rows]                                             # (clusters, size, q)
        compression = (block * weights) @ _T(block) + 0.5 * (np.eye(size) - block @ _T(block))
        M[rows] = _T(np.linalg.eigh(compression)[1]) @ block
    return M


def greedy_match(C, capacity):
    """The paired rule's matching: rows of C >= 0 (p x m) one to one to columns of capacity
    ``capacity`` (m,), entries taken in decreasing order (ties row-major, NaN last) when the
    row is free and the column has room.  Returns each row's matched value (0: none).

    Parameters
    ----------
    C : array
        p x m entries >= 0.
    capacity : sequence of int
        (m,) how many rows each column takes.

    Returns
    -------
    array
        (p,) each row's matched value (0: none).
    """
    value, room, free = np.zeros(C.shape[0]), list(capacity), [True] * C.shape[0]
    for e in np.argsort(-C, axis=None, kind="stable"):
        r, c = divmod(int(e), C.shape[1])
        if free[r] and room[c] > 0:
            free[r], room[c], value[r] = False, room[c] - 1, C[r, c]
    return value


@dataclasses.dataclass
class Pair:
    """Orthonormal directions A, B (columns; singular values sa, sb descending) in R^k, B the
    side the matched rule scores; ``positions``: for adjacent layers, how many positions
    the complement of span(B) may take (Definition 2's rectangular Sigma_i)."""
    A: np.ndarray
    sa: np.ndarray
    B: np.ndarray
    sb: np.ndarray
    k: int
    positions: int = None

    @functools.cached_property
    def product(self):
        """A^T B, shared by both rules (computed when first needed)."""
        return _T(self.A) @ self.B


def alignment(weights, how="paired", rtol=1e-6):
    """Alignment of adjacent layers (Section 6), in [0, 1]: U_i against V_{i+1} by the rule
    ``how``, "paired" (the paper's "average |dot| between corresponding columns", made
    exact) or "matched" (the authors' code).  Pairwise only: :func:`is_aligned` decides
    Definition 2 for the whole chain.

    Parameters
    ----------
    weights
        As in :func:`forward`.
    how : {"paired", "matched"}
        The paired rule (the paper's, made exact) or the matched rule (the authors' code).
    rtol : float
        Singular values within rtol * sigma_max of each other are equal; below it, unused.

    Returns
    -------
    float or array
        In [0, 1]; 1 when adjacent layers share singular vectors (one value per network of a
        batch).

    Raises
    ------
    ValueError
        Bad weights, an unknown how or rtol outside [0, 1).
    """
    check_network(weights)
    svds = reduced_svds(weights)
    return _score(alignment_pairs(svds, layer_widths(svds)), how, rtol)


def invariance(weights_t, weights_0, how="paired", rtol=1e-6):
    """Invariance of the singular vectors (Section 6), in [0, 1]: U_i(t) against U_i(0)
    for i < d and V_i(t) against V_i(0) for i > 1, by the rule of :func:`alignment`.

    Parameters
    ----------
    weights_t, weights_0 : list of arrays
        The network now and at the start (the same shapes).
    how, rtol
        As in :func:`alignment`.

    Returns
    -------
    float or array
        In [0, 1]; 1 when no singular vector moved.

    Raises
    ------
    ValueError
        Bad weights or different shapes, an unknown how, a bad rtol.
    """
    check_network(weights_t)
    check_network(weights_0)
    if [W.shape for W in weights_t] != [W.shape for W in weights_0]:
        raise ValueError(f"weights_t and weights_0 must have the same shapes, got "
                         f"{[_shape(W) for W in weights_t]} and {[_shape(W) for W in weights_0]}")
    now = reduced_svds(weights_t)
    return _score(invariance_pairs(now, reduced_svds(weights_0), layer_widths(now)), how, rtol)


def _score(pairs, how, rtol):
    """The measure of ``pairs`` by the rule ``how`` (checked here, with ``rtol``)."""
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    check_tolerance("rtol", rtol, 1)
    return paired_score(pairs, rtol) if how == "paired" else matched_score(pairs)


def paired_score(pairs, rtol):
    """The paired rule (Section 6), the paper's "average dot product between corresponding
    columns":
    the mean matched |cosine| over the scored directions of all pairs (pair_matches).
    1 exactly when W_i W_i^T and W_{i+1}^T W_{i+1} commute.

    Parameters
    ----------
    pairs : list of Pair
        From alignment_pairs or invariance_pairs.
    rtol : float
        As in alignment.

    Returns
    -------
    float
        The mean matched |cosine| over the scored directions.
    """
    total, count = 0.0, 0
    for pair in pairs:
        matched, scored = pair_matches(pair, rtol)
        total, count = total + matched, count + scored
    return total / count if count else 1.0


def used_directions(s, rtol, top):
    """Which directions Section 6's paired rule scores (the "used" ones): singular values
    s > rtol sigma_max (``top``), one rule for every caller.

    Parameters
    ----------
    s : array
        Singular values.
    rtol : float
        As in alignment.
    top : float
        sigma_max.

    Returns
    -------
    array of bool
    """
    return s > rtol * top


def pair_matches(pair, rtol, top_a=None, top_b=None, k=None, match=None):
    """One pair by the paired rule: (the sum of matched |cosines|, the directions scored).

    With distinct singular values this is the paper's rule: each used direction (sigma >
    rtol sigma_max; ``top_a``, ``top_b``: the sigma_max, by default the pair's own) of the
    side with fewer is matched one to one, greedily by decreasing |cosine|, to a direction
    of the other side or to the complement of its span.  Singular vectors of equal values
    are defined only up to a rotation inside their cluster, so the scored side's clusters
    are first turned to the basis the other side's clusters split them into
    (_adapt_clusters), and a cluster (or the complement: ``k`` - q dimensions, for adjacent
    layers at most max(k_{i-1}, k_{i+1}) - q, the positions of Definition 2's rectangular
    Sigma_i) takes as many matches as its dimension.

    Parameters
    ----------
    pair : Pair
        One pair.
    rtol : float
        As in alignment.
    top_a, top_b : float, optional
        The sigma_max rtol refers to (default the pair's own).
    k : int, optional
        The dimension of the space (default pair.k).

    Returns
    -------
    matched, scored : float, int
        The sum of matched |cosines| and the number of scored directions.
    """
    top = lambda given, s: given if given is not None else (s[0] if s.size else 0.0)
    scale_a, scale_b = top(top_a, pair.sa), top(top_b, pair.sb)
    ua, ub = used_directions(pair.sa, rtol, scale_a), used_directions(pair.sb, rtol, scale_b)
    M, sa, sb = pair.product[ua][:, ub], pair.sa[ua], pair.sb[ub]
    if M.shape[0] > M.shape[1]:                      # score the side with fewer
        M, sa, sb, scale_a, scale_b = M.T, sb, sa, scale_b, scale_a
    p, q = M.shape
    if not p:
        return 0.0, 0
    starts, sizes = _cluster_bounds(sb, rtol, scale_b)
    M = _adapt_clusters(M, _cluster_bounds(sa, rtol, scale_a), sizes)
    sq = M * M
    in_b = np.add.reduceat(sq, starts, axis=1) if q else np.zeros((p, 0))
    outside = np.clip(1.0 - sq.sum(axis=1, keepdims=True), 0.0, 1.0)
    C = np.sqrt(np.clip(np.concatenate([in_b, outside], axis=1), 0.0, 1.0))
    k = pair.k if k is None else k
    capacity = np.append(sizes, max(0, min(k, pair.positions or k) - q))
    return float((match or greedy_match)(C, capacity).sum()), p


def matched_score(pairs):
    """The matched rule (Section 6, the authors' code): each direction of B (V_{i+1}; for
    invariance the initial network's) scored by its largest |cosine| with A's, summed over
    all pairs / B's directions.

    Parameters
    ----------
    pairs : list of Pair

    Returns
    -------
    float
        The authors' rule over all pairs.
    """
    sums, count = matched_sums(pairs)
    total = 0.0
    for s in sums:
        total = total + s
    return total / count if count else 1.0


def matched_sums(pairs):
    """The matched rule's parts: ([the sum of the best |cosines| of each group of pairs of
    one shape (one reduction each)], the number of B's directions).

    Parameters
    ----------
    pairs : list of Pair

    Returns
    -------
    sums, count
        Each group's sum of best |cosines|, and B's directions.
    """
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
        rows = xp.ascontiguousarray(xp.moveaxis(best, 0, -2))  # each network's values in one row:
        sums.append(rows.reshape(rows.shape[:-2] + (-1,)).sum(axis=-1))   # its sum in any batch
    return sums, count


def layer_widths(svds):
    """[k_0, k_1, ..., k_d] from the layers' reduced SVDs [(U, s, V), ...].

    Parameters
    ----------
    svds : list of (U, s, V)

    Returns
    -------
    list of int
        [k_0, ..., k_d].
    """
    return [svds[0][2].shape[-2]] + [U.shape[-2] for U, _, _ in svds]


def alignment_pairs(svds, widths):
    """Pairs (U_i, V_{i+1}) of the adjacent layers, from reduced SVDs [(U, s, V), ...]: what
    Section 6's alignment compares (U_i = V_{i+1} in Definition 2).

    Parameters
    ----------
    svds : list of (U, s, V)
    widths : list of int

    Returns
    -------
    list of Pair
        (U_i, V_{i+1}).
    """
    return [Pair(svds[i][0], svds[i][1], svds[i + 1][2], svds[i + 1][1], widths[i + 1],
                 positions=max(widths[i], widths[i + 2]))
            for i in range(len(svds) - 1)]


def invariance_pairs(now, then, widths):
    """Pairs (U_i(t), U_i(0)) for i < d and (V_i(t), V_i(0)) for i > 1: what Section 6's
    invariance compares.

    Parameters
    ----------
    now, then : lists of (U, s, V)
        Reduced SVDs now and at the start.
    widths : list of int

    Returns
    -------
    list of Pair
        (U_i(t), U_i(0)) for i < d, (V_i(t), V_i(0)) for i > 1.
    """
    sides = [(i, 0) for i in range(len(now) - 1)] + [(i, 2) for i in range(1, len(now))]
    return [Pair(now[i][side], now[i][1], then[i][side], then[i][1],
                 widths[i + 1] if side == 0 else widths[i])
            for i, side in sides]


def tracker(weights_0, rtol=1e-6):
    """A measure for :func:`train`: ``m(weights, _)`` -> {MEASURE_KEYS: alignment and
    invariance by both rules} (Section 6), one value per network of a batch.

    Parameters
    ----------
    weights_0 : list of arrays
        The network at the start.
    rtol : float
        As in alignment.

    Returns
    -------
    callable
        m(weights, _) -> {MEASURE_KEYS: value}, for train's measures.

    Raises
    ------
    ValueError
        Bad weights or rtol.
    """
    check_network(weights_0)
    check_tolerance("rtol", rtol, 1)
    then = reduced_svds(weights_0)
    return lambda weights, _=None: _measures(reduced_svds(weights), then, rtol)


def _measures(now, then, rtol):
    """The four measures from reduced SVDs now and at the start (a batch: one at a time)."""
    if now[0][1].ndim == 2:
        one = lambda svds, b: [tuple(a[b] for a in svd) for svd in svds]
        rows = [_measures(one(now, b), one(then, b), rtol) for b in range(now[0][1].shape[0])]
        return {key: np.array([row[key] for row in rows]) for key in MEASURE_KEYS}
    widths = layer_widths(now)
    aligned, invariant = alignment_pairs(now, widths), invariance_pairs(now, then, widths)
    return {"alignment_paired": paired_score(aligned, rtol),
            "alignment_matched": float(matched_score(aligned)),
            "invariance_paired": paired_score(invariant, rtol),
            "invariance_matched": float(matched_score(invariant))}


# -------------------------------------------------- exact test of Def. 2 --
@dataclasses.dataclass
class AlignmentTest:
    """Result of :func:`is_aligned`, truthy when aligned: the witness ``ussvds`` [(U_i, s_i,
    V_i)] with U_i = V_{i+1}, ``residual`` max_i |off-diagonal of U_i^T W_i V_i| / ||W_i||_2."""
    aligned: bool
    residual: float
    reason: str
    ussvds: list = dataclasses.field(default=None, repr=False)

    def __bool__(self):
        return bool(self.aligned)


def _orth_complement(Q, k):
    """Orthonormal basis of span(Q)^perp in R^k (Q with orthonormal columns)."""
    return np.linalg.qr(Q, mode="complete")[0][:, Q.shape[1]:] if Q.shape[1] else np.eye(k)


def _orthonormal_by_size(Z, norms):
    """Z's columns (unit vectors, nearly orthonormal) made orthonormal by Gram-Schmidt in
    order of decreasing ``norms``: the images of the larger singular values are the more
    accurate, so each column is corrected only against those before it."""
    order = np.argsort(-norms, kind="stable")
    Q, R = np.linalg.qr(Z[:, order])
    return (Q * np.where(np.diagonal(R) < 0, -1.0, 1.0))[:, np.argsort(order)]


def _joint_eigenbasis(C, products, tol):
    """span(C) split into common right singular vectors of the forward products [(P, m)]:
    SVDs of P on each group (accurate for small values, unlike eigh of P^T P), values compared
    per layer (m-th roots) up to ``tol``, below tol (and rounding) as zero; unsplit groups
    kept as is.  Each group is last turned to the singular vectors of the next layer on it:
    its values, equal up to tol but not to rounding (float32), then do not mix."""
    groups = [C]
    for P, m in products:
        floor = max(100 * np.finfo(float).eps * max(P.shape), tol)
        refined = []
        for B in groups:
            if B.shape[1] < 2:
                refined.append(B)
                continue
            _, s, Vt = np.linalg.svd(P @ B)
            s = np.concatenate([s, np.zeros(B.shape[1] - s.size)])
            parts = _clusters(np.where(s > floor, s, 0.0) ** (1.0 / m), tol, scale=1.0)
            refined.extend([B] if len(parts) == 1 else [B @ Vt[idx].T for idx in parts])
        groups = refined
    if products and products[0][1] == 1:
        P = products[0][0]
        groups = [g if g.shape[1] < 2 else g @ np.linalg.svd(P @ g)[2].T for g in groups]
    return [g[:, j] for g in groups for j in range(g.shape[1])]


def _forward_products(Ws, i):
    """[(P, m)]: P = W_l ... W_{i+1} / ||.||_2, the m = l - i layers after space i (l > i)."""
    products, P = [], None
    for m, W in enumerate(Ws[i:], start=1):
        P = W if P is None else W @ P
        scale = np.linalg.norm(P, 2)
        if scale > 0:
            products.append((P / scale, m))
    return products


def _strings(Ws, tol):
    """The chain split into strings [(a, [q_a, q_{a+1}, ...])], W_{i+1} q_i = s q_{i+1} while
    nonzero, orthogonal in each space for an aligned network (Krull-Schmidt for a chain of
    maps), starting at joint singular vectors of the forward products."""
    widths = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    strings, alive = [], []
    for i, k in enumerate(widths):
        C = np.eye(k)
        if i:
            W = Ws[i - 1]
            Z = W @ np.array([strings[s][1][-1] for s in alive]).reshape(len(alive), W.shape[1]).T
            norms = np.linalg.norm(Z, axis=0)
            keep = norms > tol * max(np.linalg.norm(W, 2), np.finfo(float).tiny)
            if keep.sum() > k:                   # not aligned: the k largest go on
                keep &= norms >= np.sort(norms)[-k]
            alive = [s for s, kept in zip(alive, keep) if kept]
            Qn = _orthonormal_by_size(Z[:, keep] / norms[keep], norms[keep])
            for j, s in enumerate(alive):
                strings[s][1].append(Qn[:, j])
            C = _orth_complement(Qn, k)
        fresh = _joint_eigenbasis(C, _forward_products(Ws, i), tol)
        alive += range(len(strings), len(strings) + len(fresh))
        strings += [(i, [q]) for q in fresh]
    return strings, widths


def _track_ends(widths):
    """ends[i][j]: the last space of the run i, i+1, ... of spaces that have a position j
    (k > j): position j of space i can hold one string from i to at most there."""
    ends = [[i] * k for i, k in enumerate(widths)]
    for i in range(len(widths) - 2, -1, -1):
        for j in range(min(widths[i], widths[i + 1])):
            ends[i][j] = ends[i + 1][j]
    return ends


def _pairings(tracks, strings):
    """Every one-to-one pairing of free positions (multiset {track end R: count}) with the
    strings starting here ({string end b: count}) with b <= R: dicts {(R, b): count}.  The
    tracks that end soonest choose first, best fit first; a choice that leaves the rest
    unpairable is not followed."""
    if not tracks:
        yield {}
        return
    R = min(tracks)
    rest = {r: n for r, n in tracks.items() if r != R}
    fits = sorted((b for b in strings if b <= R and strings[b]), reverse=True)

    def take(o, need, left):
        if need == 0:
            if _pairable(rest, left):
                yield from _pairings(rest, {b: n for b, n in left.items() if n})
        elif o < len(fits) and sum(left[b] for b in fits[o:]) >= need:
            b = fits[o]
            for n in range(min(need, left[b]), -1, -1):
                for more in take(o + 1, need - n, {**left, b: left[b] - n}):
                    yield {**more, (R, b): n} if n else more
    yield from take(0, tracks[R], strings)


def _pairable(tracks, strings):
    """Whether {R: count} and {b: count} pair one to one with b <= R (Hall's condition for
    nested choices: at every t, no more strings end after t than tracks do)."""
    if sum(tracks.values()) != sum(strings.values()):
        return False
    return all(sum(n for b, n in strings.items() if b > t) <= sum(n for R, n in tracks.items()
                                                                if R > t) for t in strings)


def _assign_positions(intervals, widths):
    """Positions for the strings (a, b) over spaces a..b, distinct in each space: a string
    needs one position j below every k_a..k_b (Sigma_i is rectangular diagonal).  Position
    j of space i is a track lasting while k > j (_track_ends); tracks ending at the same
    space are interchangeable, so the search runs over counts: the state after space i is
    the multiset of (track end, string end) pairs going on, and states that fail are
    remembered.  Exact; None when no positions exist."""
    ends, d = _track_ends(widths), len(widths) - 1
    starting = [collections.Counter(b for a, b in intervals if a == i) for i in range(d + 1)]
    failed = set()

    def search(i, state):                     # state: ((R, e), count) pairs alive into space i
        if i > d:
            return []
        if (i, state) in failed:
            return None
        free = collections.Counter()                  # track ends of the free positions:
        for (R, e), n in state:                       # those whose string ended,
            if e < i:
                free[R] += n
        free.update(ends[i][j] for j in range(widths[i - 1] if i else 0, widths[i]))  # new ones
        going = collections.Counter({(R, e): n for (R, e), n in state if e >= i})
        if _pairable(free, starting[i]):
            for pairing in _pairings(free, starting[i]):
                after = going + collections.Counter(pairing)
                rest = search(i + 1, tuple(sorted((k, n) for k, n in after.items() if k[0] > i)))
                if rest is not None:
                    return [pairing] + rest
        failed.add((i, state))
        return None

    plan = search(0, ())
    return None if plan is None else _positions_from_plan(plan, intervals, widths, ends)


def _positions_from_plan(plan, intervals, widths, ends):
    """Concrete positions from the search's pairings, space by space."""
    index, held = [None] * len(intervals), {}            # held: position -> string end
    for i, pairing in enumerate(plan):
        free = [j for j in range(widths[i]) if held.get(j, -1) < i]
        by_end = {}
        for s, (a, b) in enumerate(intervals):
            if a == i:
                by_end.setdefault(b, []).append(s)
        for (R, b), n in pairing.items():
            for _ in range(n):
                j = next(j for j in free if ends[i][j] == R)
                free.remove(j)
                s = by_end[b].pop()
                index[s], held[j] = j, b
    return index


def _gram_commutators(Ws, tol):
    """Necessary condition of Definition 2: U_i = V_{i+1} diagonalises W_i W_i^T and
    W_{i+1}^T W_{i+1}, so they commute.  Returns (the largest relative commutator
    ||[A, B]||_F / (||A||_2 ||B||_2), its layer, whether it is too large for any witness to
    be off-diagonal by at most tol): an off-diagonal part E_i with entries <= tol ||W_i||_2
    has ||E_i||_F <= e_i = tol sqrt(k_i k_{i-1}), and then (expanding [A, B] around the
    diagonal parts, which commute) the commutator is below 12 (e_i + e_{i+1}) for e <= 0.1,
    plus rounding."""
    worst, layer, impossible = 0.0, 0, False
    norms = [np.linalg.norm(W, 2) if W.size else 0.0 for W in Ws]
    for i in range(len(Ws) - 1):
        if norms[i] == 0 or norms[i + 1] == 0:
            continue
        A, B = Ws[i] @ Ws[i].T / norms[i] ** 2, Ws[i + 1].T @ Ws[i + 1] / norms[i + 1] ** 2
        value = float(np.linalg.norm(A @ B - B @ A))
        e = [tol * math.sqrt(W.size) for W in Ws[i:i + 2]]
        # (+ rounding: each entry of A B - B A sums k products of entries at most 1)
        bound = 12 * (e[0] + e[1]) + 10 * np.finfo(float).eps * A.shape[0] ** 2
        if value > worst:
            worst, layer = value, i + 1
        impossible |= max(e) <= 0.1 and value > bound
    return worst, layer, impossible


def is_aligned(weights, tol=1e-8):
    """Exact test of Definition 2: do usSVDs W_i = U_i Sigma_i V_i^T with U_i = V_{i+1} exist?
    Any order, sign and multiplicity of singular values, any widths.  ``tol``, relative to
    ||W_i||_2 (about 1e-4 for float32): closer singular values are one cluster, smaller
    images are zero, and the witness must diagonalise every W_i to it.  First a necessary
    condition (_gram_commutators: W_i W_i^T and W_{i+1}^T W_{i+1} commute); then the strings
    of singular vectors (_strings) need positions making every Sigma_i rectangular diagonal
    (_assign_positions, an exact search), so commuting Gram matrices are not enough
    (W_1 = e_1 (3x1), W_2 = e_2^T (1x3)).  Never raises for a well-formed network.

    Parameters
    ----------
    weights
        As in :func:`forward`; one network (2-D layers).
    tol : float
        Relative tolerance (about 1e-4 for float32).

    Returns
    -------
    AlignmentTest
        Truthy when aligned; .residual, .reason and on success .ussvds, the witness.

    Raises
    ------
    ValueError
        Bad weights, a batch, or tol outside [0, 1).
    """
    check_network(weights)
    check_tolerance("tol", tol, 1)
    if any(W.ndim != 2 for W in weights):
        raise ValueError("is_aligned takes one network (2-D weights); loop over a batch")
    Ws = [to_numpy(W).astype(np.float64) for W in weights]
    scales = [float(np.abs(W).max()) if W.size else 0.0 for W in Ws]
    Ws = [W / (c or 1.0) for W, c in zip(Ws, scales)]              # (no overflow at 1e200)
    commutator, layer, impossible = _gram_commutators(Ws, tol)
    if impossible:
        return AlignmentTest(False, commutator, f"W_{layer} W_{layer}^T and W_{layer + 1}^T "
                             f"W_{layer + 1} do not commute (relative commutator "
                             f"{commutator:.3g}): no shared singular vectors")
    strings, widths = _strings(Ws, tol)
    index = _assign_positions([(a, a + len(vectors) - 1) for a, vectors in strings], widths)
    if index is None:
        return AlignmentTest(False, math.inf, "no positions make every Sigma_i "
                             "rectangular diagonal (rectangular widths)")
    Q = [np.zeros((k, k)) for k in widths]
    for (a, vectors), j in zip(strings, index):
        for i, q in enumerate(vectors, start=a):
            Q[i][:, j] = q
    ussvds, residuals = [], []
    for i, W in enumerate(Ws, start=1):
        S = Q[i].T @ W @ Q[i - 1]
        ussvds.append((Q[i], np.diagonal(S) * scales[i - 1], Q[i - 1]))
        np.fill_diagonal(S, 0.0)
        scale = np.linalg.norm(W, 2)
        residuals.append(float(np.abs(S).max() / scale) if scale > 0 and S.size else 0.0)
    residual, worst = max(residuals), 1 + int(np.argmax(residuals))
    ok = residual <= tol
    reason = "" if ok else (f"W_{worst} is off-diagonal by {residual:.3g} (relative) in "
                            f"the best shared singular vectors")
    return AlignmentTest(ok, residual, reason, ussvds)


def rect_diag(s, m, n):
    """The m x n rectangular diagonal matrix with diagonal s: Sigma_i of Definition 1, Eq. (3).

    Parameters
    ----------
    s : array
        The diagonal.
    m, n : int
        The shape.

    Returns
    -------
    array
        The m x n rectangular diagonal matrix.
    """
    xp = array_module(s)
    S = xp.zeros((m, n), dtype=s.dtype)
    S[xp.arange(s.shape[-1]), xp.arange(s.shape[-1])] = s
    return S


def aligned_network(bases, sigmas):
    """W_i = Q_i Sigma_i Q_{i-1}^T, aligned (Definition 2) by construction: bases orthonormal
    [Q_0, ..., Q_d]; sigmas[i-1]: the min(k_i, k_{i-1}) signed singular values of W_i.

    Parameters
    ----------
    bases : list of arrays
        Orthogonal [Q_0, ..., Q_d].
    sigmas : list of arrays
        sigmas[i-1]: min(k_i, k_{i-1}) signed singular values of W_i.

    Returns
    -------
    weights : list of arrays
        W_i = Q_i Sigma_i Q_{i-1}^T.

    Raises
    ------
    ValueError
        Counts that do not fit.
    """
    if len(sigmas) != len(bases) - 1:
        raise ValueError(f"need one singular-value vector per layer: {len(bases) - 1}, "
                         f"got {len(sigmas)}")
    weights = []
    for i, s in enumerate(sigmas, start=1):
        m, n = bases[i].shape[0], bases[i - 1].shape[0]
        if s.shape[-1] > min(m, n):
            raise ValueError(f"sigmas[{i - 1}] has {s.shape[-1]} values but W_{i} is "
                             f"{m} x {n}: at most {min(m, n)}")
        weights.append(bases[i] @ rect_diag(s, m, n) @ _T(bases[i - 1]))
    return weights


# ------------------------------------------------------- theory (Section 4) --
@dataclasses.dataclass
class Certificate:
    """Result of :func:`invariance_certificate` (Theorems 1, 4, Lemma 2), truthy when ``ok``:
    U^T Y X^T V, V^T X X^T V block diagonal with top-left blocks diag(lam_prime), diag(lam);
    ``residual``: the largest relative off-block entry; ``violation``: 0 when ok."""
    ok: bool
    r: int
    U: np.ndarray = dataclasses.field(default=None, repr=False)
    V: np.ndarray = dataclasses.field(default=None, repr=False)
    lam: np.ndarray = dataclasses.field(default=None, repr=False)
    lam_prime: np.ndarray = dataclasses.field(default=None, repr=False)
    residual: float = math.inf
    violation: float = 0.0

    def __post_init__(self):
        self.ok, self.residual = bool(self.ok), float(self.residual)
        self.violation = float(self.violation)

    def __bool__(self):
        return bool(self.ok)


def _eigenspaces(S, tol):
    """Orthonormal bases of symmetric S's eigenspaces, eigenvalues decreasing, equal to tol."""
    w, E = np.linalg.eigh(S)
    scale = max(abs(w).max(), np.finfo(float).tiny)
    return [E[:, ::-1][:, idx] for idx in _clusters(w[::-1], tol, scale)]


def _joint_eigenvectors(S, G, tol):
    """Unit vectors v with S v = lambda v and G v = mu v (S, G symmetric): in each
    eigenspace K of S, {v in K : G v in K} kept until G-invariant, then diagonalised."""
    scale_g = max(np.linalg.norm(G, 2), np.finfo(float).tiny)
    found = []
    for K in _eigenspaces(S, tol):
        while K.shape[1]:
            GK = G @ K
            outside = GK - K @ (K.T @ GK)
            if np.linalg.norm(outside, 2) <= tol * scale_g:
                break
            _, s, Vt = np.linalg.svd(outside, full_matrices=True)
            N = Vt[int((s > tol * scale_g).sum()):].T              # the null space of outside
            if N.shape[1] == K.shape[1]:
                break
            K = K @ N
        if K.shape[1]:
            found.extend((K @ np.linalg.eigh(K.T @ G @ K)[1]).T)
    return np.array(found).reshape(-1, S.shape[0]).T


def invariance_certificate(X, Y, widths, tol=1e-9):
    """Decide Theorem 4's data condition (Theorem 1 when all widths are equal): orthonormal
    U (kd x kd), V (k0 x k0) with U^T Y X^T V = [[Lambda', 0], [0, A_1]] and
    V^T X X^T V = [[Lambda, 0], [0, A_2]], Lambda, Lambda' diagonal r x r, r = min(widths)
    (A_1 is (kd - r) x (k0 - r); the paper prints the transpose).  Equivalently r
    orthonormal common eigenvectors v_j of X X^T and (Y X^T)^T Y X^T, u_j = Y X^T v_j /
    lambda'_j, at most kd - rank(Y X^T) of the lambda'_j zero; chosen by decreasing
    lambda'^2 / lambda, zeros last.  Repeated eigenvalues, rank-deficient X, n < k0 allowed.

    Parameters
    ----------
    X
        As in :func:`forward`.
    Y : array
        kd x n targets.
    widths : sequence of int
        [k_0, ..., k_d].
    tol : float
        Relative tolerance.

    Returns
    -------
    Certificate
        Truthy when the condition holds: U, V, lam, lam_prime, residual; else the violation.

    Raises
    ------
    ValueError
        Shapes that do not fit, or NaN in the data.
    """
    X, Y = to_numpy(X).astype(np.float64), to_numpy(Y).astype(np.float64)
    check_finite("X", X)
    check_finite("Y", Y)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X (k0 x n) and Y (kd x n) need the same n; got {_shape(X)} and "
                         f"{_shape(Y)}")
    if widths[0] != X.shape[0] or widths[-1] != Y.shape[0]:
        raise ValueError(f"widths {list(widths)} must start with k0 = {X.shape[0]} and end "
                         f"with kd = {Y.shape[0]}")
    k0, kd, r = X.shape[0], Y.shape[0], int(min(widths))
    S, C = X @ X.T, Y @ X.T
    G = C.T @ C
    J = _joint_eigenvectors(S, G, tol)
    Cn = max(np.linalg.norm(C, 2), np.finfo(float).tiny)
    images = C @ J
    lam_p = np.linalg.norm(images, axis=0)
    lam = np.einsum("ij,ij->j", J, S @ J)
    zero = lam_p <= tol * Cn
    gain = np.where(zero, -1.0, lam_p ** 2 / np.maximum(lam, np.finfo(float).tiny))
    order = np.argsort(-gain, kind="stable")
    room = kd - int((np.linalg.svd(C, compute_uv=False) > tol * Cn).sum())
    chosen = [j for j in order if not zero[j]]
    chosen += [j for j in order if zero[j]][:room]
    if len(chosen) < r:
        return Certificate(False, r, violation=_condition_violation(S, G, r, room, tol))
    chosen = chosen[:r]
    Vr = J[:, chosen]
    Ur = np.where(zero[chosen], 0.0, images[:, chosen] / np.where(zero[chosen], 1.0, lam_p[chosen]))
    free = _orth_complement(Ur[:, ~zero[chosen]], kd)
    Ur[:, zero[chosen]] = free[:, :int(zero[chosen].sum())]
    U = np.concatenate([Ur, _orth_complement(Ur, kd)], axis=1)
    V = np.concatenate([Vr, _orth_complement(Vr, k0)], axis=1)
    A, B = U.T @ C @ V, V.T @ S @ V
    residual = max(_off_block(A, r) / Cn, _off_block(B, r) / max(np.linalg.norm(S, 2), 1e-300))
    ok = residual <= 1e3 * tol
    return Certificate(ok, r, U, V, np.diagonal(B)[:r].copy(), np.diagonal(A)[:r].copy(),
                       residual, 0.0 if ok else residual)


def _off_block(M, r):
    """Largest |entry| of M outside diag(top-left r x r) and the bottom-right block."""
    M = np.abs(M) * (1.0 - np.eye(*M.shape))
    M[r:, r:] = 0.0
    return float(M.max()) if M.size else 0.0


def _condition_violation(S, G, r, room, tol):
    """Theorem 4's condition, how far it fails: how far S = X X^T and G = (YX^T)^T YX^T are from
    sharing r eigenvectors, at most ``room``
    of them (kd - rank(Y X^T)) with a zero image: the r-th smallest ||G v - (v^T G v) v|| /
    ||G|| (at most 1; 1 for each one missing), v eigenvectors of S diagonalising G on S's
    eigenspaces, those beyond room of the ones with ||Y X^T v|| <= tol ||Y X^T|| left out."""
    V = np.concatenate([K @ np.linalg.eigh(K.T @ G @ K)[1] for K in _eigenspaces(S, 1e-9)], axis=1)
    GV, scale = G @ V, max(np.linalg.norm(G, 2), 1e-300)
    mu = np.einsum("ij,ij->j", V, GV)                      # ||Y X^T v||^2
    res = np.linalg.norm(GV - V * mu, axis=0) / scale
    zero = np.sqrt(np.maximum(mu, 0.0)) <= tol * np.sqrt(scale)
    usable = np.sort(np.concatenate([res[~zero], res[zero][:room], np.ones(r)]))
    return float(usable[r - 1])


def sensing_certificate(Ms, tol=1e-9):
    """Matrix sensing (Section 4.2): orthonormal U, V with every U^T M_i V diagonal, Ms (n, k, k),
    from the SVD of a generic combination of the M_i.  Returns (ok, U, V, residual).

    Parameters
    ----------
    Ms : array
        (n, k, k) sensing matrices.
    tol : float
        Relative tolerance.

    Returns
    -------
    ok, U, V, residual
        Whether one U, V diagonalise every M_i.
    """
    Ms = to_numpy(Ms).astype(np.float64)
    c = np.random.default_rng(12345).standard_normal(Ms.shape[0])
    U, _, Vt = np.linalg.svd(np.tensordot(c, Ms, axes=1))
    off = (U.T @ Ms @ Vt.T) * (1.0 - np.eye(*Ms.shape[1:]))
    residual = float(np.abs(off).max() / max(np.abs(Ms).max(), 1e-300))
    return residual <= 1e3 * tol, U, Vt.T, residual


def aligned_init(U, V, widths, sigmas=None, scale=1.0, seed=0, balanced=False,
                 chain=None, dtype=np.float64):
    """Aligned initialisation of Lemma 2 / Theorem 1: W_1 = Q_1 D_1 V^T, W_i = Q_i D_i Q_{i-1}^T,
    W_d = U D_d Q_{d-1}^T, with Q_i = I unless ``chain`` gives [Q_1, ..., Q_{d-1}].  D_i
    rectangular diagonal: ``sigmas`` (d vectors) or draws from U(0, scale) with ``seed``
    (the authors' choice); ``balanced``: the first min(widths) values of every layer the
    d-th root of their product, the rest zero (W_{i+1}^T W_{i+1} = W_i W_i^T).

    Parameters
    ----------
    U, V : arrays
        Orthogonal kd x kd and k0 x k0 (e.g. from the SVDs of Y and X).
    widths : sequence of int
        [k_0, ..., k_d].
    sigmas : list of arrays, optional
        The diagonals D_i; else U(0, scale) draws with seed.
    scale, seed : float, int
        For the draws.
    balanced : bool
        Balanced layers (W_{i+1}^T W_{i+1} = W_i W_i^T).
    chain : list of arrays, optional
        [Q_1, ..., Q_{d-1}] (default identities).
    dtype : type
        Of the weights.

    Returns
    -------
    weights : list of arrays
        Aligned (Definition 2) by construction.

    Raises
    ------
    ValueError
        U or V of the wrong shape or not orthogonal.
    """
    xp = array_module(U, V)
    widths = [int(k) for k in widths]
    d = len(widths) - 1
    if U.shape != (widths[-1],) * 2 or V.shape != (widths[0],) * 2:
        raise ValueError(f"U must be kd x kd = {widths[-1]} x {widths[-1]} and V k0 x k0 = "
                         f"{widths[0]} x {widths[0]}; got {_shape(U)} and {_shape(V)}")
    for name, Q in [("U", U), ("V", V)] + [(f"chain[{i}]", Q) for i, Q in enumerate(chain or [])]:
        Q = to_numpy(Q).astype(np.float64)
        if not np.all(np.isfinite(Q)) or Q.ndim != 2 or Q.shape[0] != Q.shape[1] or \
                np.abs(Q.T @ Q - np.eye(Q.shape[1])).max() > 1e-6:
            raise ValueError(f"{name} must be an orthogonal matrix (Q^T Q = I), e.g. the left "
                             f"singular vectors of Y or the right ones of X from np.linalg.svd")
    if sigmas is None:
        rng = np.random.default_rng(seed)
        sigmas = [rng.uniform(0, scale, min(widths[i], widths[i + 1])) for i in range(d)]
    sigmas = [np.asarray(to_numpy(s), dtype=np.float64) for s in sigmas]
    if balanced:
        r = min(widths)
        common = np.abs(np.prod([s[:r] for s in sigmas], axis=0)) ** (1.0 / d)
        sigmas = [np.concatenate([common, np.zeros(s.size - r)]) for s in sigmas]
    inner = chain if chain is not None else [xp.eye(k, dtype=dtype) for k in widths[1:-1]]
    bases = [xp.asarray(Q, dtype=dtype) for Q in [V, *inner, U]]
    return aligned_network(bases, [xp.asarray(s, dtype=dtype) for s in sigmas])


def _others_product(sig):
    """prod_{j != i} sig[..., j, :] for each i, by prefix and suffix products (no division)."""
    xp = array_module(sig)
    ones = xp.ones_like(sig[..., :1, :])
    prefix = xp.cumprod(xp.concatenate([ones, sig[..., :-1, :]], axis=-2), axis=-2)
    suffix = xp.cumprod(xp.concatenate([ones, sig[..., :0:-1, :]], axis=-2), axis=-2)[..., ::-1, :]
    return prefix * suffix


def singular_value_dynamics(sigmas0, lam, lam_prime, lr, n, steps, kind="mse", kd=None,
                            record_every=1):
    """Corollary 1: GD on the top-r singular values of a strongly aligned network,
    sigma_i(t+1) = sigma_i(t) + (lr/n) prod_{j != i} sigma_j(t) (lam' - lam prod_j sigma_j(t)),
    Appendix B's product over j != i (Eq. (6) as printed multiplies over all j: the
    derivative with respect to sigma_i removes sigma_i).  sigmas0: (..., d, r), leading
    axes independent runs; lam, lam_prime: (r,).  kind="mse_mean" scales by 2/(kd n).
    Returns the trajectory, (steps // record_every + 1, ..., d, r).

    Parameters
    ----------
    sigmas0 : array
        (..., d, r) initial singular values (leading axes: independent runs).
    lam, lam_prime : arrays
        (r,) the certificate's Lambda and Lambda'.
    lr : float
        The learning rate.
    n : int
        The number of examples.
    steps : int
        How many steps.
    kind : {"mse", "mse_mean"}
        The loss scale.
    kd : int
        Outputs (for mse_mean).
    record_every : int
        Steps between recorded rows.

    Returns
    -------
    array
        The trajectory, (steps // record_every + 1, ..., d, r).
    """
    xp = array_module(sigmas0)
    coef = lr / n if kind == "mse" else 2.0 * lr / (kd * n)
    sig = xp.array(sigmas0, dtype=xp.float64)
    lam, lam_prime = xp.asarray(lam, dtype=sig.dtype), xp.asarray(lam_prime, dtype=sig.dtype)
    out = [sig.copy()]
    for t in range(1, steps + 1):
        others = _others_product(sig)
        total = others[..., :1, :] * sig[..., :1, :]
        sig = sig + coef * others * (lam_prime - lam * total)
        if t % record_every == 0:
            out.append(sig.copy())
    return xp.stack(out)


def prop2_learning_rate(sigmas0, lam, lam_prime, n):
    """Proposition 2's largest learning rate as its proof (Appendix C) needs it: gamma <=
    (n ln 2 / d) min_k [min_i sigma_k(W_i(0))^2 lam_k / lam'_k^2], min over layers i too (the
    statement leaves i free), lam'_k = 0 not counted.  sigmas0: (d, r) > 0; lam, lam_prime: (r,).

    Parameters
    ----------
    sigmas0 : array
        (d, r) positive initial singular values.
    lam, lam_prime : arrays
        (r,).
    n : int
        The number of examples.

    Returns
    -------
    float
        The largest learning rate Proposition 2's proof allows.
    """
    sig = np.asarray(to_numpy(sigmas0), dtype=np.float64)
    lam, lam_prime = np.asarray(lam, dtype=np.float64), np.asarray(lam_prime, dtype=np.float64)
    live = lam_prime != 0
    return float(n * math.log(2) / sig.shape[0] *
                 np.min(sig.min(axis=0)[live] ** 2 * lam[live] / lam_prime[live] ** 2))


def balanced_factorization(P, hidden=None, W=None):
    """Proposition 3: aligned, balanced W_1 = W Sigma^{1/2} V^T, W_2 = U Sigma^{1/2} W^T (W
    orthonormal, default I), W_2 W_1 = P = U Sigma V^T, least ||W_1||_F^2 + ||W_2||_F^2 =
    2 ||P||_*.  (Appendix G prints W_1 = W Sigma^{1/2} U^T, W_2 = U Sigma^{1/2} V^T: not P.)

    Parameters
    ----------
    P : array
        m x n.
    hidden : int, optional
        The hidden width (at least rank(P); default min(m, n)).
    W : array, optional
        An orthogonal hidden x hidden matrix (default I).

    Returns
    -------
    W1, W2 : arrays
        Aligned, balanced, W2 W1 = P, of least norm.

    Raises
    ------
    ValueError
        hidden below rank(P).
    """
    xp = array_module(P)
    m, n = P.shape
    hidden = min(m, n) if hidden is None else hidden
    if hidden < int(np.linalg.matrix_rank(to_numpy(P))):
        raise ValueError(f"hidden width {hidden} is below rank(P)")
    U, s, Vt = xp.linalg.svd(P, full_matrices=True)
    root = xp.sqrt(s[:min(hidden, s.size)])
    W = xp.eye(hidden, dtype=P.dtype) if W is None else W
    return W @ rect_diag(root, hidden, n) @ Vt, U @ rect_diag(root, m, hidden) @ _T(W)


def proposition4(weights, X, Y, tol=1e-8):
    """Proposition 4: for an aligned network with Y = f(X) (n >= k0, X full rank), W_d^T
    aligns with M = Y X^T (X X^T)^{-1}, which aligns with W_1^T ("A aligns with B": [B, A]
    is aligned).  Returns (test of [M, W_d^T], test of [W_1^T, M]).

    Parameters
    ----------
    weights, X
        As in :func:`forward`, X with n >= k0 and full rank.
    Y : array
        f(X).
    tol : float
        For is_aligned.

    Returns
    -------
    AlignmentTest, AlignmentTest
        [M, W_d^T] and [W_1^T, M] with M = Y X^T (X X^T)^{-1}.

    Raises
    ------
    ValueError
        n < k0 or X rank deficient.
    """
    X, Y = to_numpy(X).astype(np.float64), to_numpy(Y).astype(np.float64)
    if X.shape[1] < X.shape[0] or np.linalg.matrix_rank(X) < X.shape[0]:
        raise ValueError(f"Proposition 4 needs n >= k0 and X of full rank; X is {_shape(X)} "
                         f"of rank {np.linalg.matrix_rank(X)}")
    M = Y @ X.T @ np.linalg.inv(X @ X.T)
    return (is_aligned([M, to_numpy(weights[-1]).T], tol),
            is_aligned([to_numpy(weights[0]).T, M], tol))
