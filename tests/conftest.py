"""Shared fixtures: the array backends (NumPy always, CuPy where a GPU is usable), random
problems and the greedy matching's reference."""
import math
import signal

import numpy as np
import pytest

import align
import verify


def _cupy_or_none():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum()
        return cupy
    except Exception:
        return None


CUPY = _cupy_or_none()

# A suite started in the background of a script (``pytest &``, nohup) inherits Ctrl-C
# ignored, and so would the runs that the Ctrl-C tests interrupt: give it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test; CuPy cases skip cleanly without a GPU."""
    if request.param == "cupy":
        if CUPY is None:
            pytest.skip("CuPy with a CUDA GPU is not available")
        return CUPY
    return np


def random_problem(rng, kind, widths, n):
    """Weights of the given widths, X (k0 x n) and targets of the loss ``kind``."""
    weights = [rng.standard_normal((widths[i + 1], widths[i])) / math.sqrt(widths[i])
               for i in range(len(widths) - 1)]
    X = rng.standard_normal((widths[0], n))
    if kind == "ce":
        Y = rng.integers(0, widths[-1], n)
    elif kind in ("logistic", "exp"):
        Y = rng.choice([-1.0, 1.0], (1, n))
    else:
        Y = rng.standard_normal((widths[-1], n))
    return weights, X, Y


def finite_difference(weights, X, Y, kind, i, h=1e-6):
    """dL/dW_i by central differences of align.loss."""
    W = weights[i]
    G = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        old = W[idx]
        W[idx] = old + h
        up = align.loss(weights, X, Y, kind)
        W[idx] = old - h
        down = align.loss(weights, X, Y, kind)
        W[idx] = old
        G[idx] = (up - down) / (2 * h)
    return G


random_orthogonal = verify.orthogonal          # a Haar-random k x k orthogonal matrix


def sequential_greedy(C, capacity):
    """align's reference greedy matching (the rule as its docstring states it)."""
    return align.greedy_match(C, capacity)


def greedy_cases(seed, trials, batch, spoil):
    """Random inputs of the greedy matching with the sequential greedy's values:
    (C, capacity, want) for ``trials`` batches of ``batch`` matrices of up to 11 x 11
    entries in [0, 1), every other batch rounded to one digit (many ties), then changed
    in place by spoil(rng, C, trial); capacities 0-3."""
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        p, m = rng.integers(1, 12, 2)
        C = rng.random((batch, p, m))
        if trial % 2:
            C = np.round(C, 1)
        spoil(rng, C, trial)
        capacity = rng.integers(0, 4, (batch, m))
        yield C, capacity, np.array([sequential_greedy(Cb, cb) for Cb, cb in zip(C, capacity)])
