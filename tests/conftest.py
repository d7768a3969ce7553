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
