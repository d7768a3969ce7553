"""Shared fixtures: the array backends (NumPy always, CuPy where a GPU is usable)."""
import numpy as np
import pytest


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


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test; CuPy cases skip cleanly without a GPU."""
    if request.param == "cupy":
        if CUPY is None:
            pytest.skip("CuPy with a CUDA GPU is not available")
        return CUPY
    return np


def random_orthogonal(rng, k):
    """A Haar-random k x k orthogonal matrix."""
    Q, R = np.linalg.qr(rng.standard_normal((k, k)))
    return Q * np.sign(np.diag(R))


def sequential_greedy(C, capacity):
    """The greedy matching as align._greedy_match states it, entry by entry: entries in
    decreasing order (ties row-major, NaN last), each taken when its row is free and its
    column has room.  C: p x m; capacity: (m,)."""
    room, value, free = list(capacity), np.zeros(C.shape[0]), np.ones(C.shape[0], bool)
    for e in np.argsort(-C, axis=None, kind="stable"):
        r, c = divmod(int(e), C.shape[1])
        if free[r] and room[c] > 0:
            free[r], value[r] = False, C[r, c]
            room[c] -= 1
    return value


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
