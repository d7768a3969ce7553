"""Deep linear networks and their alignment: the reference implementation of "On Alignment in
Deep Linear Neural Networks" (Radhakrishnan, Nichani, Bernstein, Uhler), in the paper's order.

One network at a time; NumPy arrays, or CuPy arrays on a GPU.  Copy this file alone: it needs
NumPy only and imports no other module of the project.  align_fast.py (copied with this file)
computes the same faster and trains batches of networks; structured.py (copied with this file)
constrains layers to a subspace (Section 5).

Parameters used throughout, in the paper's notation:

weights : list of arrays
    [W_1, ..., W_d], W_i of shape (k_i, k_{i-1}): f(X) = W_d ... W_1 X (Eq. (1)).
X : array
    k0 x n inputs, one example per column.
Y : array
    kd x n targets (for "ce" also n integer labels; for "logistic" and "exp" +-1, kd = 1).
kind : {"mse", "mse_mean", "ce", "logistic", "exp"}
    The loss: Eq. (2)'s 1/(2n) sum of squares, the mean over the kd n entries (the authors'
    code), cross-entropy over the kd rows, logistic, exponential (mean over the n examples).
lr : float
    The learning rate gamma of gradient descent, W_i <- W_i - lr dL/dW_i (Eq. (8)).
rtol : float
    Section 6's measures: singular values within rtol sigma_max of each other are one
    cluster (their vectors are defined up to a rotation); below rtol sigma_max, unused.

Arrays may be lists, integer or boolean arrays or anything with ``__array__`` (a tensor, a
data frame): they are converted to float64 (float32 and float64 arrays are used as they are,
CuPy arrays stay on the GPU).  Bad input (a wrong shape, NaN, float16 or complex data, an
unknown option) raises ValueError naming the argument and what is expected.

``__all__`` is the API.  The other names without an underscore (``as_array``,
``check_number``, ``activations``, ``gram_commutators``, ...) are the checks and steps that
align_fast.py and structured.py share with this file.
"""
import collections
import dataclasses
import functools
import json
import math
import time

import numpy as np

__all__ = [
    # the network, its loss and gradients (Eq. (1), (2), (8)) and gradient descent
    "forward", "loss", "gradients", "layer_gradients", "train", "gradient_descent", "History",
    "DivergenceError", "Interrupted", "LOSSES",
    # Definitions 1 and 2: usSVD, aligned networks and the exact test
    "ussvd", "ussvd_matrix", "ussvd_reorder", "rect_diag", "aligned_network", "is_aligned",
    "AlignmentTest",
    # Sections 4.1-4.4: Theorems 1 and 4, Lemma 2, Corollary 1, Propositions 2-4
    "invariance_certificate", "Certificate", "sensing_certificate", "aligned_init",
    "singular_value_dynamics", "prop2_learning_rate", "balanced_factorization", "proposition4",
    # Section 6: alignment and invariance
    "alignment", "invariance", "tracker", "MEASURE_KEYS"]

LOSSES = ("mse", "mse_mean", "ce", "logistic", "exp")
HOW = ("paired", "matched")
MEASURE_KEYS = ("alignment_paired", "alignment_matched", "invariance_paired", "invariance_matched")


class DivergenceError(FloatingPointError):
    """The loss of gradient descent stopped being finite; ``history`` holds the run so far."""

    def __init__(self, message, history):
        super().__init__(message)
        self.history = history


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: ``weights`` (the parameters) and ``history`` at the last whole
    step, for the caller to keep; uncaught, it stops the program like any Ctrl-C."""

    def __init__(self, weights, history):
        super().__init__(f"training interrupted at step {history.final_step}")
        self.weights, self.history = weights, history


# ------------------------------------------------------ arrays at the boundary --
def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays live in (CuPy is imported only when one is given)."""
    if any(type(a).__module__.startswith("cupy") for a in arrays):
        import cupy
        return cupy
    return np


def to_numpy(a):
    """A NumPy array from a NumPy or CuPy array (copied from the GPU)."""
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def as_array(name, a):
    """``a`` as a float32 or float64 array of NumPy or CuPy, converted as the module docstring
    says; ValueError naming ``name`` for float16, complex, object or string data and ragged
    lists."""
    xp = array_module(a)
    try:
        a = xp.asarray(a)
    except (ValueError, TypeError) as exc:                          # a ragged list
        raise ValueError(f"{name} must be an array of numbers ({exc})") from None
    if a.dtype.kind in "biu":
        return a.astype(xp.float64)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must hold real numbers as float32 or float64, got {a.dtype}")
    return a


def _shape(a):
    return "x".join(str(s) for s in np.shape(a))


def check_finite(name, a):
    """Raise ValueError if ``a`` holds NaN or inf, naming the likely fix."""
    if not bool(array_module(a).isfinite(a).all()):
        fix = "a diverged run? lower the learning rate" if name[0] in "Wp" else "clean the data"
        raise ValueError(f"{name} contains NaN or inf ({fix})")


def check_number(name, value, least=0, below=math.inf, integer=False):
    """Raise ValueError unless ``value`` is a number (an integer if ``integer``) with
    least <= value < below."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not least <= value < below:
        what = f"{'an integer' if integer else 'a number'} >= {least}"
        raise ValueError(f"{name} must be {what}{f' and < {below:g}' * (below < math.inf)}, "
                         f"got {value!r}")


def as_weights(weights):
    """The layers converted and checked: a non-empty list of finite matrices that chain."""
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty list [W_1, ..., W_d] of arrays, got "
                         f"{type(weights).__name__}")
    weights = [as_array(f"W_{i}", W) for i, W in enumerate(weights, 1)]
    for i, W in enumerate(weights, 1):
        if W.ndim != 2:
            raise ValueError(f"W_{i} must be a k_{i} x k_{i - 1} matrix, got shape {_shape(W)} "
                             f"(align.py takes one network; align_fast trains batches)")
        if i > 1 and W.shape[1] != weights[i - 2].shape[0]:
            raise ValueError(f"W_{i} is {_shape(W)} but W_{i - 1} is {_shape(weights[i - 2])}: "
                             f"W_{i} needs {weights[i - 2].shape[0]} columns")
        check_finite(f"W_{i}", W)
    return weights


def as_inputs(weights, X):
    """X converted and checked against the (checked) weights: finite, k0 x n, n >= 1."""
    X, k0 = as_array("X", X), weights[0].shape[-1]
    if X.ndim != 2 or X.shape[0] != k0 or X.shape[1] == 0:
        raise ValueError(f"X must be k0 x n = {k0} x n with n >= 1 (one example per column), "
                         f"got shape {_shape(X)}")
    check_finite("X", X)
    return X


def as_targets(Y, kind, kd, n):
    """The targets as a kd x n float array for the loss ``kind`` (labels one-hot), checked."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSSES}")
    if kd == 0:
        raise ValueError("the network has no outputs (W_d has 0 rows): there is no loss")
    xp = array_module(Y)
    if kind == "ce" and xp.ndim(Y) == 1 and xp.asarray(Y).dtype.kind in "iu":     # labels
        Y = xp.asarray(Y)
        if Y.shape[0] != n or int(Y.min()) < 0 or int(Y.max()) >= kd:
            raise ValueError(f"Y must be n = {n} integer class labels that lie in 0..{kd - 1}, "
                             f"got {Y.shape[0]} in {Y.min()}..{Y.max()}")
        return (xp.arange(kd)[:, None] == Y[None, :]).astype(xp.float64)
    Y = as_array("Y", Y)
    if Y.shape != (kd, n):
        raise ValueError(f"Y must be kd x n = {kd} x {n}, got shape {_shape(Y)}")
    check_finite("Y", Y)
    if kind == "ce" and (bool((Y < 0).any()) or not bool(xp.allclose(Y.sum(0), 1.0))):
        raise ValueError("cross-entropy targets must be columns of probabilities (one-hot) "
                         "summing to 1, or n integer labels")
    if kind in ("logistic", "exp") and (kd != 1 or not bool((xp.abs(Y) == 1).all())):
        raise ValueError(f"the {kind} loss needs kd = 1 output and labels -1 or +1")
    return Y


# ---------------------------------------------- Eq. (1), (2), (8): the network --
def forward(weights, X):
    """f(X) = W_d ... W_1 X, Eq. (1): kd x n."""
    weights = as_weights(weights)
    return activations(weights, as_inputs(weights, X))[-1]


def activations(weights, X):
    """[X, W_1 X, W_2 W_1 X, ..., f(X)]: Eq. (1) layer by layer (inputs already checked, as
    :func:`forward` checks them)."""
    acts = [X]
    for W in weights:
        acts.append(W @ acts[-1])
    return acts


def loss_and_output_gradient(F, Y, kind):
    """(L, dL/dF) at the outputs F = f(X) (kd x n) for prepared targets Y."""
    kd, n = F.shape[-2:]
    xp = array_module(F)
    if kind in ("mse", "mse_mean"):         # Eq. (2): 1/(2n) sum_i ||y_i - f(x_i)||^2, or the mean
        R = F - Y                           # over the kd n entries (PyTorch's MSELoss)
        if kind == "mse":
            return xp.vdot(R, R) / (2 * n), R / n
        return xp.vdot(R, R) / (kd * n), R * (2.0 / (kd * n))
    if kind == "ce":                        # softmax over the kd rows, mean over the n columns
        Z = F - F.max(axis=-2, keepdims=True)
        logp = Z - xp.log(xp.exp(Z).sum(axis=-2, keepdims=True))
        return -(Y * logp).sum((-2, -1)) / n, (xp.exp(logp) - Y) / n
    margin = Y * F
    if kind == "logistic":                  # mean log(1 + exp(-y f))
        return (xp.logaddexp(0, -margin).sum((-2, -1)) / n,
                -Y * xp.exp(-xp.logaddexp(0, margin)) / n)
    e = xp.exp(-margin)                     # "exp": mean exp(-y f)
    return e.sum((-2, -1)) / n, -Y * e / n


def backward(weights, acts, delta):
    """Eq. (8) layer by layer: dL/dW_i = delta_i a_{i-1}^T, with delta_d = dL/dF and
    delta_{i-1} = W_i^T delta_i (acts: the forward pass)."""
    grads = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = delta @ acts[i].T
        if i:
            delta = weights[i].T @ delta
    return grads


def loss_and_gradients(weights, X, Y, kind):
    """(L, [dL/dW_1, ..., dL/dW_d]) for checked inputs and prepared targets."""
    acts = activations(weights, X)                           # Eq. (1)
    L, delta = loss_and_output_gradient(acts[-1], Y, kind)   # L and dL/dF
    return L, backward(weights, acts, delta)                 # Eq. (8)


def as_network(weights, X, Y, kind):
    """(weights, X, Y) converted and checked, the targets prepared for ``kind``."""
    weights = as_weights(weights)
    X = as_inputs(weights, X)
    return weights, X, as_targets(Y, kind, weights[-1].shape[0], X.shape[1])


def loss(weights, X, Y, kind="mse"):
    """The training loss of ``kind`` (Eq. (2) for "mse")."""
    weights, X, Y = as_network(weights, X, Y, kind)
    return loss_and_output_gradient(activations(weights, X)[-1], Y, kind)[0]


def gradients(weights, X, Y, kind="mse"):
    """[dL/dW_1, ..., dL/dW_d], written by hand (Eq. (8) for the squared loss)."""
    return loss_and_gradients(*as_network(weights, X, Y, kind), kind)[1]


def layer_gradients(weights, X, dF):
    """[dL/dW_1, ..., dL/dW_d] from dL/dF (kd x n) at F = f(X), by Eq. (8); with X = I, the
    gradients of any loss of the product W_d ... W_1 (matrix sensing, Section 4.2)."""
    weights = as_weights(weights)
    X, dF = as_inputs(weights, X), as_array("dF", dF)
    if dF.shape != (weights[-1].shape[0], X.shape[1]):
        raise ValueError(f"dF must be kd x n = {weights[-1].shape[0]} x {X.shape[1]}, got "
                         f"shape {_shape(dF)}")
    return backward(weights, activations(weights, X), dF)


# ---------------------------------------------------------- gradient descent --
@dataclasses.dataclass
class History:
    """What a training run recorded: the loss at ``steps`` (before that step's update), the
    measures at ``measure_steps``, why and where it stopped, its duration in seconds."""
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
        """Plain JSON types: floats, and lists of them."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(fields, default=lambda a: to_numpy(a).tolist()))


def as_measures(measures):
    """{name: m(params, params_0)} from None, such a dict, or one m (named "measure")."""
    if callable(measures):
        return {"measure": measures}
    if measures is None or isinstance(measures, dict):
        return measures or {}
    raise ValueError(f"measures must be a dict {{name: m(params, params_0)}} or one such "
                     f"function (e.g. align.tracker(weights)), got {type(measures).__name__}")


def check_schedule(lr, max_steps, record_every, measure_every, tol, callback=None):
    """Raise ValueError (TypeError for callback) unless the schedule of
    :func:`gradient_descent` is valid."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function(step, loss, history) or None, got "
                        f"{type(callback).__name__}")
    check_number("lr", lr)
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    check_number("tol", tol)
    check_number("max_steps", max_steps, integer=True)
    check_number("record_every", record_every, least=1, integer=True)
    check_number("measure_every", measure_every, least=1, integer=True)


def as_params(params):
    """gradient_descent's parameters, a list of arrays, each converted by :func:`as_array`."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of arrays, got {type(params).__name__}")
    return [as_array(f"params[{i}]", p) for i, p in enumerate(params)]


def check_gradients(grads, params):
    """Raise ValueError unless loss_and_grads gave one gradient per parameter."""
    if len(grads) != len(params):
        raise ValueError(f"loss_and_grads returned {len(grads)} gradients for {len(params)} "
                         f"parameters")


def measure_into(history, measures, params, params0, step):
    """Take every measure of ``params``, then record them all at ``step`` (nothing partial)."""
    values = {}
    for name, fn in measures.items():
        value = fn(params, params0)
        values.update(value if isinstance(value, dict) else {name: value})
    history.measure_steps.append(step)
    for key, v in values.items():
        history.measurements.setdefault(key, []).append(_plain(v))


def _plain(x):
    """A float, or nested lists of floats, from a number or an array of either module."""
    return float(x) if isinstance(x, (int, float, np.number)) else to_numpy(x).tolist()


def gradient_descent(params, loss_and_grads, lr=1e-2, max_steps=10_000, tol=1e-4,
                     record_every=1, measure_every=100, measures=None, callback=None):
    """Gradient descent p <- p - lr g (Eq. (8)'s update) on any ``loss_and_grads(params)``.

    Parameters
    ----------
    params : list of arrays
        The start (copied: the arrays given are not changed; lists and other arrays are
        converted as the module docstring says).
    loss_and_grads : callable
        params -> (the loss, a number; [dL/dp for each p]).
    lr, max_steps, tol, record_every, measure_every, measures, callback
        As in :func:`train`.

    Returns
    -------
    params, History

    Raises
    ------
    DivergenceError
        The loss stopped being finite (``.history``: the run so far).
    Interrupted
        Ctrl-C: ``.weights`` and ``.history`` at the last whole step (measured there).
    """
    check_schedule(lr, max_steps, record_every, measure_every, tol, callback)
    params = as_params(params)
    measures, params0 = as_measures(measures), [p.copy() for p in params]
    hist, start, step, ps = History(), time.perf_counter(), 0, [p.copy() for p in params]
    try:
        with np.errstate(over="ignore", invalid="ignore"):   # divergence is reported below
            while True:
                if step % measure_every == 0:
                    measure_into(hist, measures, ps, params0, step)
                L, grads = loss_and_grads(ps)
                check_gradients(grads, ps)
                if step % record_every == 0 or step == max_steps:
                    if not math.isfinite(L):
                        hist.stop_reason, hist.final_step = "diverged", step
                        hist.wall_time = time.perf_counter() - start
                        raise DivergenceError(f"loss became {L} at step {step} with lr = {lr:g}; "
                                              f"try a smaller learning rate (e.g. {lr / 10:g})",
                                              hist)
                    hist.steps.append(step)
                    hist.losses.append(float(L))
                    if callback:
                        callback(step, float(L), hist)
                    if L < tol:
                        hist.stop_reason = "tol"
                        break
                if step >= max_steps:
                    hist.stop_reason = "max_steps"
                    break
                ps, step = [p - lr * g for p, g in zip(ps, grads)], step + 1   # a whole step
    except KeyboardInterrupt:
        hist.stop_reason = "interrupted"
    hist.final_step = step
    try:                                        # the final measurement (a second Ctrl-C: none)
        if hist.measure_steps[-1:] != [step]:
            measure_into(hist, measures, ps, params0, step)
    except KeyboardInterrupt:
        hist.stop_reason = "interrupted"
    hist.wall_time = time.perf_counter() - start
    if hist.stop_reason == "interrupted":
        raise Interrupted(ps, hist)
    return ps, hist


def train(weights, X, Y, kind="mse", lr=1e-2, max_steps=10_000, tol=1e-4, record_every=1,
          measure_every=100, measures=None, callback=None):
    """Full-batch gradient descent W_i <- W_i - lr dL/dW_i with Eq. (8)'s gradients.

    Parameters
    ----------
    weights, X, Y, kind, lr
        See the module docstring; ``weights`` is the start, not changed (a list or another
        array that is converted is copied as float64).
    max_steps : int
        The step budget.
    tol : float
        Stop at the first recorded step whose loss is below tol.
    record_every, measure_every : int
        Steps between recorded losses, and between measurements.
    measures : dict or callable, optional
        {name: m(weights, weights_0)}, or one m such as ``tracker(weights)`` (alignment and
        invariance), taken at step 0, every measure_every steps and at the end.
    callback : callable, optional
        callback(step, loss, history) at each recorded step.

    Returns
    -------
    weights, History
        The trained network, and its losses, measurements and stop.

    Raises
    ------
    DivergenceError, Interrupted
        As in :func:`gradient_descent`.
    """
    weights, X, Y = as_network(weights, X, Y, kind)
    Y = Y.astype(weights[0].dtype)
    return gradient_descent(weights, lambda ws: loss_and_gradients(ws, X, Y, kind), lr, max_steps,
                            tol, record_every, measure_every, measures, callback)


# ------------------------------------------------------- Definition 1: usSVD --
def ussvd(A):
    """A usSVD (Definition 1) A = U Sigma V^T: U (m x m), s (min(m, n)), V (n x n)."""
    A = as_array("A", A)
    if A.ndim != 2:
        raise ValueError(f"A must be a matrix, got shape {_shape(A)}")
    check_finite("A", A)
    U, s, Vt = array_module(A).linalg.svd(A, full_matrices=True)
    return U, s, Vt.T


def as_ussvd(U, s, V):
    """(U, s, V) converted and checked: U m x m, V n x n, s at most min(m, n) values."""
    U, s, V = as_array("U", U), as_array("s", s), as_array("V", V)
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != U.shape[1] or V.shape[0] != V.shape[1]:
        raise ValueError(f"U and V must be square (m x m and n x n), got {_shape(U)} and {_shape(V)}")
    if s.ndim != 1 or s.shape[0] > min(U.shape[0], V.shape[0]):
        raise ValueError(f"s must be a vector of at most min(m, n) = {min(U.shape[0], V.shape[0])} "
                         f"singular values, got shape {_shape(s)}")
    return U, s, V


def ussvd_matrix(U, s, V):
    """U Sigma V^T for a usSVD (U, s, V) of Definition 1, Sigma rectangular diagonal with s."""
    U, s, V = as_ussvd(U, s, V)
    r = s.shape[0]
    return (U[:, :r] * s) @ V[:, :r].T


def ussvd_reorder(U, s, V, perm, signs):
    """Another usSVD of the same matrix (Definition 1 leaves order and signs free): the
    triples reordered by ``perm``, then u_j and sigma_j multiplied by signs[j] = +-1."""
    U, s, V = as_ussvd(U, s, V)
    r = s.shape[0]
    if sorted(np.asarray(perm).tolist()) != list(range(r)):
        raise ValueError(f"perm must be a permutation of 0..{r - 1}, got {perm!r}")
    if np.shape(signs) != (r,) or not bool(np.all(np.abs(np.asarray(signs)) == 1)):
        raise ValueError(f"signs must be {r} values +1 or -1, got {signs!r}")
    U, V = U.copy(), V.copy()
    U[:, :r], V[:, :r] = U[:, perm] * signs, V[:, perm]
    return U, s[perm] * signs, V


# ---------------------------------------------- Definition 2: aligned networks --
def rect_diag(s, m, n):
    """The m x n rectangular diagonal matrix with diagonal s (Sigma_i of Eq. (3))."""
    s = as_array("s", s)
    check_number("m", m, integer=True)
    check_number("n", n, integer=True)
    if s.ndim != 1 or s.shape[0] > min(m, n):
        raise ValueError(f"s must be a vector of at most min(m, n) = {min(m, n)} values, got "
                         f"shape {_shape(s)}")
    xp = array_module(s)
    S = xp.zeros((m, n), dtype=s.dtype)
    S[xp.arange(s.shape[0]), xp.arange(s.shape[0])] = s
    return S


def aligned_network(bases, sigmas):
    """W_i = Q_i Sigma_i Q_{i-1}^T, aligned by construction (Definition 2), for orthogonal
    ``bases`` [Q_0, ..., Q_d] and ``sigmas[i-1]``: the min(k_i, k_{i-1}) signed singular
    values of W_i (fewer: the rest zero)."""
    if len(sigmas) != len(bases) - 1:
        raise ValueError(f"need one singular-value vector per layer: {len(bases) - 1}, "
                         f"got {len(sigmas)}")
    bases = [as_array(f"bases[{i}]", Q) for i, Q in enumerate(bases)]
    sigmas = [as_array(f"sigmas[{i}]", s) for i, s in enumerate(sigmas)]
    for i, Q in enumerate(bases):
        if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
            raise ValueError(f"bases[{i}] must be a square orthogonal matrix, got shape {_shape(Q)}")
    weights = []
    for i, s in enumerate(sigmas, start=1):
        m, n = bases[i].shape[0], bases[i - 1].shape[0]
        if s.shape[0] > min(m, n):
            raise ValueError(f"sigmas[{i - 1}] has {s.shape[0]} values but W_{i} is "
                             f"{m} x {n}: at most {min(m, n)}")
        weights.append(bases[i] @ rect_diag(s, m, n) @ bases[i - 1].T)
    return weights


@dataclasses.dataclass
class AlignmentTest:
    """The answer of :func:`is_aligned` (Definition 2), truthy when aligned: ``residual``, the
    largest off-diagonal entry of U_i^T W_i V_i relative to ||W_i||_2 in the best witness found (or,
    rejected by step 1, the Gram matrices' relative commutator; inf when step 3 finds no
    positions), ``reason`` when not aligned, and ``ussvds`` [(U_i, s_i, V_i)] with
    U_i = V_{i+1}."""
    aligned: bool
    residual: float
    reason: str
    ussvds: list = dataclasses.field(default=None, repr=False)

    def __bool__(self):
        return bool(self.aligned)


def default_tol(weights):
    """is_aligned's default tolerance: 1e-8, or 1000 eps of the least precise layer's dtype
    when that is larger (1.2e-4 for float32)."""
    eps = max(np.finfo(W.dtype).eps for W in weights)
    return max(1e-8, 1000 * eps)


def is_aligned(weights, tol=None):
    """Decide Definition 2: do usSVDs W_i = U_i Sigma_i V_i^T with U_i = V_{i+1} exist?

    Any order, sign and multiplicity of singular values, any widths.  ``tol`` (default
    :func:`default_tol`: 1e-8 for float64, 1.2e-4 for float32) is relative to ||W_i||_2:
    singular values closer than tol are one cluster, smaller images are zero, and the witness
    must diagonalise every W_i to tol.  With d layers of widths k_i (k = max k_i) it costs
    O(d k^3) flops plus a search that is tiny in practice.  The steps:

    1. Gram commutators (a fast "no"; :func:`gram_commutators`).  A witness diagonalises
       W_i W_i^T and W_{i+1}^T W_{i+1} in one basis U_i = V_{i+1}, so they commute.  Their
       relative commutator is bounded by 12 (e_i + e_{i+1}) (e_i = tol sqrt(k_i k_{i-1}))
       for every network within tol of an aligned one: above the bound, no witness exists.
    2. Strings (:func:`_strings`).  In an aligned network each basis vector q of space i is
       mapped by W_{i+1} to a multiple of one basis vector of space i+1, or to 0.  So the
       network splits into strings q_a, q_{a+1}, ..., q_b with W_{i+1} q_i = s_i q_{i+1}
       (nonzero) that start in space a and end in space b (W_{b+1} q_b = 0).  They are built
       space by space: the images of the strings alive are continued (orthonormalised, the
       larger images first: they are the more accurate), and new strings start at joint
       singular vectors of the forward products W_l ... W_{i+1} on the complement of those
       images (_joint_eigenbasis: a vector that starts a string must stay a singular
       vector of every later product; values equal to tol split no further).  For an aligned
       network this recovers its decomposition up to rotations within clusters, exactly.
    3. Positions (:func:`_assign_positions`).  Sigma_i is rectangular diagonal, so a string
       keeps one position j in every space it passes, with j < k_i there, and strings in one
       space take distinct positions (commuting Gram matrices are not enough: W_1 = e_1
       (3 x 1), W_2 = e_2^T (1 x 3) has none).  Position j of space i lasts up to the last
       space R of the run with k > j (its "track end"); positions with the same R are
       interchangeable for the future.  So the state after space i is the multiset of
       (track end, string end) pairs alive, and a search over the pairings of each space's
       free tracks with its new strings (b <= R), in counts, with failed states memoised, is
       exact.  Best fit alone is not: with widths 3-2-4-3-1-5, a string over spaces 0-2 must
       take the long track (R = 5) although the track with R = 3 fits it, because space 3
       starts a string to space 4 that only the long track can take.  Hall's condition
       (no more strings end after t than tracks do) prunes pairings that cannot complete.
    4. The witness: the strings in their positions give U_i = V_{i+1}; ``residual`` is the
       largest off-diagonal entry of U_i^T W_i V_i / ||W_i||_2, and the network is aligned
       when it is at most tol.  Never raises for a well-formed network.

    Returns
    -------
    AlignmentTest
    """
    weights = as_weights(weights)
    tol = default_tol(weights) if tol is None else tol
    check_number("tol", tol, below=1)
    Ws = [to_numpy(W).astype(np.float64) for W in weights]
    scales = [float(np.abs(W).max()) if W.size else 0.0 for W in Ws]
    Ws = [W / (c or 1.0) for W, c in zip(Ws, scales)]              # (no overflow at 1e200)
    commutator, layer, impossible = gram_commutators(Ws, tol)
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


def gram_commutators(Ws, tol):
    """Step 1 of :func:`is_aligned`: (the largest relative commutator ||[A, B]||_F /
    (||A||_F ||B||_F) (in [0, sqrt 2], Bottcher and Wenzel) of A = W_i W_i^T and
    B = W_{i+1}^T W_{i+1}, its layer, whether any pair is too far from commuting for a witness
    within tol).  A witness's off-diagonal parts E_i have entries <= tol ||W_i||_2, so
    ||E_i||_F <= e_i = tol sqrt(k_i k_{i-1}); expanding [A, B] around the diagonal parts (which
    commute) bounds ||[A, B]||_F / (||A||_2 ||B||_2) by 12 (e_i + e_{i+1}) for e <= 0.1, plus
    rounding (10 eps k^2).  Frobenius norms are at least the spectral ones, so a pair already
    above the bound relative to them is decided without the spectral norms' SVDs (the fast
    "no": a random network costs its Gram products); the others are decided as the bound
    says, with the spectral norms."""
    worst, layer, impossible = 0.0, 0, False
    for i in range(len(Ws) - 1):
        A, B = Ws[i] @ Ws[i].T, Ws[i + 1].T @ Ws[i + 1]
        AB = A @ B
        commutator = float(np.linalg.norm(AB - AB.T))          # [A, B] = A B - (A B)^T
        e = [tol * math.sqrt(W.size) for W in Ws[i:i + 2]]
        bound = 12 * (e[0] + e[1]) + 10 * np.finfo(float).eps * A.shape[0] ** 2
        frobenius = float(np.linalg.norm(A) * np.linalg.norm(B))
        if frobenius == 0:
            continue
        if commutator / frobenius > worst:
            worst, layer = commutator / frobenius, i + 1
        if max(e) <= 0.1 and commutator > bound * frobenius:       # the fast "no"
            return commutator / frobenius, i + 1, True
        spectral = np.linalg.norm(Ws[i], 2) ** 2 * np.linalg.norm(Ws[i + 1], 2) ** 2
        impossible |= max(e) <= 0.1 and commutator > bound * spectral
    return worst, layer, impossible


def _orth_complement(Q, k):
    """An orthonormal basis of span(Q)^perp in R^k (Q with orthonormal columns)."""
    return np.linalg.qr(Q, mode="complete")[0][:, Q.shape[1]:] if Q.shape[1] else np.eye(k)


def _cluster_bounds(s, rtol, scale):
    """Starts and sizes of the runs of descending values s equal up to rtol * scale."""
    starts = np.flatnonzero(np.abs(np.diff(s)) > rtol * scale) + 1
    starts = np.concatenate([[0], starts]) if s.size else starts
    return starts, np.diff(np.append(starts, s.size))


def _clusters(s, rtol, scale):
    """Index groups of descending values s equal up to rtol * scale."""
    return np.split(np.arange(s.size), _cluster_bounds(s, rtol, scale)[0][1:])


def _orthonormal_by_size(Z, norms):
    """Unit columns Z (nearly orthonormal) made orthonormal by Gram-Schmidt in order of
    decreasing ``norms``, each corrected only against the larger (more accurate) ones."""
    order = np.argsort(-norms, kind="stable")
    Q, R = np.linalg.qr(Z[:, order])
    return (Q * np.where(np.diagonal(R) < 0, -1.0, 1.0))[:, np.argsort(order)]


def _forward_products(Ws, i):
    """[(P, m)]: P = W_l ... W_{i+1} / ||.||_2, the m = l - i layers after space i."""
    products, P = [], None
    for m, W in enumerate(Ws[i:], start=1):
        P = W if P is None else W @ P
        scale = np.linalg.norm(P, 2)
        if scale > 0:
            products.append((P / scale, m))
    return products


def _joint_eigenbasis(C, products, tol):
    """span(C) split into common right singular vectors of the forward products [(P, m)]:
    an SVD of P on each group, its values compared per layer (m-th roots) up to tol, those
    below tol (or rounding) zero; then each group turned to the next layer's singular vectors
    (values equal to tol but not to rounding, as in float32, then do not mix)."""
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


def _strings(Ws, tol):
    """Step 2 of :func:`is_aligned`: the strings [(a, [q_a, q_{a+1}, ...])] and the widths."""
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
    """ends[i][j]: the last space of the run i, i+1, ... with k > j (position j's track)."""
    ends = [[i] * k for i, k in enumerate(widths)]
    for i in range(len(widths) - 2, -1, -1):
        for j in range(min(widths[i], widths[i + 1])):
            ends[i][j] = ends[i + 1][j]
    return ends


def _pairable(tracks, strings):
    """Hall's condition for {track end R: count} and {string end b: count}, b <= R: equal
    totals, and at every t no more strings than tracks end after t."""
    if sum(tracks.values()) != sum(strings.values()):
        return False
    return all(sum(n for b, n in strings.items() if b > t) <= sum(n for R, n in tracks.items()
                                                                if R > t) for t in strings)


def _pairings(tracks, strings):
    """Every pairing of the free tracks {R: count} with the new strings {b: count}, b <= R, as
    {(R, b): count}: the soonest-ending tracks choose first, best fit first, and a choice
    that leaves the rest unpairable is not followed."""
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


def _assign_positions(intervals, widths):
    """Step 3 of :func:`is_aligned`: a position for each string (a, b) over spaces a..b,
    or None when none exist."""
    ends, d = _track_ends(widths), len(widths) - 1
    starting = [collections.Counter(b for a, b in intervals if a == i) for i in range(d + 1)]
    failed = set()

    def search(i, state):                     # state: ((R, e), count) pairs alive into space i
        if i > d:
            return []
        if (i, state) in failed:
            return None
        free = collections.Counter()                  # the track ends of the free positions:
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


# ------------------------------- Sections 4.1-4.2: when alignment is an invariant --
@dataclasses.dataclass
class Certificate:
    """The answer of :func:`invariance_certificate` (Theorem 4), truthy when ``ok``: U^T Y X^T V and
    V^T X X^T V block diagonal with top-left blocks diag(lam_prime) and diag(lam);
    ``residual``: the largest relative off-block entry; ``violation``: 0 when ok."""
    ok: bool
    r: int
    U: np.ndarray = dataclasses.field(default=None, repr=False)
    V: np.ndarray = dataclasses.field(default=None, repr=False)
    lam: np.ndarray = dataclasses.field(default=None, repr=False)
    lam_prime: np.ndarray = dataclasses.field(default=None, repr=False)
    residual: float = math.inf
    violation: float = 0.0

    def __bool__(self):
        return bool(self.ok)


def _data_matrices(X, Y):
    """X and Y as float64 NumPy matrices with the same number of columns, checked."""
    X, Y = (to_numpy(as_array(name, a)).astype(np.float64) for name, a in (("X", X), ("Y", Y)))
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X (k0 x n) and Y (kd x n) need the same n; got {_shape(X)} and "
                         f"{_shape(Y)}")
    check_finite("X", X)
    check_finite("Y", Y)
    return X, Y


def as_widths(widths):
    """[k_0, ..., k_d] as a list of at least two integers >= 0 (a width 0 is allowed: r = 0)."""
    try:
        ok = len(widths) >= 2 and all(isinstance(k, (int, np.integer)) and k >= 0 for k in widths)
    except TypeError:
        ok = False
    if not ok or isinstance(widths, str):
        raise ValueError(f"widths must be a list [k_0, ..., k_d] of at least two integers "
                         f">= 0, got {widths!r}")
    return [int(k) for k in widths]


def invariance_certificate(X, Y, widths, tol=1e-9):
    """Decide Theorem 4's data condition (Theorem 1's when all widths are equal).

    Orthonormal U (kd x kd), V (k0 x k0) with U^T Y X^T V = [[Lambda', 0], [0, A_1]] and
    V^T X X^T V = [[Lambda, 0], [0, A_2]], Lambda, Lambda' diagonal r x r, r = min(widths)
    (the paper prints A_1's transpose).  Equivalently r orthonormal common eigenvectors v_j
    of X X^T and (Y X^T)^T Y X^T with u_j = Y X^T v_j / lambda'_j, at most kd - rank(Y X^T)
    of the lambda'_j zero; chosen by decreasing lambda'^2 / lambda, zeros last.  Repeated
    eigenvalues, rank-deficient X and n < k0 are allowed; ``tol`` is relative.

    Returns
    -------
    Certificate
        U, V, lam, lam_prime and residual when the condition holds; else how far it fails.
    """
    X, Y, widths = *_data_matrices(X, Y), as_widths(widths)
    check_number("tol", tol)
    if widths[0] != X.shape[0] or widths[-1] != Y.shape[0]:
        raise ValueError(f"widths {list(widths)} must start with k0 = {X.shape[0]} and end "
                         f"with kd = {Y.shape[0]}")
    k0, kd, r = X.shape[0], Y.shape[0], int(min(widths))
    S, C = X @ X.T, Y @ X.T
    G = C.T @ C
    check_finite("X X^T and (Y X^T)^T Y X^T (X and Y too large? scale them)", np.stack([S, G]))
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
    ok = bool(residual <= 1e3 * tol)
    return Certificate(ok, r, U, V, np.diagonal(B)[:r].copy(), np.diagonal(A)[:r].copy(),
                       float(residual), 0.0 if ok else float(residual))


def _eigenspaces(S, tol):
    """Orthonormal bases of symmetric S's eigenspaces, eigenvalues decreasing, equal to tol."""
    w, E = np.linalg.eigh(S)
    scale = max(abs(w).max(), np.finfo(float).tiny)
    return [E[:, ::-1][:, idx] for idx in _clusters(w[::-1], tol, scale)]


def _joint_eigenvectors(S, G, tol):
    """Unit vectors v with S v = lambda v and G v = mu v (S, G symmetric): in each eigenspace
    K of S, {v in K : G v in K} kept until G-invariant, then diagonalised."""
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


def _off_block(M, r):
    """The largest |entry| of M outside diag(top-left r x r) and the bottom-right block."""
    M = np.abs(M) * (1.0 - np.eye(*M.shape))
    M[r:, r:] = 0.0
    return float(M.max()) if M.size else 0.0


def _condition_violation(S, G, r, room, tol):
    """How far Theorem 4's condition fails: the r-th smallest ||G v - (v^T G v) v|| / ||G||
    (1 for each one missing) over eigenvectors v of S = X X^T diagonalising G = (YX^T)^T YX^T
    on S's eigenspaces, at most ``room`` (kd - rank(Y X^T)) of those with a zero image."""
    V = np.concatenate([K @ np.linalg.eigh(K.T @ G @ K)[1] for K in _eigenspaces(S, 1e-9)], axis=1)
    GV, scale = G @ V, max(np.linalg.norm(G, 2), 1e-300)
    mu = np.einsum("ij,ij->j", V, GV)                      # ||Y X^T v||^2
    res = np.linalg.norm(GV - V * mu, axis=0) / scale
    zero = np.sqrt(np.maximum(mu, 0.0)) <= tol * np.sqrt(scale)
    usable = np.sort(np.concatenate([res[~zero], res[zero][:room], np.ones(r)]))
    return float(usable[r - 1])


def sensing_certificate(Ms, tol=1e-9):
    """Matrix sensing (Section 4.2): (ok, U, V, residual) with every U^T M_i V diagonal
    to ``tol`` (relative), for Ms (n, k, k), from the SVD of a generic combination."""
    Ms = to_numpy(as_array("Ms", Ms)).astype(np.float64)
    if Ms.ndim != 3 or Ms.shape[0] == 0:
        raise ValueError(f"Ms must be n x k x k sensing matrices (n >= 1), got shape {_shape(Ms)}")
    check_finite("Ms", Ms)
    c = np.random.default_rng(12345).standard_normal(Ms.shape[0])
    U, _, Vt = np.linalg.svd(np.tensordot(c, Ms, axes=1))
    off = (U.T @ Ms @ Vt.T) * (1.0 - np.eye(*Ms.shape[1:]))
    residual = float(np.abs(off).max() / max(np.abs(Ms).max(), 1e-300)) if off.size else 0.0
    return residual <= 1e3 * tol, U, Vt.T, residual


def aligned_init(U, V, widths, sigmas=None, scale=1.0, seed=0, balanced=False,
                 chain=None, dtype=np.float64):
    """The aligned initialisation of Lemma 2 / Theorem 1: W_1 = Q_1 D_1 V^T,
    W_i = Q_i D_i Q_{i-1}^T, W_d = U D_d Q_{d-1}^T.

    Parameters
    ----------
    U, V : arrays
        Orthogonal kd x kd and k0 x k0 (e.g. a certificate's, or the singular vectors of Y, X).
    widths : sequence of int
        [k_0, ..., k_d].
    sigmas : list of arrays, optional
        The diagonals D_i (rectangular); default U(0, scale) draws with ``seed`` (the
        authors' choice).
    balanced : bool
        The first min(widths) values of every layer the d-th root of their product, the rest
        zero: W_{i+1}^T W_{i+1} = W_i W_i^T.
    chain : list of arrays, optional
        Orthogonal [Q_1, ..., Q_{d-1}] (default identities).

    Returns
    -------
    weights : list of arrays of ``dtype``, aligned (Definition 2) by construction.
    """
    U, V = as_array("U", U), as_array("V", V)
    chain = None if chain is None else [as_array(f"chain[{i}]", Q) for i, Q in enumerate(chain)]
    xp, widths = array_module(U, V), as_widths(widths)
    d = len(widths) - 1
    check_number("scale", scale)
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    if U.shape != (widths[-1],) * 2 or V.shape != (widths[0],) * 2:
        raise ValueError(f"U must be kd x kd = {widths[-1]} x {widths[-1]} and V k0 x k0 = "
                         f"{widths[0]} x {widths[0]}; got {_shape(U)} and {_shape(V)}")
    for name, Q in [("U", U), ("V", V)] + [(f"chain[{i}]", Q) for i, Q in enumerate(chain or [])]:
        Q = to_numpy(Q).astype(np.float64)
        if not np.all(np.isfinite(Q)) or Q.ndim != 2 or Q.shape[0] != Q.shape[1] or \
                np.abs(Q.T @ Q - np.eye(Q.shape[1])).max() > 1e-6:
            raise ValueError(f"{name} must be an orthogonal matrix (Q^T Q = I), e.g. the left "
                             f"singular vectors of Y or the right ones of X from np.linalg.svd")
    if chain is not None and [Q.shape for Q in chain] != [(k, k) for k in widths[1:-1]]:
        raise ValueError(f"chain must be d - 1 = {d - 1} orthogonal matrices of the hidden "
                         f"widths {widths[1:-1]}, got shapes {[_shape(Q) for Q in chain]}")
    if sigmas is None:
        rng = np.random.default_rng(seed)
        sigmas = [rng.uniform(0, scale, min(widths[i], widths[i + 1])) for i in range(d)]
    sigmas = [to_numpy(as_array(f"sigmas[{i}]", s)).astype(np.float64) for i, s in enumerate(sigmas)]
    if balanced:
        r = min(widths)
        common = np.abs(np.prod([s[:r] for s in sigmas], axis=0)) ** (1.0 / d)
        sigmas = [np.concatenate([common, np.zeros(s.size - r)]) for s in sigmas]
    inner = chain if chain is not None else [xp.eye(k, dtype=dtype) for k in widths[1:-1]]
    bases = [xp.asarray(Q, dtype=dtype) for Q in [V, *inner, U]]
    return aligned_network(bases, [xp.asarray(s, dtype=dtype) for s in sigmas])


# ------------------------------------- Section 4.3: consequences of alignment --
def _others_product(sig):
    """prod_{j != i} sig[..., j, :] for each i, by prefix and suffix products (no division)."""
    xp = array_module(sig)
    ones = xp.ones_like(sig[..., :1, :])
    prefix = xp.cumprod(xp.concatenate([ones, sig[..., :-1, :]], axis=-2), axis=-2)
    suffix = xp.cumprod(xp.concatenate([ones, sig[..., :0:-1, :]], axis=-2), axis=-2)[..., ::-1, :]
    return prefix * suffix


def singular_value_dynamics(sigmas0, lam, lam_prime, lr, n, steps, kind="mse", kd=None,
                            record_every=1):
    """Corollary 1: gradient descent on the top r singular values of a strongly aligned
    network, sigma_i(t+1) = sigma_i(t) + (lr / n) prod_{j != i} sigma_j(t) (lam' - lam
    prod_j sigma_j(t)) (Appendix B's product over j != i; Eq. (6) as printed multiplies over
    all j).  ``kind`` "mse_mean" scales the step by 2 / (kd n) instead of 1 / n.

    Parameters
    ----------
    sigmas0 : array
        (..., d, r) initial singular values; leading axes are independent runs.
    lam, lam_prime : arrays
        (r,): the certificate's Lambda and Lambda'.
    lr, n, steps, record_every
        The learning rate, the number of examples, the steps, and the steps between rows.

    Returns
    -------
    array
        (steps // record_every + 1, ..., d, r): the recorded singular values.
    """
    if kind not in ("mse", "mse_mean") or (kind == "mse_mean" and not kd):
        raise ValueError(f"kind must be 'mse' or 'mse_mean' (with kd), got {kind!r}")
    check_number("steps", steps, integer=True)
    check_number("record_every", record_every, least=1, integer=True)
    check_number("n", n, least=1, integer=True)
    check_number("lr", lr)
    if kind == "mse_mean":
        check_number("kd", kd, least=1, integer=True)
    sig, lam, lam_prime = (as_array(name, a).astype(np.float64) for name, a in
                           (("sigmas0", sigmas0), ("lam", lam), ("lam_prime", lam_prime)))
    if sig.ndim < 2 or lam.shape != sig.shape[-1:] or lam_prime.shape != lam.shape:
        raise ValueError(f"sigmas0 must be (..., d, r) and lam, lam_prime of length r; got "
                         f"{_shape(sig)}, {_shape(lam)} and {_shape(lam_prime)}")
    xp, coef = array_module(sig), lr / n if kind == "mse" else 2.0 * lr / (kd * n)
    lam, lam_prime = xp.asarray(lam), xp.asarray(lam_prime)           # (where sigmas0 is)
    out = [sig.copy()]
    for t in range(1, steps + 1):
        others = _others_product(sig)
        total = others[..., :1, :] * sig[..., :1, :]
        sig = sig + coef * others * (lam_prime - lam * total)
        if t % record_every == 0:
            out.append(sig.copy())
    return xp.stack(out)


def prop2_learning_rate(sigmas0, lam, lam_prime, n):
    """Proposition 2's largest learning rate, as its proof (Appendix C) needs it: gamma <=
    (n ln 2 / d) min_k [min_i sigma_k(W_i(0))^2 lam_k / lam'_k^2] (the minimum over the
    layers i too: the statement leaves i free), k with lam'_k = 0 not counted.
    ``sigmas0``: (d, r) positive; ``lam``, ``lam_prime``: (r,).  For the loss "mse" (Eq.
    (2)); for "mse_mean" (the authors' mean) the rate is kd / 2 times this."""
    sig = to_numpy(as_array("sigmas0", sigmas0)).astype(np.float64)
    lam = to_numpy(as_array("lam", lam)).astype(np.float64)
    lam_prime = to_numpy(as_array("lam_prime", lam_prime)).astype(np.float64)
    if sig.ndim != 2 or 0 in sig.shape or lam.shape != sig.shape[1:] or lam_prime.shape != lam.shape:
        raise ValueError(f"sigmas0 must be d x r (d, r >= 1) and lam, lam_prime of length r; got "
                         f"{_shape(sig)}, {_shape(lam)} and {_shape(lam_prime)}")
    check_number("n", n, least=1, integer=True)
    if (lam < 0).any():
        raise ValueError("lam must be eigenvalues of X X^T (>= 0), got a negative one")
    live = lam_prime != 0
    if not live.any():
        raise ValueError("every lam_prime is 0: the targets are zero, any rate converges")
    return float(n * math.log(2) / sig.shape[0] *
                 np.min(sig.min(axis=0)[live] ** 2 * lam[live] / lam_prime[live] ** 2))


def balanced_factorization(P, hidden=None, W=None):
    """Proposition 3: the aligned, balanced W_1 = W Sigma^{1/2} V^T, W_2 = U Sigma^{1/2} W^T
    with W_2 W_1 = P = U Sigma V^T, of least ||W_1||_F^2 + ||W_2||_F^2 = 2 ||P||_* (``W``
    orthogonal hidden x hidden, default I; ``hidden`` >= rank(P), default min(m, n)).
    (Appendix G prints W_1 = W Sigma^{1/2} U^T, W_2 = U Sigma^{1/2} V^T: not P.)"""
    P = as_array("P", P)
    if P.ndim != 2:
        raise ValueError(f"P must be a matrix, got shape {_shape(P)}")
    check_finite("P", P)
    xp = array_module(P)
    m, n = P.shape
    hidden = min(m, n) if hidden is None else hidden
    check_number("hidden", hidden, least=1, integer=True)
    if hidden < int(np.linalg.matrix_rank(to_numpy(P))):
        raise ValueError(f"hidden width {hidden} is below rank(P)")
    U, s, Vt = xp.linalg.svd(P, full_matrices=True)
    root = xp.sqrt(s[:min(hidden, s.size)])
    W = xp.eye(hidden, dtype=P.dtype) if W is None else as_array("W", W)
    if W.shape != (hidden, hidden) or not bool(xp.allclose(W.T @ W, xp.eye(hidden), atol=1e-6)):
        raise ValueError(f"W must be an orthogonal hidden x hidden = {hidden} x {hidden} matrix, "
                         f"got shape {_shape(W)}{' (not orthogonal)' * (W.shape == (hidden, hidden))}")
    return W @ rect_diag(root, hidden, n) @ Vt, U @ rect_diag(root, m, hidden) @ W.T


def proposition4(weights, X, Y, tol=None):
    """Proposition 4: for an aligned network with Y = f(X) (n >= k0, X of full rank), W_d^T
    aligns with M = Y X^T (X X^T)^{-1}, which aligns with W_1^T ("A aligns with B": [B, A] is
    aligned).  Returns the tests (is_aligned at ``tol``) of [M, W_d^T] and [W_1^T, M]."""
    weights = as_weights(weights)
    X, Y = _data_matrices(X, Y)
    if X.shape[0] != weights[0].shape[1] or Y.shape[0] != weights[-1].shape[0]:
        raise ValueError(f"X must have k0 = {weights[0].shape[1]} rows and Y kd = "
                         f"{weights[-1].shape[0]}; got {_shape(X)} and {_shape(Y)}")
    if X.shape[1] < X.shape[0] or np.linalg.matrix_rank(X) < X.shape[0]:
        raise ValueError(f"Proposition 4 needs n >= k0 and X of full rank; X is {_shape(X)} "
                         f"of rank {np.linalg.matrix_rank(X)}")
    M = Y @ X.T @ np.linalg.inv(X @ X.T)
    return (is_aligned([M, to_numpy(weights[-1]).T], tol),
            is_aligned([to_numpy(weights[0]).T, M], tol))


# ------------------------------------------ Section 6: alignment and invariance --
def reduced_svds(weights):
    """[(U_i, s_i, V_i)]: the reduced SVDs of the layers, float64 NumPy, s descending."""
    svds = [np.linalg.svd(to_numpy(W).astype(np.float64), full_matrices=False) for W in weights]
    return [(U, s, Vt.T) for U, s, Vt in svds]


def layer_widths(svds):
    """[k_0, k_1, ..., k_d] from the layers' reduced SVDs."""
    return [svds[0][2].shape[0]] + [U.shape[0] for U, _, _ in svds]


@dataclasses.dataclass
class Pair:
    """Two sets of orthonormal directions (columns) in R^k that a measure compares: A with
    singular values sa and B with sb (descending); the matched rule scores B's directions.
    ``positions``: for adjacent layers, the positions the complement of span(B) may take
    (Definition 2's rectangular Sigma_i)."""
    A: np.ndarray
    sa: np.ndarray
    B: np.ndarray
    sb: np.ndarray
    k: int
    positions: int = None

    @functools.cached_property
    def product(self):
        """A^T B, shared by both rules."""
        return self.A.T @ self.B

    @property
    def top_a(self):
        """sigma_max of A's layer, the scale of rtol."""
        return self.sa[0] if self.sa.size else 0.0

    @property
    def top_b(self):
        """sigma_max of B's layer."""
        return self.sb[0] if self.sb.size else 0.0


def alignment_pairs(svds, widths):
    """Pairs (U_i, V_{i+1}) of adjacent layers: what alignment compares (U_i = V_{i+1} in
    Definition 2)."""
    return [Pair(svds[i][0], svds[i][1], svds[i + 1][2], svds[i + 1][1], widths[i + 1],
                 positions=max(widths[i], widths[i + 2]))
            for i in range(len(svds) - 1)]


def invariance_pairs(now, then, widths):
    """Pairs (U_i(t), U_i(0)) for i < d and (V_i(t), V_i(0)) for i > 1: what invariance
    compares."""
    sides = [(i, 0) for i in range(len(now) - 1)] + [(i, 2) for i in range(1, len(now))]
    return [Pair(now[i][side], now[i][1], then[i][side], then[i][1],
                 widths[i + 1] if side == 0 else widths[i])
            for i, side in sides]


def used_directions(s, rtol, top):
    """The directions the paired rule scores: singular values s > rtol sigma_max (``top``)."""
    return s > rtol * top


def _adapt_clusters(M, a_bounds, b_sizes):
    """M = A^T B with A's directions rotated, in each A-cluster (a_bounds: starts, sizes), to
    the basis that B's clusters (sizes b_sizes) split it into: the eigenvectors of the
    compression of sum_b w_b P_{F_b} (F_b: the B-clusters and span(B)^perp)."""
    M = M.copy()
    # Any distinct w_b work: the fractional parts of multiples of sqrt(2) are distinct, so
    # w_b in [1, 2), away from the 0.5 that the complement of span(B) gets.
    weights = np.repeat(1.0 + np.sqrt(2.0) * np.arange(1, b_sizes.size + 1) % 1.0, b_sizes)
    starts, sizes = a_bounds
    for size in np.unique(sizes[sizes > 1]):          # clusters of one size in one batched eigh
        rows = starts[sizes == size][:, None] + np.arange(size)
        block = M[rows]                                             # (clusters, size, q)
        compression = (block * weights) @ block.swapaxes(1, 2) + \
            0.5 * (np.eye(size) - block @ block.swapaxes(1, 2))
        M[rows] = np.linalg.eigh(compression)[1].swapaxes(1, 2) @ block
    return M


def paired_costs(pair, rtol):
    """The paired rule's matching problem for one pair: (C, capacity), or None when nothing
    is scored.  The used directions (sigma > rtol sigma_max) of the side with fewer are the
    rows; the columns are the other side's clusters of equal values (their vectors are
    defined up to a rotation, so the rows are first turned to the basis the clusters split
    them into) and the complement of its span, which takes up to k - q (for adjacent layers
    max(k_{i-1}, k_{i+1}) - q) rows; C holds the norms of the rows' projections on them."""
    ua, ub = used_directions(pair.sa, rtol, pair.top_a), used_directions(pair.sb, rtol, pair.top_b)
    M, sa, sb, scale_a, scale_b = pair.product[ua][:, ub], pair.sa[ua], pair.sb[ub], pair.top_a, pair.top_b
    if M.shape[0] > M.shape[1]:                      # score the side with fewer
        M, sa, sb, scale_a, scale_b = M.T, sb, sa, scale_b, scale_a
    p, q = M.shape
    if not p:
        return None
    starts, sizes = _cluster_bounds(sb, rtol, scale_b)
    M = _adapt_clusters(M, _cluster_bounds(sa, rtol, scale_a), sizes)
    sq = M * M
    in_b = np.add.reduceat(sq, starts, axis=1) if q else np.zeros((p, 0))
    outside = np.clip(1.0 - sq.sum(axis=1, keepdims=True), 0.0, 1.0)
    C = np.sqrt(np.clip(np.concatenate([in_b, outside], axis=1), 0.0, 1.0))
    return C, np.append(sizes, max(0, min(pair.k, pair.positions or pair.k) - q))


def greedy_match(C, capacity):
    """The paired rule's matching: rows of C >= 0 (p x m) one to one to columns with room
    ``capacity`` (m,), entries taken in decreasing order (ties row-major, NaN last) while the
    row is free and the column has room.  Each row's matched value (0: none)."""
    value, room, free = np.zeros(C.shape[0]), list(capacity), [True] * C.shape[0]
    for e in np.argsort(-C, axis=None, kind="stable"):
        r, c = divmod(int(e), C.shape[1])
        if free[r] and room[c] > 0:
            free[r], room[c], value[r] = False, room[c] - 1, C[r, c]
    return value


def paired_score(pairs, rtol):
    """The paired rule (the paper's "average dot product between corresponding columns",
    made exact): the mean matched |cosine| over the scored directions of all pairs; 1 on an
    aligned network (Definition 2)."""
    total, count = 0.0, 0
    for pair in pairs:
        costs = paired_costs(pair, rtol)
        if costs is not None:
            total, count = total + float(greedy_match(*costs).sum()), count + costs[0].shape[0]
    return total / count if count else 1.0


def matched_score(pairs):
    """The matched rule (the authors' code): each direction of B scored by its largest
    |cosine| with A's, the mean over B's directions of all pairs."""
    best = [np.abs(pair.product).max(axis=0) for pair in pairs if pair.product.size]
    values = np.concatenate(best) if best else np.zeros(0)
    return float(values.sum()) / values.size if values.size else 1.0


def _score(pairs, how, rtol):
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    check_number("rtol", rtol, below=1)
    return paired_score(pairs, rtol) if how == "paired" else matched_score(pairs)


def alignment(weights, how="paired", rtol=1e-6):
    """Alignment of adjacent layers (Section 6), in [0, 1]: U_i against V_{i+1} by the rule
    ``how``, "paired" (the paper's, made exact) or "matched" (the authors' code); 1 when
    adjacent layers share singular vectors.  Pairwise only: :func:`is_aligned` decides
    Definition 2 for the whole chain."""
    svds = reduced_svds(as_weights(weights))
    return _score(alignment_pairs(svds, layer_widths(svds)), how, rtol)


def invariance(weights_t, weights_0, how="paired", rtol=1e-6):
    """Invariance of the singular vectors (Section 6), in [0, 1]: U_i(t) against U_i(0) for
    i < d and V_i(t) against V_i(0) for i > 1, by the rule ``how`` of :func:`alignment`."""
    weights_t, weights_0 = as_weights(weights_t), as_weights(weights_0)
    if [W.shape for W in weights_t] != [W.shape for W in weights_0]:
        raise ValueError(f"weights_t and weights_0 must have the same shapes, got "
                         f"{[_shape(W) for W in weights_t]} and {[_shape(W) for W in weights_0]}")
    now = reduced_svds(weights_t)
    return _score(invariance_pairs(now, reduced_svds(weights_0), layer_widths(now)), how, rtol)


def measures_of(now, then, rtol):
    """{MEASURE_KEYS: value}: alignment and invariance by both rules from reduced SVDs now
    and at the start."""
    widths = layer_widths(now)
    aligned, invariant = alignment_pairs(now, widths), invariance_pairs(now, then, widths)
    return {"alignment_paired": paired_score(aligned, rtol),
            "alignment_matched": matched_score(aligned),
            "invariance_paired": paired_score(invariant, rtol),
            "invariance_matched": matched_score(invariant)}


def check_like(name, weights, shapes):
    """Raise ValueError unless the layers have the ``shapes`` a measure was built for."""
    got = [np.shape(W) for W in weights] if isinstance(weights, (list, tuple)) else None
    if got != [tuple(s) for s in shapes]:
        raise ValueError(f"{name} was built for layers {['x'.join(map(str, s)) for s in shapes]}, "
                         f"got {got if got is None else ['x'.join(map(str, s)) for s in got]}")


def tracker(weights_0, rtol=1e-6):
    """A measure for :func:`train` (Section 6): ``m(weights, _)`` -> {MEASURE_KEYS: alignment and
    invariance (against ``weights_0``) by both rules}; NaN for weights that are not finite
    (a diverged run)."""
    weights_0 = as_weights(weights_0)
    check_number("rtol", rtol, below=1)
    shapes, then = [W.shape for W in weights_0], reduced_svds(weights_0)

    def measure(weights, _=None):
        weights = [as_array(f"W_{i}", W) for i, W in enumerate(weights, 1)]
        check_like("this tracker", weights, shapes)
        if not all(bool(array_module(W).isfinite(W).all()) for W in weights):
            return dict.fromkeys(MEASURE_KEYS, math.nan)
        return measures_of(reduced_svds(weights), then, rtol)
    return measure
