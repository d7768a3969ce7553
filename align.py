"""Deep linear networks and alignment (Radhakrishnan, Nichani, Bernstein, Uhler).

Notation (the paper's): ``X`` is k0 x n with one example per column, ``Y`` is
kd x n, ``weights`` is the list [W_1, ..., W_d] with W_i of shape
(k_i, k_{i-1}) and f(X) = W_d ... W_1 X (Eq. (1)).  ``lr`` is gamma.

Every function takes NumPy or CuPy arrays and computes with the array module
of its inputs; the weights may carry a leading batch axis (B, k_i, k_{i-1})
for independent networks trained together.
"""
import contextlib
import dataclasses
import functools
import gc
import json
import math
import operator
import os
import sys
import time

import numpy as np

LOSSES = ("mse", "mse_mean", "ce", "logistic", "exp")
DEVICES = ("cpu", "gpu", "auto")


class DeviceError(RuntimeError):
    """The requested device (GPU through CuPy) cannot be used."""


class DivergenceError(FloatingPointError):
    """Gradient descent produced a non-finite loss; ``history`` holds the run so far."""

    def __init__(self, message, history):
        super().__init__(message)
        self.history = history


# ----------------------------------------------------------------- backends --

def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays live in (CuPy is never imported otherwise)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return np


def select_device(device="auto", quiet=False):
    """Array module for ``device`` in {"cpu", "gpu", "auto"}.

    "gpu" raises DeviceError naming what is missing; "auto" falls back to NumPy
    with a one-line notice on stderr (unless ``quiet``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("CuPy is installed but sees no CUDA GPU")
        cupy.zeros(1).sum()  # a kernel really runs
        return cupy
    except Exception as exc:  # ImportError, CUDA driver errors, DeviceError
        reason = ("CuPy is not installed: pip install '.[gpu]' (or cupy-cuda12x / "
                  "cupy-cuda13x matching your CUDA)") if isinstance(exc, ImportError) \
            else f"no usable GPU ({exc})"
        if device == "gpu":
            raise DeviceError(f"--device gpu needs CuPy and a CUDA GPU: {reason}") from exc
        if not quiet:
            print(f"note: running on the CPU with NumPy ({reason.split(':')[0]})",
                  file=sys.stderr)
        return np


def to_numpy(a):
    """A host NumPy copy of a NumPy or CuPy array (CuPy's recognised as in array_module)."""
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def _T(A):
    return A.swapaxes(-1, -2)


# --------------------------------------------------------------- validation --

def _shape(a):
    return "x".join(str(s) for s in a.shape)


def _check_finite(name, a):
    xp = array_module(a)
    if not bool(xp.isfinite(a).all()):
        weights = name.startswith(("W", "params"))
        fix = "weights from a diverged run? lower the learning rate" if weights else "clean the data"
        raise ValueError(f"{name} contains NaN or inf ({fix})")


def check_network(weights, X=None):
    """Validate widths and finiteness of ``weights`` (and ``X``); return the widths [k0..kd]."""
    if len(weights) == 0:
        raise ValueError("weights must be a non-empty list [W_1, ..., W_d]")
    for i, W in enumerate(weights, 1):
        if W.ndim not in (2, 3):
            raise ValueError(f"weights[{i - 1}] (W_{i}) must be k_{i} x k_{i - 1} "
                             f"(or batched), got shape {_shape(W)}")
        _check_finite(f"W_{i}", W)
    for i in range(1, len(weights)):
        if weights[i].shape[-1] != weights[i - 1].shape[-2]:
            raise ValueError(f"W_{i + 1} has shape {_shape(weights[i])} but W_{i} has "
                             f"{_shape(weights[i - 1])}: W_{i + 1} needs "
                             f"{weights[i - 1].shape[-2]} columns")
    if X is not None:
        batch = weights[0].shape[:-2]
        if X.ndim not in (2, 3) or X.shape[-2] != weights[0].shape[-1] or \
                (X.ndim == 3 and X.shape[:1] != batch):
            raise ValueError(f"X must be k0 x n = {weights[0].shape[-1]} x n (one example "
                             f"per column; B x k0 x n for a batch of B networks), got shape "
                             f"{_shape(X)}")
        _check_finite("X", X)
    return [weights[0].shape[-1]] + [W.shape[-2] for W in weights]


def prepare_targets(Y, kind, kd, n):
    """Targets as a kd x n float array for loss ``kind``, validated (labels, shapes)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSSES}")
    xp = array_module(Y)
    if kind == "ce" and Y.ndim == 1:
        if Y.shape[0] != n:
            raise ValueError(f"Y has {Y.shape[0]} labels but X has n = {n} columns")
        if Y.dtype.kind not in "iu" or int(Y.min()) < 0 or int(Y.max()) >= kd:
            raise ValueError(f"integer class labels must lie in 0..{kd - 1} (kd = {kd}), "
                             f"got range {Y.min()}..{Y.max()} of dtype {Y.dtype}")
        return (xp.arange(kd)[:, None] == Y[None, :]).astype(xp.float64)
    if Y.ndim not in (2, 3) or Y.shape[-2:] != (kd, n):
        raise ValueError(f"Y must be kd x n = {kd} x {n}, got shape {_shape(Y)}")
    _check_finite("Y", Y)
    if kind == "ce" and (bool((Y < 0).any()) or
                         not bool(xp.allclose(Y.sum(-2), 1.0))):
        raise ValueError("cross-entropy targets must be one-hot (or probability) columns "
                         "summing to 1, or integer labels of shape (n,)")
    if kind in ("logistic", "exp"):
        if kd != 1:
            raise ValueError(f"the {kind} loss needs kd = 1 output, got kd = {kd}")
        if not bool((xp.abs(Y) == 1).all()):
            raise ValueError(f"{kind} loss labels must be -1 or +1")
    return Y


# ------------------------------------------------------ network and losses --

def forward(weights, X):
    """f(X) = W_d ... W_1 X, Eq. (1).  X: k0 x n; returns kd x n."""
    check_network(weights, X)
    return _activations(weights, X)[-1]


def _activations(weights, X):
    acts = [X]
    for W in weights:
        acts.append(_mm(W, acts[-1]))
    return acts


def _loss_and_output_grad(F, Y, kind):
    """Loss (one value per batch entry) and dL/dF for outputs F (kd x n)."""
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


def _loss_and_gradients(weights, X, Y, kind):
    """Loss and Eq. (8): dL/dW_i = (W_d..W_{i+1})^T dL/dF (W_{i-1}..W_1 X)^T."""
    return _chain_gradients(weights, X, lambda F: _loss_and_output_grad(F, Y, kind))


def _chain_gradients(weights, X, output_grad, input_grad=False):
    """(L, [dL/dW_i], and with ``input_grad`` dL/dX) for F = W_d ... W_1 X and
    ``output_grad(F) -> (L, dL/dF)``: Eq. (8) with its products grouped the cheaper way
    for the shapes, layer by layer (backpropagation) or at the outputs."""
    if not weights:
        L, delta = output_grad(X)
        return (L, [], delta) if input_grad else (L, [])
    shapes = tuple(W.shape[-2:] for W in weights)
    if _cheaper_at_outputs(shapes, X.shape[-1]):
        return _grouped_at_outputs(weights, X, output_grad, input_grad)
    acts = _activations(weights, X)
    L, delta = output_grad(acts[-1])
    out = _backward(weights, acts, delta, input_grad)
    return (L,) + out if input_grad else (L, out)


def _chain_costs(shapes, n):
    """Multiply-adds of Eq. (8)'s products with the input's gradient, for layers of
    shapes ((k_1, k_0), ..., (k_d, k_{d-1})) on n samples: (layer by layer, grouped at
    the outputs).  Layer by layer: 3 n sum k_i k_{i-1}; at the outputs 3 k_d k_0 n
    plus products of the weights alone.  So the outputs win when k_d and k_0 are small
    next to n and the hidden widths: 5x fewer at fig1b's size after the row-space
    reduction (k_0 = 256, n = 256)."""
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


def _grouped_at_outputs(weights, X, output_grad, input_grad):
    """Eq. (8) with S_j = W_j ... W_1 and T_j = W_d ... W_{j+1} formed first: F = S_d X,
    E = dL/dF X^T (k_d x k_0), dL/dW_j = T_j^T E S_{j-1}^T, dL/dX = S_d^T dL/dF."""
    S = [weights[0]]
    for W in weights[1:]:
        S.append(_mm(W, S[-1]))
    L, delta = output_grad(_mm(S[-1], X))
    E = _mm(delta, _T(X))
    grads, T = [None] * len(weights), None          # T = T_{j+1} (None: the identity)
    for j in range(len(weights) - 1, -1, -1):
        G = _mm(E, _T(S[j - 1])) if j else E
        grads[j] = G if T is None else _mm(_T(T), G)
        if j:
            T = weights[j] if T is None else _mm(T, weights[j])
    return (L, grads, _mm(_T(S[-1]), delta)) if input_grad else (L, grads)


def _backward(weights, acts, delta, input_grad=False):
    """dL/dW_i = delta_i a_{i-1}^T with delta_{i-1} = W_i^T delta_i (Eq. (8)); optionally
    also dL/d(input) = W_1^T delta_1."""
    grads = [None] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = _mm(delta, _T(acts[i]))
        if i or input_grad:
            delta = _mm(_T(weights[i]), delta)
    return (grads, delta) if input_grad else grads


def layer_gradients(weights, X, dF):
    """[dL/dW_1, ..., dL/dW_d] for any loss, given dL/dF at the outputs F = f(X) (Eq. (8)).

    With X = I this differentiates a loss of the end-to-end matrix W_d ... W_1
    (matrix sensing, Section 4.2)."""
    check_network(weights, X)
    return _backward(weights, _activations(weights, X), dF)


def loss(weights, X, Y, kind="mse"):
    """Training loss of kind in {"mse" (Eq. (2)), "mse_mean", "ce", "logistic", "exp"}."""
    check_network(weights, X)
    Y = prepare_targets(Y, kind, weights[-1].shape[-2], X.shape[-1])
    return _loss_and_output_grad(_activations(weights, X)[-1], Y, kind)[0]


def gradients(weights, X, Y, kind="mse"):
    """[dL/dW_1, ..., dL/dW_d], written by hand (Eq. (8) for the squared loss)."""
    check_network(weights, X)
    Y = prepare_targets(Y, kind, weights[-1].shape[-2], X.shape[-1])
    return _loss_and_gradients(weights, X, Y, kind)[1]


# --------------------------------------------------------- gradient descent --

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

    def to_dict(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(fields, default=_plain))   # (asdict deep-copies every list)


def _loss_record(L):
    """What History.losses keeps of a loss: a float, or for a batch its host NumPy row
    (rows stay arrays: a thousand networks record a thousand losses a step)."""
    return to_numpy(L).copy() if getattr(L, "ndim", 0) else float(L)


def _plain(x):
    """A Python float (or nested list) from a scalar or an array of either module."""
    if isinstance(x, (float, int, np.floating)):
        return float(x)
    x = to_numpy(x)
    return x.tolist() if x.ndim else x.item()


def train(weights, X, Y, kind="mse", lr=1e-2, max_steps=10_000, tol=1e-4,
          record_every=1, measure_every=100, measures=None, callback=None, fast=True):
    """Full-batch gradient descent W_i <- W_i - lr dL/dW_i (Eq. (8) for the squared loss).

    Validates the inputs once, then runs :func:`gradient_descent` on the weights
    (see it for stopping, measures and callback).  With ``fast`` and n < k0 the
    first layer is kept in the row space of X^T (same iterates, fewer flops; see
    ``_train_in_row_space``); Eq. (8)'s products are grouped the cheaper way
    (``_chain_gradients``); with a squared loss on NumPy (one network, one dtype,
    grouped layer by layer) the steps run in place (``_SquaredLossSteps``: the same
    iterates to rounding).
    Returns (weights, History); inputs are not modified.
    """
    check_network(weights, X)
    Y = prepare_targets(Y, kind, weights[-1].shape[-2], X.shape[-1]).astype(weights[0].dtype)
    if fast and X.shape[-1] < X.shape[-2]:
        return _train_in_row_space(weights, X, Y, kind, lr, max_steps, tol, record_every,
                                   measure_every, measures, callback)
    per_network = _frozen_below(lambda ws: _loss_and_gradients(ws, X, Y, kind), tol,
                                weights[0].ndim == 3)
    if fast and kind in ("mse", "mse_mean") and array_module(X) is np and X.ndim == 2 and \
            all(a.ndim == 2 and a.dtype == X.dtype for a in weights + [Y]) and \
            not _cheaper_at_outputs(tuple(W.shape for W in weights), X.shape[1]):
        per_network.in_place = lambda ps, lr: _SquaredLossSteps(ps, X, Y, kind, lr)
    return gradient_descent(weights, per_network, lr, max_steps, tol, record_every, measure_every,
                            measures, callback)


def _frozen_below(loss_and_grads, tol, batched):
    """For a batch of networks: zero the gradients of those whose loss is below tol, so
    each stops where its own run would (the batch stops when all are below)."""
    def wrapped(ps):
        L, grads = loss_and_grads(ps)
        if L.shape[0] == 1:
            return L, grads                  # one network stops with the run
        active = L >= tol
        if array_module(L) is np and active.all():
            return L, grads                  # (on the host the check costs less than the products)
        return L, [g * active[:, None, None] for g in grads]
    return wrapped if batched else loss_and_grads


def _train_in_row_space(weights, X, Y, kind, lr, max_steps, tol, record_every, measure_every,
                        measures, callback):
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

    def output_grad(F):
        if squared or not rotated:
            return _loss_and_output_grad(F, Y, kind)
        L, delta = _loss_and_output_grad(_mm(F, Rt), Y, kind)     # the samples' own outputs
        return L, _mm(delta, R)

    def loss_and_grads(ps):
        H = A0 + ps[0] * K if rotated else A0 + _mm(ps[0], K)
        L, grads, dH = _chain_gradients(ps[1:], H, output_grad, input_grad=True)
        return L, [dH] + grads

    def weights_of(ps):
        if Q is None:
            return [W10 + ps[0] @ Xt] + list(ps[1:])
        return [W10 + Q @ (ps[0] @ Xt), ps[1] @ _T(Q)] + list(ps[2:])
    split, same_start = [], {}                   # built at the first measurement

    def measured(fn, ps):
        if id(fn) not in same_start:             # a tracker of this run's start (else its own)
            same_start[id(fn)] = hasattr(fn, "from_svds") and fn.starts_at(weights)
        if Q is not None and same_start[id(fn)]:
            if not split:
                split.append(_split_measure(W10, Q, Xt, start))
            value = split[0] and split[0](fn, ps)
            if value is not None:
                return value
        return fn(weights_of(ps), weights)
    wrapped = {name: (lambda ps, _, fn=fn: measured(fn, ps)) for name, fn in (measures or {}).items()}
    per_network = _frozen_below(loss_and_grads, tol, W10.ndim == 3)
    out, hist = gradient_descent(start, per_network, lr, max_steps, tol, record_every, measure_every,
                                 wrapped, callback)
    return weights_of(out), hist


ROTATE_BACK_MIN = 8     # see _train_in_row_space, step 2 (prop1's 4 rows: 41 vs 63 us a step)


def _first_hidden_basis(weights, X):
    """Q, an orthonormal basis of span(W_1(0) X) + span(W_2(0)^T) (step 3 of
    _train_in_row_space), or None where it would not be smaller than k_1 (or for a batch
    or one layer).  Its rank is taken at the weights' precision."""
    W10 = weights[0]
    if len(weights) < 2 or W10.ndim != 2 or X.ndim != 2 or \
            X.shape[1] + weights[1].shape[0] >= W10.shape[0]:
        return None
    xp, f64 = array_module(W10), np.float64
    both = xp.concatenate([W10.astype(f64) @ X.astype(f64), _T(weights[1]).astype(f64)], axis=1)
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
    xp = array_module(A)
    U, s, _ = xp.linalg.svd(A, full_matrices=False)
    rank = int((s > rtol * s[0]).sum()) if s.size else 0
    return U[:, :max(rank, 1)]


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
    rounding; at fig1b size the measures then agree with direct SVDs to 5e-8).
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
    deeper = lambda ps: _reduced_svds(ps[2:])
    then, static0 = at_start[0] + deeper(start), at_start[1]
    widths = list(W10.shape[::-1]) + [W.shape[-2] for W in start[1:]]

    def measure(fn, ps):
        now = layers(ps)
        return now and fn.from_svds(now[0] + deeper(ps), then=then, widths=widths,
                                    static=(now[1], static0))
    return measure


def gradient_descent(params, loss_and_grads, lr=1e-2, max_steps=10_000, tol=1e-4,
                     record_every=1, measure_every=100, measures=None, callback=None, graphs=True):
    """Plain GD p <- p - lr g on a list of arrays, with ``loss_and_grads(params) -> (L, grads)``
    (Eq. (8) when g is the gradient of the squared loss, Eq. (2)).

    Stops when the loss (the largest over a batch of networks) is below ``tol``
    (checked at recorded steps) or after ``max_steps`` steps; Ctrl-C stops it with
    ``stop_reason = "interrupted"``.  ``measures`` maps names to functions
    ``m(params, params_0)`` called at step 0, every ``measure_every`` steps and at
    the end (one returning a dict records each of its keys).  ``callback(step, loss,
    history)`` runs at every recorded step (in runs of steps, after the run).
    Runs of steps up to the next measurement: with ``graphs`` and CuPy arrays, up to
    CUDA_GRAPH_STEPS steps replayed from captured CUDA graphs (same kernels, same
    iterates; ``loss_and_grads`` must then depend on the parameters' values only and
    never copy to the host, else it falls back to launching kernels one by one),
    while the measurement due at their start runs on a copy of the parameters; on
    NumPy, in place where ``loss_and_grads.in_place`` offers it (see _chunker).
    Returns (params, History).  A non-finite loss raises DivergenceError.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    for name, value, least in (("record_every", record_every, 1), ("measure_every", measure_every, 1),
                               ("max_steps", max_steps, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    measures = measures or {}
    params0 = [p.copy() for p in params]
    ps = [p.copy() for p in params]
    run = _Run(lr, max_steps, tol, record_every, callback)
    chunks = _chunker(ps, loss_and_grads, lr) if graphs else None

    def measure(at):
        run.hist.measure_steps.append(run.step)
        for name, fn in measures.items():
            value = fn(at, params0)
            for key, v in (value.items() if isinstance(value, dict) else [(name, value)]):
                run.hist.measurements.setdefault(key, []).append(_plain(v))

    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported by _Run
        try:
            while True:
                due = run.step % measure_every == 0
                span = min(chunks.longest, measure_every - run.step % measure_every,
                           max_steps - run.step) if chunks else 0
                launched = span > 1 and chunks.launch(span, keep=due)   # a run to the next measurement
                if due:                                 # (on the GPU while that run goes on)
                    measure(chunks.kept if launched else ps)
                if not launched:                        # one step, kernel by kernel
                    L, grads = loss_and_grads(ps)
                    if run.stops(run.step, L):
                        break
                    _descend(ps, grads, lr)
                    run.step += 1
                    continue
                if run.advance(chunks.wait(), chunks):
                    break
        except KeyboardInterrupt:
            run.hist.stop_reason = "interrupted"
            if chunks:
                chunks.cancel()                         # back to the state at run.step
    run.hist.final_step = run.step
    if not run.hist.measure_steps or run.hist.measure_steps[-1] != run.step:
        measure(ps)
    run.hist.wall_time = time.perf_counter() - run.start
    return ps, run.hist


@dataclasses.dataclass
class _Run:
    """Where a :func:`gradient_descent` run is (``step``, the parameters' step) and what
    it recorded (``hist``); applies its recording and stopping rules to the losses."""
    lr: float
    max_steps: int
    tol: float
    record_every: int
    callback: object
    hist: History = dataclasses.field(default_factory=History)
    step: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def stops(self, step, L):
        """Record the loss of ``step`` (before its update); True when the run ends there."""
        hist = self.hist
        if step % self.record_every == 0 or step == self.max_steps:
            value = _loss_record(L)
            worst = value if isinstance(value, float) else float(value.max())   # NaN: NaN
            if not math.isfinite(worst):
                hist.stop_reason, hist.final_step = "diverged", step
                hist.wall_time = time.perf_counter() - self.start
                raise DivergenceError(
                    f"loss became {worst} at step {step} with lr = {self.lr}; "
                    f"try a smaller learning rate (e.g. lr = {self.lr / 10:g})", hist)
            hist.steps.append(step)
            hist.losses.append(value)
            if self.callback:
                self.callback(step, worst, hist)
            if worst < self.tol:
                hist.stop_reason = "tol"
                return True
        if step >= self.max_steps:
            hist.stop_reason = "max_steps"
            return True
        return False

    def advance(self, losses, chunks):
        """stops() for each row of a chunk's losses (vectorised; a chunk ends before
        max_steps); moves ``step`` to where the parameters are.  True when the run
        ends inside the chunk (then rewound to there), also on Ctrl-C in the callback."""
        hist, step = self.hist, self.step
        worst = losses if losses.ndim == 1 else losses.max(axis=-1)
        at = np.arange(len(losses))
        recorded = (step + at) % self.record_every == 0
        ends = np.flatnonzero(recorded & (~np.isfinite(worst) | (worst < self.tol)))
        end = int(ends[0]) if ends.size else len(losses)
        keep = at[recorded & (at < end)]
        before = len(hist.steps)
        hist.steps.extend((step + keep).tolist())
        hist.losses.extend(losses[keep].tolist() if losses.ndim == 1 else losses[keep])
        j = 0
        try:
            for j, value in zip(keep.tolist(), worst[keep].tolist()) if self.callback else ():
                self.callback(step + j, value, hist)
            j = end
            done = end < len(losses) and self.stops(step + end, losses[end])
        except KeyboardInterrupt:                       # Ctrl-C in the callback at step + j
            if j < end:
                count = before + int(np.searchsorted(keep, j)) + 1
                del hist.steps[count:], hist.losses[count:]
            chunks.rewind(j)
            self.step += j
            raise
        if done:
            chunks.rewind(end)
            self.step += end
            return True
        chunks.settle()
        self.step += len(losses)
        return False


def _descend(ps, grads, lr):
    """The GD update p <- p - lr g in place (Eq. (8)'s step)."""
    for p, g in zip(ps, grads):
        p -= lr * g


# GD steps per captured CUDA graph on the GPU; 0 or 1 launches kernels one by one
# (environment variable ALIGN_CUDA_GRAPH_STEPS).
def _graph_steps_setting():
    text = os.environ.get("ALIGN_CUDA_GRAPH_STEPS", "100")
    if not text.strip().isdigit():
        raise ValueError(f"ALIGN_CUDA_GRAPH_STEPS must be a whole number of steps (0 turns CUDA "
                         f"graphs off), got {text!r}")
    return int(text)


CUDA_GRAPH_STEPS = _graph_steps_setting()
# Launch CUDA graphs from a helper thread (ALIGN_GRAPH_LAUNCH_THREAD=1), so that the host
# can measure while cudaGraphLaunch submits a long graph (benchmarks/overlap.py compares).
GRAPH_LAUNCH_THREAD = os.environ.get("ALIGN_GRAPH_LAUNCH_THREAD", "0") == "1"
_pools = {}


def _thread_pool(name, workers):
    """The process's thread pool ``name`` (created on first use)."""
    if name not in _pools:
        import concurrent.futures
        _pools[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"align-{name}")
    return _pools[name]


def _launch_in_thread(launch):
    """Run launch() on the one helper thread; a Future of it."""
    return _thread_pool("graph-launch", 1).submit(launch)


class _StepChunks:
    """Runs of plain GD steps done in place: ``launch(n)`` starts n steps, ``wait()``
    returns their n losses (host array, one row per step, taken before each update);
    ``rewind(j)`` goes back to the start of the last run and redoes its first j
    steps (a stop inside it); ``cancel()`` goes back to its start.  With
    ``launch(n, keep=True)``, ``kept`` holds the parameters at the start, to measure
    while the run goes on.  This base class steps kernel by kernel at ``launch``;
    :class:`_CudaGraphChunks` replays captured steps asynchronously."""

    def __init__(self, ps, loss_and_grads, lr):
        self.ps, self.loss_and_grads, self.lr = ps, loss_and_grads, lr
        self.saved = [p.copy() for p in ps]
        self.kept = self.pending = None
        self.open = False                                # a run launched and not yet taken
        self.longest = CUDA_GRAPH_STEPS                  # steps per run at most

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

    def settle(self):
        """The caller has taken the whole run."""
        self.open = False

    def rewind(self, j):
        for s, p in zip(self.saved, self.ps):
            p[...] = s
        self._run(j)
        self.open = False

    def cancel(self):
        """Back to the start of a run that was launched and not taken (Ctrl-C)."""
        self.pending = None
        if self.open:
            self.rewind(0)


class _SquaredLossSteps(_StepChunks):
    """Runs of GD steps of one dense network (NumPy, one dtype) under a squared loss:
    Eq. (8)'s backward pass into preallocated arrays, with lr applied once to dL/dF
    (so the products give lr dL/dW_i directly: equal to _descend's update to
    rounding), the d updates done as one on a flat copy of the parameters, and when
    every layer is k x k the d gradient products as one batched product.  Small
    networks (fig1a's 9 x 9 layers) are bound by the number of NumPy calls, not by
    flops: this makes a step about half as many."""

    def __init__(self, ps, X, Y, kind, lr):
        super().__init__(ps, None, lr)
        self.longest = 1000
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
        self.Y = Y                                       # as _loss_and_output_grad
        # Small outputs: each step's residual F - Y kept, the losses summed after the run
        # (one NumPy call less a step); large ones: each loss at its step.
        small = self.longest * Y.size * Y.itemsize <= RESIDUALS_BYTES
        self.residuals = np.empty((self.longest,) + Y.shape, Y.dtype) if small else None
        self.rows = list(self.residuals) if small else [self.acts[-1]] * self.longest
        self.divisor = 2 * n if kind == "mse" else kd * n
        self.rate = lr * (1.0 / n if kind == "mse" else 2.0 / (kd * n))   # lr dL/dF = rate (F - Y)

    def _run(self, n):
        if n > len(self.rows):
            raise ValueError(f"a run of {n} steps is longer than this runner's {len(self.rows)}")
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
        for t, R in zip(range(n), self.rows):           # (locals: ~0.1 us a lookup saved)
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


class _CudaGraphChunks(_StepChunks):
    """n GD steps as one CUDA graph launch (CuPy stream capture), captured once per n.

    A fig1b step is ~20 kernels of a few microseconds each, so launching them from
    Python costs more than running them.  The captured graph saves the parameters,
    then does n steps, writing each loss into a buffer.  Its temporaries come from a
    private memory pool that nothing else allocates from, so their addresses stay
    valid between replays.  Replays run on their own stream, after the work queued
    before them, so a measurement of ``kept`` (on the current stream) overlaps them.
    If capture fails (an operation that cannot be captured), ``launch`` returns
    False and the caller steps kernel by kernel.  The reference products (which fill
    the caches of the parameters' functions, e.g. a structure's index arrays) come
    from the ordinary pool, so those caches outlive this object's pool; Python's
    garbage collector is paused during a capture (see _gc_paused).
    """
    warned = False                                       # say so once per process

    def __init__(self, ps, loss_and_grads, lr):
        import cupy
        super().__init__(ps, loss_and_grads, lr)
        self.cupy, self.graphs, self.failed, self.launching = cupy, {}, False, None

    def _capture(self, n):
        cp = self.cupy
        if not self.graphs:
            self.pool, self.stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()
        global _mm
        with self.stream:
            L_ref, g_ref = self.loss_and_grads([p.copy() for p in self.ps])     # CuPy's products
        with cp.cuda.using_allocator(self.pool.malloc), self.stream, _gc_paused():
            cublas = _DirectCublas(cp, self.stream)
            try:
                _mm = cublas.matmul
                scratch = [p.copy() for p in self.ps]   # warm-up: kernels compiled, pool filled
                L, grads = self.loss_and_grads(scratch)
                _descend(scratch, grads, self.lr)
                for got, want in zip([L] + grads, [L_ref] + g_ref):   # the direct products agree
                    if float(cp.linalg.norm(got - want)) > 1e-3 * float(cp.linalg.norm(want)) + 1e-30:
                        raise RuntimeError("cuBLAS called directly disagrees with CuPy's products")
                losses = cp.empty((n,) + L.shape, dtype=L.dtype)
                self.stream.synchronize()
                mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
                self.stream.begin_capture(*(() if mode is None else (mode,)))
                try:
                    self._save()
                    for j in range(n):
                        losses[j] = self._step()
                finally:
                    graph = self.stream.end_capture()
            finally:
                _mm = operator.matmul
        return graph, losses, cublas                     # the graph's cuBLAS workspace lives on

    def launch(self, n, keep=False):
        if self.failed:
            return False
        try:
            if n not in self.graphs:
                self.graphs[n] = self._capture(n)
        except Exception as exc:                         # noqa: BLE001 - fall back, say why
            self.failed = True
            if not _CudaGraphChunks.warned:
                _CudaGraphChunks.warned = True
                print(f"note: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                      "stepping kernel by kernel", file=sys.stderr)
            return False
        graph, self.pending, _ = self.graphs[n]
        self.kept = [p.copy() for p in self.ps] if keep else None
        queued = self.cupy.cuda.Event()                  # after everything queued so far
        queued.record()
        self.stream.wait_event(queued)
        self.open = True
        if GRAPH_LAUNCH_THREAD:
            device = self.cupy.cuda.Device().id

            def launch():
                with self.cupy.cuda.Device(device):
                    graph.launch(stream=self.stream)
            self.launching = _launch_in_thread(launch)
        else:
            graph.launch(stream=self.stream)
        return True

    def _launched(self):
        """Wait for a launch on the helper thread to return (re-raising its error)."""
        launching, self.launching = self.launching, None
        if launching is not None:
            launching.result()

    def wait(self):
        self._launched()
        self.stream.synchronize()
        return super().wait()

    def cancel(self):
        self._launched()
        if self.open:
            self.stream.synchronize()
        super().cancel()


@contextlib.contextmanager
def _gc_paused():
    """Collect garbage now and not again until the block ends.  A cycle collected during
    a CUDA graph capture could free an earlier run's memory pool or cuBLAS handle
    (cudaFree, cublasDestroy), which synchronize and so invalidate the capture: seen on
    an H200 as cudaErrorStreamCaptureInvalidated in a second run of one process."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# The matrix product of the training steps.  While a CUDA graph is captured it is
# swapped for cuBLAS called directly (CuPy refuses to call cuBLAS during stream
# capture, although cuBLAS supports it); see _CudaGraphChunks.
_mm = operator.matmul


def _gemm_operand(M):
    """How cuBLAS (column-major) reads the transpose of a row-major operand M (.., r, c):
    (op, ld, batch stride) in elements, or None when M needs a contiguous copy first.
    A row-major M is the column-major M^T with ld = row stride (op N); a transposed
    view (unit row stride) is the column-major M itself, so op T gives M^T."""
    r, c = M.shape[-2:]
    s0, s1 = (st // M.itemsize for st in M.strides[-2:])
    batch = M.strides[0] // M.itemsize if M.ndim == 3 else 0
    if (s1 == 1 or c == 1) and s0 >= max(c, 1):
        return 0, s0, batch
    if (s0 == 1 or r == 1) and s1 >= max(r, 1):
        return 1, s1, batch
    return None


def _gemm_plan(A, B):
    """cuBLAS arguments for C = A @ B (row-major, 2-D or batched, batch broadcast):
    C^T = B^T A^T in column-major terms.  Returns (A, B, out shape, (opB, opA, n, m, k,
    ldB, strideB, ldA, strideA, ldC, strideC, batch)); A or B become contiguous
    copies when their layout cannot be described by a leading dimension."""
    xp = array_module(A, B)
    plans = []
    for M in (A, B):
        plan = _gemm_operand(M)
        if plan is None:
            M = xp.ascontiguousarray(M)
            plan = _gemm_operand(M)
        plans.append((M, plan))
    (A, (opA, ldA, sA)), (B, (opB, ldB, sB)) = plans
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    batch = max(A.shape[0] if A.ndim == 3 else 1, B.shape[0] if B.ndim == 3 else 1)
    shape = ((batch,) if max(A.ndim, B.ndim) == 3 else ()) + (m, n)
    return A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, n, m * n, batch)


CUBLAS_WORKSPACE = 32 << 20     # bytes; NVIDIA's advice for cuBLAS in CUDA graphs on Hopper


class _DirectCublas:
    """cuBLAS gemm through ctypes, for products inside a capture.  Its own handle and
    workspace: CuPy's products on other streams (measurements during replays) must
    not share the workspace that the captured products use."""

    def __init__(self, cupy, stream):
        import ctypes
        self.ct, self.cupy, self.handle = ctypes, cupy, None
        names = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")
        self.lib = next((lib for lib in map(self._load, names) if lib), None)
        if self.lib is None:
            raise RuntimeError(f"no cuBLAS library to call directly (tried {', '.join(names)})")
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)))
        self.handle = handle
        self.workspace = cupy.empty(CUBLAS_WORKSPACE, dtype=cupy.uint8)   # set one for graphs
        self._check(self.lib.cublasSetPointerMode_v2(self.handle, 0))  # alpha, beta on the host
        self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)))
        self._check(self.lib.cublasSetWorkspace_v2(self.handle,
                                                   ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(self.workspace.nbytes)))

    def _load(self, name):
        try:
            return self.ct.CDLL(name)
        except OSError:
            return None

    def __del__(self):
        try:
            if self.handle is not None:
                self.lib.cublasDestroy_v2(self.handle)
        except Exception:                                # noqa: BLE001 - at interpreter exit
            pass

    @staticmethod
    def _check(status):
        if status != 0:
            raise RuntimeError(f"cuBLAS status {status}")

    def matmul(self, A, B):
        if A.dtype != B.dtype or A.dtype.char not in "fd" or max(A.ndim, B.ndim) > 3:
            raise TypeError(f"direct cuBLAS product of {A.dtype}{A.shape} and {B.dtype}{B.shape}")
        if max(A.shape[-2:] + B.shape[-1:]) <= SMALL_GEMM_MAX:
            return self._small(A, B)
        A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, ldC, sC, batch) = _gemm_plan(A, B)
        C = self.cupy.empty(shape, dtype=A.dtype)
        ct, f32 = self.ct, A.dtype.char == "f"
        scalar = ct.c_float if f32 else ct.c_double
        one, zero = scalar(1.0), scalar(0.0)
        ptr = lambda M: ct.c_void_p(M.data.ptr)
        args = (self.handle, opB, opA, n, m, k, ct.byref(one), ptr(B), ldB)
        if batch == 1 and len(shape) == 2:
            gemm = self.lib.cublasSgemm_v2 if f32 else self.lib.cublasDgemm_v2
            self._check(gemm(*args, ptr(A), ldA, ct.byref(zero), ptr(C), ldC))
        else:
            gemm = self.lib.cublasSgemmStridedBatched if f32 else self.lib.cublasDgemmStridedBatched
            self._check(gemm(*args, ct.c_longlong(sB), ptr(A), ldA, ct.c_longlong(sA),
                             ct.byref(zero), ptr(C), ldC, ct.c_longlong(sC), batch))
        return C

    def _small(self, A, B):
        """A @ B for tiny (batches of) matrices: one thread per entry of the product,
        reading the operands through their strides (transposed and broadcast views)."""
        cp = self.cupy
        batch = max(A.shape[0] if A.ndim == 3 else 1, B.shape[0] if B.ndim == 3 else 1)
        (m, k), n = A.shape[-2:], B.shape[-1]
        C = cp.empty(((batch,) if max(A.ndim, B.ndim) == 3 else ()) + (m, n), dtype=A.dtype)
        steps = lambda M: [0 if M.ndim == 2 else M.strides[0] // M.itemsize] + \
            [st // M.itemsize for st in M.strides[-2:]]
        real = {"f": "float", "d": "double"}[A.dtype.char]
        kernel = _raw_kernel(cp, _SMALL_GEMM_SOURCE.replace("REAL", real), "small_gemm")
        args = (A, B, C, np.int64(C.size), np.int32(m), np.int32(n), np.int32(k),
                *map(np.int64, steps(A) + steps(B)))
        _launch_per_item(kernel, C.size, args)
        return C


# Products whose sides are all at most this use _DirectCublas._small inside a capture:
# cuBLAS's batched kernels cost several times more for thousands of 9 x 9 products.
SMALL_GEMM_MAX = 32
_SMALL_GEMM_SOURCE = r"""
extern "C" __global__ void small_gemm(const REAL* A, const REAL* B, REAL* C, const long long size,
                                      const int m, const int n, const int k,
                                      const long long a0, const long long a1, const long long a2,
                                      const long long b0, const long long b1, const long long b2) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= size) return;
    const long long b = t / ((long long)m * n);
    const int row = (int)((t / n) % m), col = (int)(t % n);
    const REAL* a = A + b * a0 + row * a1;
    const REAL* x = B + b * b0 + col * b2;
    REAL sum = 0;
    for (int p = 0; p < k; p++) sum += a[p * a2] * x[p * b1];
    C[t] = sum;
}
"""
_raw_kernels = {}


def _raw_kernel(cp, source, name, options=()):
    """A compiled CUDA kernel, built once per source text and options."""
    key = (cp, source, name, options)
    if key not in _raw_kernels:
        _raw_kernels[key] = cp.RawKernel(source, name, options=options)
    return _raw_kernels[key]


def _launch_per_item(kernel, count, args, threads=128):
    """Launch ``kernel`` with one CUDA thread per item (none for no item: CUDA refuses an
    empty grid)."""
    if count:
        kernel(((count + threads - 1) // threads,), (threads,), args)


def _chunker(ps, loss_and_grads, lr):
    """Runs of steps for gradient_descent: CUDA-graph chunks for CuPy parameters when
    enabled; on NumPy ``loss_and_grads.in_place(ps, lr)`` where the loss offers it;
    else None (step by step)."""
    if array_module(*ps) is not np:
        return _CudaGraphChunks(ps, loss_and_grads, lr) if CUDA_GRAPH_STEPS >= 2 else None
    in_place = getattr(loss_and_grads, "in_place", None)
    return in_place(ps, lr) if in_place else None


# ------------------------------------------------------------------- usSVD --

def ussvd(A):
    """A usSVD (Definition 1): U (m x m), s (min(m, n)), V (n x n) with A = U Sigma V^T."""
    xp = array_module(A)
    U, s, Vt = xp.linalg.svd(A, full_matrices=True)
    return U, s, _T(Vt)


def ussvd_matrix(U, s, V):
    """U Sigma V^T for a usSVD (Definition 1), Sigma rectangular diagonal with entries s."""
    r = s.shape[-1]
    return (U[..., :, :r] * s[..., None, :]) @ _T(V[..., :, :r])


def ussvd_permute(U, s, V, perm):
    """The usSVD with singular triples reordered by ``perm`` (a permutation of range(r)):
    Definition 1 leaves the order free."""
    r = s.shape[-1]
    U, V = U.copy(), V.copy()
    U[..., :, :r] = U[..., :, perm]
    V[..., :, :r] = V[..., :, perm]
    return U, s[..., perm], V


def ussvd_flip(U, s, V, signs):
    """The usSVD with u_j and sigma_j multiplied by signs[j] in {-1, +1}: Definition 1
    leaves the signs free."""
    r = s.shape[-1]
    U = U.copy()
    U[..., :, :r] = U[..., :, :r] * signs
    return U, s * signs, V


# ---------------------------------------------------------------- measures --

HOST_SVD_MAX = 256      # layers whose smaller side is at most this are decomposed on the host
HOST_EIGH_MAX = 128     # larger Gram matrices of layer 1's split go to the GPU's eigh (cuSOLVER:
                        # 2.9 ms for 320 x 320 on an H200, LAPACK 7.6 ms on its host)


def _linalg(fn, A):
    """fn(A), a NumPy or CuPy decomposition (svd, eigh) of a matrix or a batch.  A large
    batch of small matrices on the host is split across the cores: NumPy loops over
    them in LAPACK without holding the GIL, so each matrix gets the same result, in
    1/cores the time (larger matrices use the cores inside LAPACK already)."""
    small = A.ndim == 3 and array_module(A) is np and max(A.shape[1:]) <= THREADED_SIDE_MAX
    threads = min(_CORES, A.shape[0] // THREADED_BATCH_MIN) if small else 1
    if threads < 2:
        return fn(A)
    outs = _thread_pool("lapack", _CORES).map(fn, np.array_split(A, threads))
    return tuple(np.concatenate(pieces) for pieces in zip(*outs))


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
THREADED_BATCH_MIN = 64  # matrices per thread at least (fewer: the threads cost more than they save)
THREADED_SIDE_MAX = 64   # matrices at most this size are split across threads


def _reduced_svd(W, keep=False):
    """Reduced SVD (U, s, V) as float64 host arrays, s descending.

    float32 layers: from the eigenvectors of the float64 Gram matrix of the smaller
    side, several times faster than an SVD and more accurate than a float32 SVD
    (vector errors ~ 1e-16 ||W||^2 / (sigma gap) instead of ~ 6e-8 ||W|| / gap).
    With ``keep``, a batch on the GPU stays there: matrices up to SMALL_SVD_KERNEL_MAX
    on a side go to _small_svd_kernel, larger ones to CuPy's batched svd.
    """
    if keep and W.ndim == 3 and array_module(W) is not np:
        if max(W.shape[-2:]) <= SMALL_SVD_KERNEL_MAX:
            return _small_svd_kernel(array_module(W), W)
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


SMALL_SVD_KERNEL_MAX = 16     # GPU batches of matrices up to this side: _small_svd_kernel


def _small_svd_kernel(cp, W):
    """Reduced SVDs (U, s, V) of a batch of small matrices on the GPU, float64, s
    descending: one CUDA thread per matrix runs one-sided Jacobi (Hestenes) to
    convergence, in one launch, in place of CuPy's batched svd (1.8 vs 3.0 ms for the
    3000 9 x 9 layers of 1000 fig1a networks on an H200; SMALL_SVD_KERNEL_MAX = 0 goes
    back to it).  One-sided Jacobi rotates the columns of A until every pair is orthogonal to
    rounding relative to their norms, so U is orthonormal and the singular values have
    small relative errors (Demmel and Veselic 1992); exactly zero columns are completed
    with coordinate vectors, as _complete does on the host."""
    wide = W.shape[-2] < W.shape[-1]
    A = cp.ascontiguousarray(_T(W) if wide else W, dtype=np.float64)   # m x n, m >= n
    nb, m, n = A.shape
    U, s, V = A.copy(), cp.empty((nb, n), dtype=np.float64), cp.empty((nb, n, n), dtype=np.float64)
    kernel = _raw_kernel(cp, _SMALL_SVD_SOURCE, "small_svd")
    _launch_per_item(kernel, nb if n else 0, (U, s, V, np.int32(nb), np.int32(m), np.int32(n)))
    return (V, s, U) if wide else (U, s, V)


SMALL_SVD_MAX_SWEEPS = 40     # quadratic convergence: 16 x 16 matrices take ~10, graded ones ~15
_SMALL_SVD_SOURCE = r"""
extern "C" __global__ void small_svd(double* U, double* s, double* V,
                                     const int nb, const int m, const int n) {
    // Matrix b (m x n, m >= n, in U on entry): rotate pairs of its columns, and of V
    // (from the identity), until each pair p, q has |u_p . u_q| <= m eps |u_p| |u_q|;
    // then s_j = |u_j|, sorted descending with the columns, and u_j / s_j.  A column
    // that is exactly zero becomes the coordinate vector farthest from the columns
    // before it, made orthogonal to them.  (After MAX_SWEEPS, never reached in the tests,
    // A V = U diag(s) still holds: the rotations are orthogonal.)
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nb) return;
    double* u = U + (long long)b * m * n;
    double* v = V + (long long)b * n * n;
    double* sv = s + (long long)b * n;
    const double tol = m * 2.220446049250313e-16;
    double scale = 0.0;                          // entries scaled to at most 1: no under-
    for (int i = 0; i < m * n; i++)              // or overflow in the sums of squares
        scale = fabs(u[i]) > scale ? fabs(u[i]) : scale;
    for (int i = 0; i < m * n && scale > 0.0; i++) u[i] /= scale;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[i * n + j] = i == j ? 1.0 : 0.0;
    bool rotated = true;
    for (int sweep = 0; rotated && sweep < MAX_SWEEPS; sweep++) {
        rotated = false;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double alpha = 0.0, beta = 0.0, gamma = 0.0;
                for (int i = 0; i < m; i++) {
                    const double x = u[i * n + p], y = u[i * n + q];
                    alpha += x * x; beta += y * y; gamma += x * y;
                }
                if (fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) continue;
                rotated = true;
                const double zeta = (beta - alpha) / (2.0 * gamma);
                const double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                const double c = 1.0 / sqrt(1.0 + t * t), sn = c * t;
                for (int i = 0; i < m; i++) {
                    const double x = u[i * n + p], y = u[i * n + q];
                    u[i * n + p] = c * x - sn * y; u[i * n + q] = sn * x + c * y;
                }
                for (int i = 0; i < n; i++) {
                    const double x = v[i * n + p], y = v[i * n + q];
                    v[i * n + p] = c * x - sn * y; v[i * n + q] = sn * x + c * y;
                }
            }
    }
    for (int j = 0; j < n; j++) {
        double norm = 0.0;
        for (int i = 0; i < m; i++) norm += u[i * n + j] * u[i * n + j];
        sv[j] = sqrt(norm);
    }
    for (int j = 0; j < n; j++) {                         // selection sort, descending
        int top = j;
        for (int k = j + 1; k < n; k++) if (sv[k] > sv[top]) top = k;
        if (top == j) continue;
        const double x = sv[j]; sv[j] = sv[top]; sv[top] = x;
        for (int i = 0; i < m; i++) { const double y = u[i * n + j]; u[i * n + j] = u[i * n + top]; u[i * n + top] = y; }
        for (int i = 0; i < n; i++) { const double y = v[i * n + j]; v[i * n + j] = v[i * n + top]; v[i * n + top] = y; }
    }
    for (int j = 0; j < n; j++) {
        if (sv[j] > 0.0) {
            for (int i = 0; i < m; i++) u[i * n + j] /= sv[j];
            continue;
        }
        int best = 0;                                     // zero: complete (columns < j are
        double far = -1.0;                                // orthonormal; zero ones follow)
        for (int e = 0; e < m; e++) {                     // |e_e - P e_e|^2 = 1 - sum_k u_ek^2
            double near = 0.0;
            for (int k = 0; k < j; k++) near += u[e * n + k] * u[e * n + k];
            if (1.0 - near > far) { far = 1.0 - near; best = e; }
        }
        for (int i = 0; i < m; i++) u[i * n + j] = i == best ? 1.0 : 0.0;
        for (int pass = 0; pass < 2; pass++)              // twice: orthogonal to rounding
            for (int k = 0; k < j; k++) {
                double dot = 0.0;
                for (int i = 0; i < m; i++) dot += u[i * n + k] * u[i * n + j];
                for (int i = 0; i < m; i++) u[i * n + j] -= dot * u[i * n + k];
            }
        double norm = 0.0;
        for (int i = 0; i < m; i++) norm += u[i * n + j] * u[i * n + j];
        for (int i = 0; i < m; i++) u[i * n + j] /= sqrt(norm);
    }
    for (int j = 0; j < n; j++) sv[j] *= scale;
}
""".replace("MAX_SWEEPS", str(SMALL_SVD_MAX_SWEEPS))


def _reduced_svds(weights, keep=False):
    """[_reduced_svd(W, keep) for W in weights], in one call when small layers (or a GPU
    batch's) share a shape (batched LAPACK on the host; GPU solvers do large layers one
    by one faster)."""
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


def _cluster_bounds(s, rtol, scale):
    """Starts and sizes of the runs of descending values s equal up to rtol * scale."""
    starts = np.flatnonzero(np.abs(np.diff(s)) > rtol * scale) + 1
    starts = np.concatenate([[0], starts]) if s.size else starts
    return starts, np.diff(np.append(starts, s.size))


def _clusters(s, rtol, scale=None):
    """Index groups of descending values equal up to rtol * scale (default: the largest)."""
    if s.size == 0:
        return []
    starts, _ = _cluster_bounds(s, rtol, s[0] if scale is None else scale)
    return np.split(np.arange(s.size), starts[1:])


def _adapt_clusters(M, a_bounds, b_sizes):
    """Rotate A's directions inside each A-cluster to the basis B's clusters split it into.

    M = A^T B; a_bounds = (starts, sizes) of A's clusters, b_sizes those of B's.  In
    a cluster of equal singular values any orthonormal basis is a valid set of
    singular vectors; the eigenvectors of the compression of sum_b w_b P_{F_b}
    (distinct weights w_b, F_b the B-clusters and the complement of span(B)) lie
    each in one F_b whenever the cluster splits so.
    """
    M = M.copy()
    weights = np.repeat(1.0 + np.sqrt(2.0) * np.arange(1, b_sizes.size + 1) % 1.0, b_sizes)
    starts, sizes = a_bounds
    for size in np.unique(sizes[sizes > 1]):          # clusters of one size in one batched eigh
        rows = starts[sizes == size][:, None] + np.arange(size)
        block = M[rows]                                             # (clusters, size, q)
        compression = (block * weights) @ _T(block) + 0.5 * (np.eye(size) - block @ _T(block))
        M[rows] = _T(np.linalg.eigh(compression)[1]) @ block
    return M


def _greedy_match(C, capacity):
    """The matching of the paired measure (alignment(), Section 6): one-to-one (rows)
    to capacitated columns, greedy by decreasing C >= 0:
    the entries in decreasing order, ties in row-major order, each taken when its row
    is free and its column has room.  C may hold a batch (B x p x m); capacity: (m,)
    or (B, m).  Returns the matched value of each row (0 where no column had room).

    Small inputs go entry by entry (GREEDY_ONE_BY_ONE_MAX entries at most), batches of
    matrices with few rows by taking every matrix's largest open entry p times; larger
    ones in vectorised rounds: a free row takes its best open entry when fewer than
    the column's room entries of free rows come before that entry in the order (the
    one-by-one greedy then takes it too, whatever it does before), so each round
    takes at least the first open entry of all.  On a GPU one CUDA thread per matrix
    takes the best open entry as long as one is left (_greedy_kernel).
    """
    xp = array_module(C)
    single = C.ndim == 2
    C = C[None] if single else C
    nb, p, m = C.shape
    room = xp.broadcast_to(xp.asarray(capacity, dtype=np.int64), (nb, m)).copy()
    if xp is not np:
        value = (_greedy_kernel(xp, C, room) if p * p * m <= GREEDY_KERNEL_MAX else
                 _greedy_rounds(C, room))
    else:
        if C.size > GREEDY_ONE_BY_ONE_MAX:
            C, room = _without_zero_columns(C, room)
        value = (_greedy_one_by_one if C.size <= GREEDY_ONE_BY_ONE_MAX else
                 _greedy_by_maxima if p <= GREEDY_BY_MAXIMA_ROWS else _greedy_rounds)(C, room)
    return value[0] if single else value


def _without_zero_columns(C, room):
    """C and room without the columns that are zero in every matrix (unless C holds a NaN):
    their entries come after every positive one, so taking them changes no row's value."""
    top = C.max(axis=(0, 1))
    keep = top != 0
    if keep.all() or np.isnan(top).any():
        return C, room
    return C[:, :, keep], room[:, keep]


GREEDY_ONE_BY_ONE_MAX = 1024
GREEDY_BY_MAXIMA_ROWS = 16      # batches of matrices with at most this many rows: p passes
GREEDY_KERNEL_MAX = 1 << 22     # p * p * m, one CUDA thread's work for a p x m matrix


def _greedy_by_maxima(C, room):
    """_greedy_match for a batch of matrices with few rows (NumPy, no NaN): p times, every
    matrix takes its largest open entry, the first in row-major order among equal ones,
    which is the entry the one-by-one greedy takes next.  One pass costs a few array
    operations, where a round of _greedy_rounds costs ~30 (thousands of fig1a networks)."""
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


def _greedy_kernel(cp, C, room):
    """_greedy_match on the GPU: one CUDA thread per matrix, in one launch (the rounds
    take ~30 array operations and a wait for the GPU each)."""
    nb, p, m = C.shape
    C, value = cp.ascontiguousarray(C, dtype=np.float64), cp.empty((nb, p), dtype=np.float64)
    kernel = _raw_kernel(cp, _GREEDY_SOURCE, "greedy_match")
    _launch_per_item(kernel, nb if p else 0, (C, cp.ascontiguousarray(room, dtype=np.int64), value,
                                              np.int32(nb), np.int32(p), np.int32(m)))
    return value


_GREEDY_SOURCE = r"""
extern "C" __global__ void greedy_match(const double* C, long long* room, double* value,
                                        const int nb, const int p, const int m) {
    // Matrix b: as long as a row is free and a column has room, take the largest entry
    // of a free row and a column with room, the first in row-major order among equal
    // ones (NaN last): the entry the one-by-one greedy takes next.  value[r] == -1
    // marks a free row (entries are >= 0 or NaN); room is written.
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nb) return;
    const double* c = C + (long long)b * p * m;
    long long* cap = room + (long long)b * m;
    double* v = value + (long long)b * p;
    long long open = 0;
    for (int j = 0; j < m; j++) open += cap[j] > 0 ? cap[j] : 0;
    for (int r = 0; r < p; r++) v[r] = -1.0;
    for (long long left = open < p ? open : p; left > 0; left--) {
        int best = -1;
        double top = 0.0;
        for (int r = 0; r < p; r++) {
            if (v[r] != -1.0) continue;
            for (int j = 0; j < m; j++) {
                const double x = c[r * m + j];
                if (cap[j] > 0 && (best < 0 || x > top || (top != top && x == x))) {
                    best = r * m + j;
                    top = x;
                }
            }
        }
        v[best / m] = top;
        cap[best % m] -= 1;
    }
    for (int r = 0; r < p; r++)
        if (v[r] == -1.0) v[r] = 0.0;
}
"""


def _greedy_one_by_one(C, room, free=None):
    """_greedy_match entry by entry, as its docstring states the rule (rows ``free``)."""
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
    """_greedy_match in vectorised rounds (see there), each on the networks, rows and
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


@dataclasses.dataclass
class _Pair:
    """Two sets of orthonormal directions that a measure compares: the columns of A
    and of B, singular values sa and sb descending, in a space of dimension k (given
    in the coordinates of any subspace that holds both: only inner products count).

    ``exact`` directions common to both were left out of A and B, ``exact_used`` of
    them used; each is a perfect match (layer 1's static directions in training, see
    ``_split_first_layers``).  scale_a, scale_b: the largest singular values, those
    left out included (default: sa[0], sb[0]).  The matched rule scores B's
    directions when ``rows_b``, else A's; ``positions`` as in :func:`alignment`.
    Arrays may carry a batch axis.
    """
    A: np.ndarray
    sa: np.ndarray
    B: np.ndarray
    sb: np.ndarray
    k: int
    rows_b: bool
    positions: int = None
    exact: int = 0
    exact_used: int = 0
    scale_a: np.ndarray = None
    scale_b: np.ndarray = None

    def __post_init__(self):
        self.product = _T(self.A) @ self.B          # A^T B, shared by both rules


def _paired_match(pair, rtol):
    """Sum of matched cosines for the used directions of the pair's smaller side, and
    their count (the left-out exact directions count 1 each).

    Used directions have sigma > rtol * sigma_max.  Inside each cluster of
    singular values equal up to rtol * sigma_max the smaller side's directions are
    rotated to the basis the other side's clusters split the cluster into; then each
    direction is matched one to one (greedily by decreasing cosine) to a cluster of
    the other side or to the complement of its span, each taking at most its
    dimension of directions; the cosine with a cluster is the norm of the projection
    onto it.  With ``positions`` (max(k_{i-1}, k_{i+1}) for adjacent layers) the
    complement takes at most positions - q: directions used by either layer need a
    position below that in a shared usSVD (Definition 2's rectangular Sigma_i).
    """
    top = lambda scale, s: scale if scale is not None else (s[0] if s.size else 0.0)
    scale_a, scale_b = top(pair.scale_a, pair.sa), top(pair.scale_b, pair.sb)
    ua, ub = pair.sa > rtol * scale_a, pair.sb > rtol * scale_b
    M, sa, sb = pair.product[ua][:, ub], pair.sa[ua], pair.sb[ub]
    if M.shape[0] > M.shape[1]:
        M, sa, sb, scale_a, scale_b = M.T, sb, sa, scale_b, scale_a
    p, q = M.shape
    if p == 0:
        return float(pair.exact_used), pair.exact_used
    starts, sizes = _cluster_bounds(sb, rtol, scale_b)
    M = _adapt_clusters(M, _cluster_bounds(sa, rtol, scale_a), sizes)
    sq = M * M
    in_b = np.add.reduceat(sq, starts, axis=1) if q else np.zeros((p, 0))
    outside = np.clip(1.0 - sq.sum(axis=1, keepdims=True), 0.0, 1.0)
    C = np.sqrt(np.clip(np.concatenate([in_b, outside], axis=1), 0.0, 1.0))
    k = pair.k - pair.exact_used
    capacity = np.append(sizes, max(0, min(k, pair.positions or k) - q))
    return float(_greedy_match(C, capacity).sum()) + pair.exact_used, p + pair.exact_used


def _paired_score(pairs, rtol):
    """Mean matched cosine over the smaller side of each pair (see _paired_match)."""
    total, count = 0.0, 0
    for pair in pairs:
        t, c = _paired_match(pair, rtol)
        total, count = total + t, count + c
    return total / count if count else 1.0


def _matched_score(pairs):
    """The authors' rule: for each scored direction the largest |cosine| with the
    other side, summed over all pairs / the directions (one value per network)."""
    total, count, groups = 0.0, 0, {}
    for pair in pairs:                       # pairs of one shape and side: one reduction
        M = pair.product if pair.rows_b else _T(pair.product)     # scored directions: columns
        if M.size:
            groups.setdefault(M.shape, []).append(M)
            count += M.shape[-1]
        total, count = total + pair.exact, count + pair.exact
    for Ms in groups.values():
        xp = array_module(*Ms)
        total = total + abs(xp.stack(Ms)).max(axis=-2).sum(axis=(0, -1))
    return total / count if count else 1.0


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
            k = pair.k - pair.exact_used          # as _paired_match (here every direction is used)
            groups.setdefault((p, q, max(0, min(k, pair.positions or k) - q)), []).append((j, M))
            totals[j], counts[j] = totals[j] + pair.exact_used, counts[j] + p + pair.exact_used
    for (p, q, room), members in groups.items():
        xp = array_module(members[0][1])                          # (a batch on the GPU stays)
        sq = xp.stack([M for _, M in members]) ** 2               # (pairs, [batch,] p, q)
        if room:                                                  # the complement of B's span
            outside = xp.clip(1.0 - sq.sum(axis=-1, keepdims=True), 0.0, 1.0)
            sq = xp.concatenate([sq, outside], axis=-1)
        C = xp.sqrt(xp.clip(sq, 0.0, 1.0))
        value = _greedy_match(C.reshape((-1,) + C.shape[-2:]), [1] * q + ([room] if room else []))
        value = value.reshape(C.shape[:-1]).sum(axis=-1)           # (pairs, [batch])
        for (j, _), v in zip(members, value):
            totals[j] = totals[j] + v
    return [t / c if c else 1.0 for t, c in zip(totals, counts)]


HOW = ("paired", "matched")


def _check_how(how):
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")


def alignment(weights, how="paired", rtol=1e-6):
    """Alignment of adjacent layers (Section 6), in [0, 1]; 1 for aligned networks.

    how="paired" (the paper's "average |dot| between corresponding columns of
    U_i and V_{i+1}", made exact): for each adjacent pair take the directions the
    layers use (left singular vectors of W_i, right singular vectors of W_{i+1},
    sigma > rtol * sigma_max).  Singular values equal up to rtol form one subspace.
    The layer with fewer used directions is scored: its directions are matched one
    to one, greedily by decreasing principal cosine, to the subspaces of the other
    layer and to the complement of what that layer uses (each subspace takes at
    most its dimension); the score is the mean matched cosine over all pairs.  It is
    1 exactly when W_i W_i^T and W_{i+1}^T W_{i+1} commute, i.e. when the pair
    is aligned for every order, sign and multiplicity of the singular values
    (for rectangular layers the complement also has only max(k_{i-1}, k_{i+1})
    minus the other layer's rank positions to offer, see :func:`is_aligned`).  The
    score is about adjacent pairs: with repeated singular values in a middle layer
    every pair can be aligned while the chain is not; :func:`is_aligned` decides that.

    how="matched" (the authors' code): reduced SVDs, M = V_{i+1}^T U_i, for each
    row of M the largest |entry|, summed over all pairs and divided by the rows.
    """
    _check_how(how)
    check_network(weights)
    return _alignment_of(_reduced_svds(weights), how, rtol)


def _widths(svds):
    """[k_0, k_1, ..., k_d] from the layers' reduced SVDs [(U, s, V), ...]."""
    return [svds[0][2].shape[-2]] + [U.shape[-2] for U, _, _ in svds]


def _alignment_pairs(svds, widths):
    """(U_i, V_{i+1}) for the adjacent layers, from reduced SVDs [(U, s, V), ...]."""
    return [_Pair(svds[i][0], svds[i][1], svds[i + 1][2], svds[i + 1][1], widths[i + 1],
                  rows_b=True, positions=max(widths[i], widths[i + 2]))
            for i in range(len(svds) - 1)]


def _alignment_of(svds, how, rtol):
    """alignment() from the layers' reduced SVDs [(U, s, V), ...]."""
    pairs = _alignment_pairs(svds, _widths(svds))
    return _matched_score(pairs) if how == "matched" else _paired_score(pairs, rtol)


def invariance(weights_t, weights_0, how="paired", rtol=1e-6):
    """Invariance of the singular vectors (Section 6), in [0, 1].

    Compares U_i(t) with U_i(0) for i < d and V_i(t) with V_i(0) for i > 1 by the
    rule of :func:`alignment` (``how`` = "paired" or "matched").
    """
    _check_how(how)
    check_network(weights_t)
    check_network(weights_0)
    return _invariance_of(_reduced_svds(weights_t), _reduced_svds(weights_0), how, rtol)


def _invariance_pairs(now, then, widths, rtol, static=None):
    """(U_i(t), U_i(0)) for i < d and (V_i(t), V_i(0)) for i > 1.

    ``static``: masks of layer 1's static directions now and then when layer 1
    comes from ``_split_first_layers`` (its U in the coordinates of Q, zero for the
    static directions, which are the same vectors at both times): they are left out
    as exact matches.  None when that is not exact (a static direction used at one
    time only)."""
    d = len(now)
    sides = [(i, 0) for i in range(d - 1)] + [(i, 2) for i in range(1, d)]
    pairs = [_Pair(now[i][side], now[i][1], then[i][side], then[i][1],
                   widths[i + 1] if side == 0 else widths[i], rows_b=False)
             for i, side in sides if not (static and i == side == 0)]
    if static and d > 1:
        (U, s, _), (U0, s0, _), (mask, mask0) = now[0], then[0], static
        used, used0 = int((s[mask] > rtol * s[0]).sum()), int((s0[mask0] > rtol * s0[0]).sum())
        if used != used0:
            return None
        pairs.append(_Pair(U[:, ~mask], s[~mask], U0[:, ~mask0], s0[~mask0], widths[1], rows_b=False,
                           exact=int(mask.sum()), exact_used=used, scale_a=s[0], scale_b=s0[0]))
    return pairs


def _invariance_of(now, then, how, rtol):
    """invariance() from reduced SVDs of the layers now and at the start."""
    pairs = _invariance_pairs(now, then, _widths(now), rtol)
    return _matched_score(pairs) if how == "matched" else _paired_score(pairs, rtol)


def tracker(weights_0, rtol=1e-6):
    """A measure for :func:`train`: ``m(weights, _)`` returns alignment and invariance
    (Section 6) by both rules, {"alignment_paired", "alignment_matched", "invariance_paired",
    "invariance_matched"}, with one SVD per layer (those of weights_0 computed once).

    ``m.from_svds(now, then=None, widths=None, static=None)`` measures from reduced
    SVDs (float64, host) instead, e.g. layer 1 split by ``_split_first_layers``;
    it returns None when that split cannot be measured exactly.  ``m.starts_at(ws)``:
    whether ws are weights_0 (then :func:`train` may measure from the split).
    """
    check_network(weights_0)
    keep = weights_0[0].ndim == 3 and weights_0[0].shape[0] >= GPU_BATCH_MIN   # on a GPU: stays
    start = _reduced_svds(weights_0, keep)
    start_generic = _generic(start, rtol)

    def from_svds(now, then=None, widths=None, static=None):
        generic = _generic(now, rtol) & (start_generic if then is None else _generic(then, rtol))
        then = start if then is None else then
        widths = widths or _widths(now)
        if now[0][1].ndim == 1:
            return _measures(now, then, widths, rtol, static, bool(generic))
        values = _measures(now, then, widths, rtol, generic=True)        # every network
        is_generic, *rows = _to_host([generic] + [values[key] for key in MEASURE_KEYS])
        out, others = dict(zip(MEASURE_KEYS, rows)), np.flatnonzero(is_generic == 0)
        if others.size:                          # repeated or zero singular values: one by one
            flat = _to_host([a for svd in now + then for a in svd], others)
            svds = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
            for j, b in enumerate(others):
                one = [tuple(a[j] for a in svd) for svd in svds]
                for key, value in _measures(one[:len(now)], one[len(now):], widths, rtol).items():
                    out[key][b] = value
        return out

    def measure(weights, _=None):
        return from_svds(_reduced_svds(weights, keep))

    def starts_at(weights):
        return len(weights) == len(weights_0) and all(
            a is b or (a.shape == b.shape and bool((a == b).all())) for a, b in zip(weights, weights_0))
    measure.from_svds, measure.starts_at = from_svds, starts_at
    return measure


def _measures(now, then, widths, rtol, static=None, generic=None):
    """The four measures from reduced SVDs now and at the start (None: see
    _invariance_pairs); the vectorised rule when all singular values are distinct."""
    invariant = _invariance_pairs(now, then, widths, rtol, static)
    if invariant is None:
        return None
    aligned = _alignment_pairs(now, widths)
    if generic is None:
        generic = bool(_generic(now, rtol) and _generic(then, rtol))
    paired = _paired_generic(aligned, invariant) if generic else \
        (_paired_score(aligned, rtol), _paired_score(invariant, rtol))
    values = {"alignment_paired": paired[0], "alignment_matched": _matched_score(aligned),
              "invariance_paired": paired[1], "invariance_matched": _matched_score(invariant)}
    return values if generic is True and now[0][1].ndim > 1 else \
        {key: float(v) for key, v in values.items()}


# Batches of at least this many networks are measured where they are (on a GPU: there).
GPU_BATCH_MIN = 64

MEASURE_KEYS = ("alignment_paired", "alignment_matched", "invariance_paired", "invariance_matched")


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
        top = s[..., :1]
        good = (s[..., -1] > rtol * top[..., 0]) & (abs(xp.diff(s, axis=-1)) > rtol * top).all(axis=-1)
        ok = ok & (good.all(axis=0) if stacked else good)
    return ok


# -------------------------------------------------- exact test of Def. 2 --

@dataclasses.dataclass
class AlignmentTest:
    """Result of :func:`is_aligned`: truthy when aligned.

    ``ussvds`` is [(U_1, s_1, V_1), ..., (U_d, s_d, V_d)], usSVDs of the layers with
    U_i = V_{i+1} (Definition 2), whenever a witness could be built; ``residual``
    is max_i |off-diagonal of U_i^T W_i V_i| / ||W_i||_2 for that witness.
    """
    aligned: bool
    residual: float
    reason: str
    ussvds: list = None

    def __bool__(self):
        return bool(self.aligned)


def _orth_complement(Q, k):
    """Orthonormal basis of span(Q)^perp in R^k (Q with orthonormal columns)."""
    if Q.shape[1] == 0:
        return np.eye(k)
    return np.linalg.qr(Q, mode="complete")[0][:, Q.shape[1]:]


def _nearest_orthonormal(Z):
    """Polar factor of Z: the orthonormal matrix nearest to Z (columns kept in order)."""
    if Z.shape[1] == 0:
        return Z
    U, _, Vt = np.linalg.svd(Z, full_matrices=False)
    return U @ Vt


def _joint_eigenbasis(C, operators, tol):
    """Split span(C) into joint eigenvectors of symmetric ``operators`` (||op|| = 1)."""
    groups = [C]
    for F in operators:
        refined = []
        for G in groups:
            if G.shape[1] < 2:
                refined.append(G)
                continue
            w, E = np.linalg.eigh(G.T @ F @ G)
            for idx in _clusters(w[::-1], tol, scale=1.0):
                refined.append(G @ E[:, ::-1][:, idx])
        groups = refined
    return [g[:, j] for g in groups for j in range(g.shape[1])]


def _forward_grams(Ws, i):
    """(W_l ... W_{i+1})^T (W_l ... W_{i+1}) / its norm, for l = i+1..d (space i)."""
    grams, P = [], None
    for W in Ws[i:]:
        P = W if P is None else W @ P
        G = P.T @ P
        scale = np.linalg.norm(G, 2)
        if scale > 0:
            grams.append(G / scale)
    return grams


def _strings(Ws, tol):
    """Decompose the chain of layers into 1-D strings: [(start, end, [vector per space])].

    A string is a unit vector q_a in space a with W_{a+1} q_a = s q_{a+1}, ... up to
    space ``end``; in an aligned network the spaces split orthogonally into strings
    (Krull-Schmidt for a chain of maps), which are joint eigenvectors of the
    forward Gram operators at their start.
    """
    widths = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    strings, alive = [], []
    for i, k in enumerate(widths):
        continuing = []
        if i:
            W = Ws[i - 1]
            Q = np.stack([strings[s][2][-1] for s in alive], axis=1) if alive \
                else np.zeros((W.shape[1], 0))
            Z = W @ Q
            norms = np.linalg.norm(Z, axis=0)
            keep = norms > tol * max(np.linalg.norm(W, 2), np.finfo(float).tiny)
            for s, kept in zip(alive, keep):
                if not kept:
                    strings[s][1] = i - 1
            continuing = [s for s, kept in zip(alive, keep) if kept]
            Qn = _nearest_orthonormal(Z[:, keep] / norms[keep])
            for j, s in enumerate(continuing):
                strings[s][2].append(Qn[:, j])
            C = _orth_complement(Qn, k)
        else:
            C = np.eye(k)
        fresh = []
        for q in _joint_eigenbasis(C, _forward_grams(Ws, i), tol):
            strings.append([i, None, [q]])
            fresh.append(len(strings) - 1)
        alive = continuing + fresh
    for s in alive:
        strings[s][1] = len(widths) - 1
    return strings, widths


def _assign_indices(intervals, widths, max_nodes=200_000):
    """Positions 0..k_i-1 for strings so that each space's positions are distinct.

    A string spanning spaces a..b needs one position below min(k_a..k_b) in every
    space it crosses (Sigma_i is rectangular diagonal).  Greedy by capacity, then
    exhaustive search; None when impossible.
    """
    caps = [min(widths[a:b + 1]) for a, b in intervals]
    order = sorted(range(len(intervals)),
                   key=lambda s: (caps[s], intervals[s][0] - intervals[s][1], intervals[s][0]))
    taken = [set() for _ in widths]
    index = [None] * len(intervals)
    nodes = [0]

    def place(pos):
        if pos == len(order):
            return True
        nodes[0] += 1
        if nodes[0] > max_nodes:
            raise RuntimeError("is_aligned: position assignment search too large to decide")
        s = order[pos]
        a, b = intervals[s]
        for j in range(caps[s]):
            if all(j not in taken[i] for i in range(a, b + 1)):
                for i in range(a, b + 1):
                    taken[i].add(j)
                index[s] = j
                if place(pos + 1):
                    return True
                for i in range(a, b + 1):
                    taken[i].discard(j)
        return False

    sys.setrecursionlimit(max(sys.getrecursionlimit(), len(order) + 100))
    return index if place(0) else None


def is_aligned(weights, tol=1e-8):
    """Exact test of Definition 2: do usSVDs W_i = U_i Sigma_i V_i^T with U_i = V_{i+1} exist?

    Decides up to the relative tolerance ``tol`` (use about 1e-4 for float32
    weights), for any order, sign and multiplicity of singular values, zero
    singular values and rectangular widths.  The chain is split into strings of
    singular vectors (see ``_strings``); the strings must then be given positions
    so that every Sigma_i is rectangular diagonal: for rectangular layers this is
    a real constraint (e.g. W_1 = e_1 (3x1), W_2 = e_2^T (1x3): W_1 W_1^T and
    W_2^T W_2 commute, yet no usSVDs share their first column), so commuting
    Gram matrices are necessary but not sufficient.  Returns an AlignmentTest
    (truthy when aligned) holding the witnessing usSVDs.
    """
    check_network(weights)
    if any(W.ndim != 2 for W in weights):
        raise ValueError("is_aligned takes one network (2-D weights); loop over a batch")
    Ws = [to_numpy(W).astype(np.float64) for W in weights]
    strings, widths = _strings(Ws, tol)
    index = _assign_indices([(a, b) for a, b, _ in strings], widths)
    if index is None:
        return AlignmentTest(False, math.inf, "no positions make every Sigma_i "
                             "rectangular diagonal (rectangular widths)")
    Q = [np.zeros((k, k)) for k in widths]
    for (a, _, vectors), j in zip(strings, index):
        for i, q in enumerate(vectors, start=a):
            Q[i][:, j] = q
    ussvds, residual, worst = [], 0.0, 0
    for i, W in enumerate(Ws, start=1):
        S = Q[i].T @ W @ Q[i - 1]
        r = min(S.shape)
        s = np.diagonal(S)[:r].copy()
        S[np.arange(r), np.arange(r)] = 0.0
        scale = np.linalg.norm(W, 2)
        res = float(np.abs(S).max() / scale) if scale > 0 and S.size else 0.0
        if res > residual:
            residual, worst = res, i
        ussvds.append((Q[i], s, Q[i - 1]))
    ok = residual <= tol
    reason = "" if ok else (f"W_{worst} is off-diagonal by {residual:.3g} (relative) in "
                            f"the best shared singular vectors")
    return AlignmentTest(ok, residual, reason, ussvds)


def rect_diag(s, m, n):
    """The m x n rectangular diagonal matrix with diagonal s (len(s) <= min(m, n)): the
    Sigma_i of Definition 1 and Eq. (3)."""
    xp = array_module(s)
    S = xp.zeros((m, n), dtype=s.dtype)
    r = s.shape[-1]
    S[xp.arange(r), xp.arange(r)] = s
    return S


def aligned_network(bases, sigmas):
    """W_i = Q_i Sigma_i Q_{i-1}^T: an aligned network (Definition 2) by construction.

    bases: orthonormal [Q_0 (k0 x k0), ..., Q_d (kd x kd)]; sigmas[i-1]: the
    min(k_i, k_{i-1}) signed singular values of W_i, in any order.
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


# ====================================================== theory, Sections 4 ==

@dataclasses.dataclass
class Certificate:
    """Result of :func:`invariance_certificate` (Theorem 1 / Theorem 4, Lemma 2).

    When ``ok``: U (kd x kd), V (k0 x k0) orthonormal with U^T Y X^T V and
    V^T X X^T V block diagonal, their top-left r x r blocks diag(lam_prime) and
    diag(lam); ``residual`` is the largest off-block entry relative to the norms.
    ``violation`` measures how far the data are from the condition (0 when ok).
    """
    ok: bool
    r: int
    U: np.ndarray = None
    V: np.ndarray = None
    lam: np.ndarray = None
    lam_prime: np.ndarray = None
    residual: float = math.inf
    violation: float = 0.0

    def __bool__(self):
        return bool(self.ok)


def _null_basis(A, tol, scale):
    """Orthonormal basis of the null space of A (singular values <= tol * scale)."""
    _, s, Vt = np.linalg.svd(A, full_matrices=True)
    rank = int((s > tol * scale).sum())
    return Vt[rank:].T


def _joint_eigenvectors(S, G, tol):
    """Unit vectors v with S v = lambda v and G v = mu v (S, G symmetric).

    In each eigenspace E of S, the largest G-invariant subspace is found by
    repeatedly keeping {v in K : G v in K}; G is diagonal on what remains.
    """
    w, E = np.linalg.eigh(S)
    scale_g = max(np.linalg.norm(G, 2), np.finfo(float).tiny)
    found = []
    for idx in _clusters(w[::-1], tol, scale=max(abs(w).max(), np.finfo(float).tiny)):
        K = E[:, ::-1][:, idx]
        while K.shape[1]:
            GK = G @ K
            outside = GK - K @ (K.T @ GK)
            if np.linalg.norm(outside, 2) <= tol * scale_g:
                break
            N = _null_basis(outside, tol, scale_g)
            if N.shape[1] == K.shape[1]:
                break
            K = K @ N
        if K.shape[1]:
            mu, R = np.linalg.eigh(K.T @ G @ K)
            found.extend((K @ R).T)
    return np.array(found).reshape(-1, S.shape[0]).T


def invariance_certificate(X, Y, widths, tol=1e-9):
    """Decide Theorem 4's data condition (Theorem 1 when all widths are equal).

    Looks for orthonormal U (kd x kd), V (k0 x k0) with
    U^T Y X^T V = [[Lambda', 0], [0, A_1]] and V^T X X^T V = [[Lambda, 0], [0, A_2]],
    Lambda, Lambda' diagonal r x r, r = min(widths).  (The paper writes A_1 as
    (k0 - r) x (kd - r); it is (kd - r) x (k0 - r).)  Equivalently r orthonormal
    v_j that are eigenvectors of both X X^T and (Y X^T)^T (Y X^T), with
    u_j = Y X^T v_j / lambda'_j and at most kd - rank(Y X^T) of the lambda'_j zero.
    Works with repeated eigenvalues of X X^T (the basis inside an eigenspace is
    chosen to diagonalise the other matrix), rank-deficient X and n < k0.
    Directions are ordered by decreasing lambda'^2 / lambda, zeros last; lambda'
    is made non-negative.  Returns a Certificate (truthy when the condition holds).
    """
    X, Y = to_numpy(X).astype(np.float64), to_numpy(Y).astype(np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"X (k0 x n) and Y (kd x n) need the same n; got {_shape(X)} and {_shape(Y)}")
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
        return Certificate(False, r, violation=_condition_violation(S, G, r))
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
    M = np.abs(M.copy())
    M[r:, r:] = 0.0
    idx = np.arange(min(r, *M.shape))
    M[idx, idx] = 0.0
    return float(M.max()) if M.size else 0.0


def _condition_violation(S, G, r):
    """How far X X^T and (YX^T)^T YX^T are from sharing r eigenvectors (relative).

    For each eigenvector of X X^T (inside repeated eigenspaces, the basis that
    diagonalises the compressed G) the residual ||G v - (v^T G v) v|| / ||G||;
    the r-th smallest of these.
    """
    w, E = np.linalg.eigh(S)
    vecs = []
    for idx in _clusters(w[::-1], 1e-9, scale=max(abs(w).max(), 1e-300)):
        K = E[:, ::-1][:, idx]
        vecs.append(K @ np.linalg.eigh(K.T @ G @ K)[1])
    V = np.concatenate(vecs, axis=1)
    GV = G @ V
    res = np.linalg.norm(GV - V * np.einsum("ij,ij->j", V, GV), axis=0)
    return float(np.sort(res)[r - 1] / max(np.linalg.norm(G, 2), 1e-300))


def sensing_certificate(Ms, tol=1e-9):
    """Matrix sensing (Section 4.2): orthonormal U, V with every U^T M_i V diagonal.

    Ms: n x k x k.  Sensing data y_i = Tr(M_i^T X*) are not of the form (X, Y) of
    Theorem 1, so the condition M_i = U Lambda_i V^T is checked directly: a
    generic combination sum_i c_i M_i gives U, V by its SVD, then each M_i is
    tested.  Returns (ok, U, V, residual).
    """
    Ms = to_numpy(Ms).astype(np.float64)
    c = np.random.default_rng(12345).standard_normal(Ms.shape[0])
    U, _, Vt = np.linalg.svd(np.tensordot(c, Ms, axes=1))
    D = U.T @ Ms @ Vt.T
    off = D.copy()
    idx = np.arange(min(D.shape[1:]))
    off[:, idx, idx] = 0.0
    residual = float(np.abs(off).max() / max(np.abs(Ms).max(), 1e-300))
    return residual <= 1e3 * tol, U, Vt.T, residual


def aligned_init(U, V, widths, sigmas=None, scale=1.0, seed=0, balanced=False,
                 chain=None, dtype=np.float64):
    """Aligned initialisation of Lemma 2 / Theorem 1: W_1 = Q_1 D_1 V^T, W_i = Q_i D_i Q_{i-1}^T,
    W_d = U D_d Q_{d-1}^T, with Q_i = I unless ``chain`` gives [Q_1, ..., Q_{d-1}].

    D_i is rectangular diagonal: ``sigmas`` (a list of d vectors, min(k_i, k_{i-1})
    each) or draws from U(0, scale) with ``seed`` (the authors' choice, scale 1).
    ``balanced`` makes the first r = min(widths) values equal in every layer (the
    d-th root of the drawn product) and zeroes the rest, so that
    W_{i+1}^T W_{i+1} = W_i W_i^T.  U, V: NumPy or CuPy; the result follows them.
    """
    xp = array_module(U, V)
    widths = [int(k) for k in widths]
    d = len(widths) - 1
    if U.shape != (widths[-1],) * 2 or V.shape != (widths[0],) * 2:
        raise ValueError(f"U must be kd x kd = {widths[-1]} x {widths[-1]} and V k0 x k0 = "
                         f"{widths[0]} x {widths[0]}; got {_shape(U)} and {_shape(V)}")
    if sigmas is None:
        rng = np.random.default_rng(seed)
        sigmas = [rng.uniform(0, scale, min(widths[i], widths[i + 1])) for i in range(d)]
    sigmas = [np.asarray(to_numpy(s), dtype=np.float64) for s in sigmas]
    if balanced:
        r = min(widths)
        common = np.abs(np.prod([s[:r] for s in sigmas], axis=0)) ** (1.0 / d)
        sigmas = [np.concatenate([common, np.zeros(s.size - r)]) for s in sigmas]
    inner = chain if chain is not None else [xp.eye(k, dtype=dtype) for k in widths[1:-1]]
    bases = [xp.asarray(V, dtype=dtype)] + [xp.asarray(Q, dtype=dtype) for Q in inner] + \
        [xp.asarray(U, dtype=dtype)]
    return aligned_network(bases, [xp.asarray(s, dtype=dtype) for s in sigmas])


def _others_product(sig):
    """prod_{j != i} sig[..., j, :] for each i, by prefix and suffix products (no division)."""
    xp = array_module(sig)
    ones = xp.ones_like(sig[..., :1, :])
    prefix = xp.cumprod(xp.concatenate([ones, sig[..., :-1, :]], axis=-2), axis=-2)
    suffix = xp.flip(xp.cumprod(xp.flip(xp.concatenate([sig[..., 1:, :], ones], axis=-2),
                                        axis=-2), axis=-2), axis=-2)
    return prefix * suffix


def singular_value_dynamics(sigmas0, lam, lam_prime, lr, n, steps, kind="mse", kd=None,
                            record_every=1):
    """Corollary 1: GD on the top-r singular values of a strongly aligned network.

    sigma_i(t+1) = sigma_i(t) + (lr/n) prod_{j != i} sigma_j(t) (lam' - lam prod_j sigma_j(t)).
    The product over j != i is Appendix B's; Eq. (6) as printed in Section 4.3
    multiplies over all j, which is wrong: differentiating the loss
    (1/2n) sum_k (lam'_k - ...)  with respect to sigma_i removes sigma_i itself.
    sigmas0: (..., d, r) (leading axes: independent runs); lam, lam_prime: (r,) or
    broadcastable.  kind="mse_mean" uses that loss's scale 2/(kd n) for 1/n.
    Returns the trajectory, shape (steps // record_every + 1, ..., d, r).  O(d r) a
    step; on the GPU one thread runs all the steps of a direction
    (``_sv_dynamics_kernel``, same numbers).
    """
    xp = array_module(sigmas0)
    coef = lr / n if kind == "mse" else 2.0 * lr / (kd * n)
    sig = xp.array(sigmas0, dtype=xp.float64)
    lam, lam_prime = xp.asarray(lam, dtype=sig.dtype), xp.asarray(lam_prime, dtype=sig.dtype)
    if xp is not np and sig.shape[-2] <= SV_KERNEL_MAX_DEPTH and \
            all(a.ndim < 2 or a.shape[-2] == 1 for a in (lam, lam_prime)):
        return _sv_dynamics_kernel(xp, sig, lam, lam_prime, coef, steps, record_every)
    out = [sig.copy()]
    for t in range(1, steps + 1):
        others = _others_product(sig)
        total = others[..., :1, :] * sig[..., :1, :]
        sig = sig + coef * others * (lam_prime - lam * total)
        if t % record_every == 0:
            out.append(sig.copy())
    return xp.stack(out)


SV_KERNEL_MAX_DEPTH = 16
_SV_KERNEL_SOURCE = r"""
extern "C" __global__ void sv_dynamics(const double* sig0, const double* lam, const double* lamp,
                                       const double coef, const int d, const long long r,
                                       const long long cols, const long long steps,
                                       const long long every, double* out) {
    // One thread per direction (b, i): the d values sigma_j of column i of network b.
    // The operations of the NumPy loop in its order (compiled without fused
    // multiply-adds), so both give the same numbers.
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long base = (c / r) * d * r + c % r, record = cols * d;
    const double l = lam[c], lp = lamp[c];
    double s[MAX_DEPTH], others[MAX_DEPTH];
    for (int j = 0; j < d; j++) out[base + j * r] = s[j] = sig0[base + j * r];
    for (long long t = 1; t <= steps; t++) {
        double p = 1.0;
        for (int j = 0; j < d; j++) { others[j] = p; p = p * s[j]; }       // prefix products
        p = 1.0;
        for (int j = d - 1; j >= 0; j--) { others[j] = others[j] * p; p = p * s[j]; }
        const double g = lp - l * (others[0] * s[0]);
        for (int j = 0; j < d; j++) s[j] = s[j] + coef * others[j] * g;
        if (t % every == 0)
            for (int j = 0; j < d; j++) out[(t / every) * record + base + j * r] = s[j];
    }
}
""".replace("MAX_DEPTH", str(SV_KERNEL_MAX_DEPTH))


def _sv_dynamics_kernel(cp, sig, lam, lam_prime, coef, steps, record_every):
    """singular_value_dynamics on the GPU: one CUDA thread runs all the steps of one
    direction.  A step is O(d) flops per direction, so launching its ~10 array
    operations step by step would cost microseconds each for nanoseconds of work."""
    batch, (d, r) = sig.shape[:-2], sig.shape[-2:]
    sig = cp.ascontiguousarray(sig)
    lam, lam_prime = (cp.ascontiguousarray(cp.broadcast_to(a, batch + (1, r))) for a in (lam, lam_prime))
    cols = sig.size // d
    out = cp.empty((steps // record_every + 1,) + sig.shape, dtype=sig.dtype)
    kernel = _raw_kernel(cp, _SV_KERNEL_SOURCE, "sv_dynamics", ("--fmad=false",))
    _launch_per_item(kernel, cols, (sig, lam, lam_prime, np.float64(coef), np.int32(d), np.int64(r),
                                    np.int64(cols), np.int64(steps), np.int64(record_every), out))
    return out


def prop2_learning_rate(sigmas0, lam, lam_prime, n):
    """Largest learning rate of Proposition 2 (as its proof, Appendix C, needs it).

    gamma <= (n ln 2 / d) min_k [min_i sigma_k(W_i(0))^2 lam_k / lam'_k^2]: the proof
    bounds prod_{i in T} sigma_i^{-2} by (min_i sigma_i(0))^{-2|T|}, so the minimum
    runs over layers i as well as over k (the statement leaves i free).
    Directions with lam_k = lam'_k = 0 are never updated and do not count.
    sigmas0: (d, r) positive; lam, lam_prime: (r,).
    """
    sig = np.asarray(to_numpy(sigmas0), dtype=np.float64)
    lam, lam_prime = np.asarray(lam, dtype=np.float64), np.asarray(lam_prime, dtype=np.float64)
    d = sig.shape[0]
    live = lam_prime != 0
    return float(n * math.log(2) / d *
                 np.min(sig.min(axis=0)[live] ** 2 * lam[live] / lam_prime[live] ** 2))


def balanced_factorization(P, hidden=None, W=None):
    """Proposition 3: aligned, balanced W_1, W_2 with W_2 W_1 = P and
    ||W_1||_F^2 + ||W_2||_F^2 = 2 ||P||_* (the minimum over all factorisations).

    With P = U Sigma V^T: W_1 = W Sigma^{1/2} V^T, W_2 = U Sigma^{1/2} W^T for any
    orthonormal W (hidden x hidden, default I).  Appendix G prints
    W_1 = W Sigma^{1/2} U^T and W_2 = U Sigma^{1/2} V^T, whose product is not P.
    """
    xp = array_module(P)
    m, n = P.shape
    hidden = min(m, n) if hidden is None else hidden
    if hidden < int(np.linalg.matrix_rank(to_numpy(P))):
        raise ValueError(f"hidden width {hidden} is below rank(P)")
    U, s, Vt = xp.linalg.svd(P, full_matrices=True)
    root = xp.sqrt(s[:min(hidden, s.size)])
    W = xp.eye(hidden, dtype=P.dtype) if W is None else W
    W1 = W @ rect_diag(root, hidden, n) @ Vt
    W2 = U @ rect_diag(root, m, hidden) @ _T(W)
    return W1, W2


def proposition4(weights, X, Y, tol=1e-8):
    """Proposition 4: for an aligned network with Y = f(X) (n >= k0, X full rank),
    W_d^T aligns with M = Y X^T (X X^T)^{-1}, which aligns with W_1^T.

    "A aligns with B" (Definition 2's parenthetical) is the two-layer network
    [B, A] being aligned.  Returns (test of [M, W_d^T], test of [W_1^T, M]).
    """
    X, Y = to_numpy(X).astype(np.float64), to_numpy(Y).astype(np.float64)
    if X.shape[1] < X.shape[0] or np.linalg.matrix_rank(X) < X.shape[0]:
        raise ValueError(f"Proposition 4 needs n >= k0 and X of full rank; X is {_shape(X)} "
                         f"of rank {np.linalg.matrix_rank(X)}")
    M = Y @ X.T @ np.linalg.inv(X @ X.T)
    first, last = to_numpy(weights[0]), to_numpy(weights[-1])
    return is_aligned([M, last.T], tol), is_aligned([first.T, M], tol)
