"""The GPU code paths checked without a GPU: the CUDA kernels' sources against NumPy, run
on the CPU (tests/cuda_on_cpu.py), and the CuPy-parametrised tests on a strict NumPy
stand-in for CuPy (tests/cupy_standin).  On a machine with a GPU the real ones run."""
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import align_cuda
import align_fast
import align
from conftest import CUPY, greedy_cases, sequential_greedy
from cuda_on_cpu import COMPILER, NVRTC, cpu_cupy, nvrtc_log

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to run the CUDA sources")


@pytest.fixture(scope="module")
def cp():
    return cpu_cupy()


def test_greedy_kernel_takes_what_the_sequential_greedy_takes(cp):
    def with_nan(rng, C, trial):
        if trial % 5 == 0:
            C[rng.random(C.shape) < 0.2] = np.nan
    for C, capacity, want in greedy_cases(40, 200, 5, with_nan):
        got = align_cuda.greedy_match(cp, C, capacity.copy())
        np.testing.assert_array_equal(got, want)
    for empty in (np.zeros((0, 3, 4)), np.zeros((2, 0, 4))):      # nothing to launch
        assert align_cuda.greedy_match(cp, empty, np.ones(empty.shape[::2], int)).shape == empty.shape[:2]


def _numpy_seen_as_a_gpu_module():
    """NumPy under another name: align_fast takes its arrays for a GPU's."""
    gpu = types.ModuleType("numpy_not_numpy")
    gpu.__dict__.update(vars(np))
    return gpu


def test_greedy_match_on_a_gpu_batch_uses_the_kernel(cp, monkeypatch):
    """(Up to align_fast.GREEDY_KERNEL_MAX; larger matrices go to the vectorised rounds.)"""
    calls = []
    kernel = lambda xp, C, room: calls.append(C.shape) or align_fast._greedy_one_by_one(C, room)
    monkeypatch.setattr(align_cuda, "greedy_match", kernel)
    monkeypatch.setattr(align_fast, "array_module", lambda *a: cp)
    rng = np.random.default_rng(41)
    C = rng.random((3, 4, 5))
    want = [sequential_greedy(Cb, [1] * 4 + [2]) for Cb in C]
    np.testing.assert_array_equal(align_fast.greedy_match(C, [1] * 4 + [2]), want)
    assert calls == [(3, 4, 5)]
    monkeypatch.setattr(align_fast, "GREEDY_KERNEL_MAX", 4 * 4 * 5 - 1)  # too much for one thread
    monkeypatch.setattr(align_fast, "array_module", lambda *a: _numpy_seen_as_a_gpu_module())
    np.testing.assert_array_equal(align_fast.greedy_match(C, [1] * 4 + [2]), want)
    assert calls == [(3, 4, 5)]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-14), (np.float32, 1e-5)])
def test_small_gemm_kernel_reads_transposed_and_broadcast_operands(cp, dtype, rtol):
    rng = np.random.default_rng(42)
    cublas = types.SimpleNamespace(cupy=cp)
    A, B = rng.standard_normal((7, 5, 6)).astype(dtype), rng.standard_normal((7, 6, 4)).astype(dtype)
    cases = [(A, B), (A.transpose(0, 2, 1).copy().transpose(0, 2, 1), B),      # transposed storage
             (A[0], B), (A, B[0]), (A[2:5, :, 1:], B[2:5, 1:]),                # broadcast, offsets
             (np.swapaxes(B, 1, 2), np.swapaxes(A, 1, 2)), (A[0].T, A[1])]
    for X, Z in cases + [(A[:0], B[:0]), (A[:, :0], B)]:                  # and empty products
        got = align_cuda.DirectCublas._small(cublas, X, Z)
        np.testing.assert_allclose(got, X @ Z, rtol=rtol, atol=rtol)
        assert got.shape == (X @ Z).shape


def test_singular_value_kernel_equals_the_numpy_loop(cp):
    rng = np.random.default_rng(43)
    sig = rng.uniform(0.5, 1.0, (2, 3, 6))                        # two runs, depth 3, six directions
    lam, lam_prime = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    want = align.singular_value_dynamics(sig, lam, lam_prime, 0.05, 10, 300, record_every=7)
    got = align_cuda.sv_dynamics(cp, sig, lam, lam_prime, 0.05 / 10, 300, 7)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    assert abs(got[-1] - sig).max() > 0.01                         # the values did move
    assert align_cuda.sv_dynamics(cp, sig[:, :, :0], lam[:0], lam_prime[:0], 0.005, 3, 1).shape == \
        (4, 2, 3, 0)                                               # no direction: nothing to launch


def _small_svd_cases(rng):
    """Batches that a small-SVD routine must get right: random (square, tall, wide, one
    row or column), rank deficient, zero, clustered, repeated and graded singular
    values, and entries near under- and overflow."""
    orth = lambda k: np.linalg.qr(rng.standard_normal((k, k)))[0]
    with_values = lambda s, count=12: np.stack([orth(s.size) @ np.diag(s) @ orth(s.size).T
                                                for _ in range(count)])
    yield from (rng.standard_normal(shape) for shape in
                [(40, 9, 9), (12, 16, 16), (12, 5, 9), (12, 9, 5), (5, 1, 4), (5, 4, 1)])
    yield rng.standard_normal((12, 9, 3)) @ rng.standard_normal((12, 3, 9))     # rank 3
    zero = np.zeros((3, 4, 4))
    zero[1, 2, 0] = 1.0
    yield zero
    yield with_values(np.array([1, 1, 1, 1 + 1e-12, 1 - 1e-13, 0.5, 0.5, 1e-8, 0]))
    yield with_values(np.ones(9))
    yield with_values(10.0 ** -np.arange(16.0))
    yield with_values(rng.uniform(1, 2, 9)) * 1e-200
    yield with_values(rng.uniform(1, 2, 9)) * 1e200


def test_small_svd_kernel_decomposes_to_rounding(cp):
    rng = np.random.default_rng(44)
    for A in _small_svd_cases(rng):
        U, s, V = align_cuda.small_svd(cp, A)
        r = min(A.shape[1:])
        assert U.shape == A.shape[:2] + (r,) and s.shape == A.shape[:1] + (r,) and \
            V.shape == (A.shape[0], A.shape[2], r)
        top = np.linalg.norm(A, 2, axis=(1, 2))[:, None]
        scale = np.where(top > 0, top, 1.0)
        np.testing.assert_allclose(s / scale, np.linalg.svd(A, compute_uv=False) / scale, rtol=0, atol=1e-14)
        assert (np.diff(s, axis=1) <= 0).all()                              # descending
        for Q in (U, V):                                                    # orthonormal
            np.testing.assert_allclose(np.swapaxes(Q, 1, 2) @ Q, np.broadcast_to(np.eye(r), (len(A), r, r)),
                                       rtol=0, atol=1e-14)
        back = (U * s[:, None, :]) @ np.swapaxes(V, 1, 2)
        np.testing.assert_allclose(back / scale[..., None], A / scale[..., None], rtol=0, atol=1e-14)
    assert align_cuda.small_svd(cp, np.zeros((0, 3, 3)))[1].shape == (0, 3)   # nothing to launch


def test_small_svd_kernel_needs_a_few_sweeps_and_factorises_exactly_at_any_stop(cp, monkeypatch):
    """Stopped after k sweeps, A = U diag(s) V^T with V orthonormal still holds (the
    rotations are orthogonal); U is orthonormal from the sweep that converges, well
    within SMALL_SVD_MAX_SWEEPS for a graded 16 x 16 batch (the slowest seen)."""
    rng = np.random.default_rng(45)
    orth = lambda: np.linalg.qr(rng.standard_normal((16, 16)))[0]
    A = np.stack([orth() @ np.diag(10.0 ** -np.arange(16.0)) @ orth() for _ in range(8)])
    source, errors = align_cuda._SMALL_SVD_SOURCE, []
    for sweeps in (1, 5, 20):
        monkeypatch.setattr(align_cuda, "_SMALL_SVD_SOURCE", source.replace(
            f"sweep < {align_cuda.SMALL_SVD_MAX_SWEEPS}", f"sweep < {sweeps}"))
        U, s, V = align_cuda.small_svd(cp, A)
        np.testing.assert_allclose((U * s[:, None, :]) @ np.swapaxes(V, 1, 2), A, rtol=0, atol=1e-14)
        np.testing.assert_allclose(np.swapaxes(V, 1, 2) @ V, np.broadcast_to(np.eye(16), V.shape), atol=1e-14)
        errors.append(abs(np.swapaxes(U, 1, 2) @ U - np.eye(16)).max())
    assert errors[0] > 1e-3 and errors[2] < 1e-14 and 20 < align_cuda.SMALL_SVD_MAX_SWEEPS


def test_a_gpu_batch_of_small_layers_is_decomposed_by_the_kernel(cp, monkeypatch):
    """(Larger ones, beyond align_fast.SMALL_SVD_KERNEL_MAX, go to CuPy's svd; the tracker
    tests measure with the kernel on the CuPy stand-in.)"""
    calls, gpu = [], _numpy_seen_as_a_gpu_module()
    kernel = align_cuda.small_svd
    monkeypatch.setattr(align_cuda, "small_svd", lambda xp, W: calls.append(W.shape) or kernel(cp, W))
    monkeypatch.setattr(align_fast, "array_module", lambda *a: gpu)
    W = np.random.default_rng(46).standard_normal((3, 70, 9, 9))
    assert 9 <= align_fast.SMALL_SVD_KERNEL_MAX
    svds = align_fast.reduced_svds(list(W), keep=True)
    assert calls == [(210, 9, 9)]                                  # the three layers in one launch
    for (U, s, V), layer in zip(svds, W):
        np.testing.assert_allclose((U * s[:, None, :]) @ np.swapaxes(V, 1, 2), layer, rtol=0, atol=1e-13)
    monkeypatch.setattr(align_fast, "SMALL_SVD_KERNEL_MAX", 8)      # 9 x 9: too large for it now
    for (U, s, V), layer in zip(align_fast.reduced_svds(list(W[:, :5]), keep=True), W[:, :5]):
        np.testing.assert_allclose((U * s[:, None, :]) @ np.swapaxes(V, 1, 2), layer, rtol=0, atol=1e-13)
    assert calls == [(210, 9, 9)]


# Every CUDA source of align_cuda.py with the options its launcher compiles it with.
KERNELS = [(align_cuda._SMALL_GEMM_SOURCE.replace("REAL", real), "small_gemm", ()) for real in ("float", "double")] + \
    [(align_cuda._GREEDY_SOURCE, "greedy_match", ()), (align_cuda._SMALL_SVD_SOURCE, "small_svd", ()),
     (align_cuda._SV_KERNEL_SOURCE, "sv_dynamics", ("--fmad=false",))]


@pytest.mark.skipif(NVRTC is None, reason="NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")
def test_cuda_sources_compile_with_nvrtc_without_a_warning():
    """The sources the C++ harness runs are also valid CUDA, as CuPy compiles them."""
    names = {name for name in vars(align_cuda) if name.endswith("_SOURCE")}
    assert names == {"_SMALL_GEMM_SOURCE", "_GREEDY_SOURCE", "_SMALL_SVD_SOURCE", "_SV_KERNEL_SOURCE"}
    for source, name, options in KERNELS:
        assert nvrtc_log(source, name, options) is None, name
    assert "error" in nvrtc_log(align_cuda._GREEDY_SOURCE.replace("const int m", "const int m q"), "broken")


@pytest.mark.skipif(CUPY is not None, reason="a GPU is available here: the CuPy tests run on it")
def test_the_cupy_tests_pass_on_a_strict_numpy_standin():
    """Every test parametrised with CuPy, in a fresh process that imports the stand-in as
    ``cupy`` (no CUDA graphs: the stand-in has no streams, so GraphSteps' capture fails and
    the steps run kernel by kernel, as after a failed capture on a GPU).  Catches
    host/device mix-ups (NumPy and CuPy arrays in one operation, implicit copies) and
    wrong results."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([os.path.join(tests, "cupy_standin"), os.path.dirname(tests),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "cupy",
                          tests], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert int(re.search(r"(\d+) passed", run.stdout).group(1)) >= 10, run.stdout[-2000:]

