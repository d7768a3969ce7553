"""The CuPy-only paths of align_cuda.py (CUDA graphs, cuBLAS called directly, the batched
measurement on a GPU) against the step-by-step and host computations they replace.
They run with CuPy and a GPU, or on the strict NumPy stand-in (tests/cupy_standin),
and skip otherwise."""
import functools
import gc
import operator
import types
import weakref

import numpy as np
import pytest

import align_cuda
import align_fast
import align
import structured as st
from conftest import CUPY, random_problem


def test_measuring_a_large_batch_on_a_gpu_waits_for_it_once(xp, monkeypatch):
    """No wait per network or per matching round: one transfer of the values (counted on
    the CuPy stand-in, whose ``waits`` counts what makes a host wait for a GPU)."""
    if not hasattr(xp, "waits"):
        pytest.skip("waits are counted on the CuPy stand-in (tests/cupy_standin) only")
    rng = np.random.default_rng(30)
    w0 = [xp.asarray(rng.standard_normal((70, 6, 6))) for _ in range(3)]
    w1 = [W + 0.1 * xp.asarray(rng.standard_normal(W.shape)) for W in w0]
    track = align_fast.tracker(w0)
    track(w1)
    before = xp.waits[0]
    values = track(w1)
    assert xp.waits[0] - before == 1
    assert all(v.shape == (70,) and 0 < v.min() <= v.max() <= 1 for v in values.values())


def test_gemm_plan_reads_every_layout_the_steps_use(monkeypatch):
    """The direct cuBLAS product (CUDA-graph capture) emulated on NumPy: column-major
    gemm of the planned operands gives A @ B for plain, transposed, batched and
    broadcast operands, and every product of training runs (both groupings of Eq. (8),
    the row-space path with and without rotated samples, a batch, a convolutional
    network's structured products), passed as the steps' ``matmul`` as GraphSteps does."""
    from numpy.lib.stride_tricks import as_strided
    rng = np.random.default_rng(40)

    def stored(M, op, ld, bstride, batch):
        r, c = M.shape[-2:]
        rows, cols = (c, r) if op == 0 else (r, c)          # the column-major matrix in memory
        view = as_strided(M, (batch, rows, cols), (bstride * M.itemsize, M.itemsize, ld * M.itemsize))
        return view if op == 0 else np.swapaxes(view, 1, 2)  # op(stored) = M^T

    products = []

    def emulate(A, B):
        products.append((A.shape, B.shape))
        A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, ldC, sC, batch) = align_cuda.gemm_plan(A, B)
        Ct = stored(B, opB, ldB, sB, batch) @ np.swapaxes(stored(A, opA, ldA, sA, batch), 1, 2) \
            .swapaxes(1, 2)                                   # B^T A^T, batch x n x m
        return np.swapaxes(Ct, 1, 2).reshape(shape)

    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    ab, bb = rng.standard_normal((6, 5, 4)), rng.standard_normal((6, 4, 3))
    cases = [(a, b), (a.T.copy().T, b), (rng.standard_normal((4, 5)).T, b),
             (a, rng.standard_normal((3, 4)).T), (ab, bb), (ab, b), (a, bb),
             (np.swapaxes(rng.standard_normal((6, 4, 5)), 1, 2), bb),
             (ab, np.swapaxes(rng.standard_normal((6, 3, 4)), 1, 2)),
             (a[:, ::2], rng.standard_normal((2, 3))),          # a strided view: copied
             (rng.standard_normal((1, 4)), b), (a, rng.standard_normal((4, 1))),
             (rng.standard_normal(4)[None], b), (rng.standard_normal(4)[::-1][None], b),  # Conv2d's:
             (a, rng.standard_normal(4)[:, None])]            # new axes (stride 0), a reversed filter
    for A, B in cases:
        np.testing.assert_allclose(emulate(A, B), A @ B, rtol=1e-12, atol=1e-12)

    descend, grouped = align_fast._descend, align_fast._grouped_at_outputs
    groupings = []                                  # which grouping each step's Eq. (8) took
    monkeypatch.setattr(align_fast, "_grouped_at_outputs",
                        lambda *args: groupings.append("outputs") or grouped(*args))
    chain = align_fast._chain_gradients
    monkeypatch.setattr(align_fast, "_chain_gradients",
                        lambda *args, **kw: groupings.append("chain") or chain(*args, **kw))
    with_emulated = lambda params, loss_and_grads, schedule, runner: descend(
        params, functools.partial(loss_and_grads, matmul=emulate), schedule, runner)
    for kind, widths, n, batch in (("ce", [12, 30, 4], 6, None), ("ce", [40, 30, 2], 20, None),
                                   ("mse", [3, 12, 12, 2], 30, 2), ("mse", [5, 5, 5], 9, 3)):
        weights, X, Y = random_problem(rng, kind, widths, n)
        if batch:
            weights = [np.stack([W] * batch) for W in weights]
        run = lambda: align_fast.train(weights, X, Y, kind, lr=0.05, max_steps=20, tol=0.0,
                                       steps="plain")[0]       # (every step through loss_and_grads)
        want = run()
        products.clear()
        monkeypatch.setattr(align_fast, "_descend", with_emulated)
        got = run()
        monkeypatch.setattr(align_fast, "_descend", descend)
        assert len(products) >= 20 * len(widths)                 # the steps' products: emulated
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)
    assert groupings.count("chain") > groupings.count("outputs") > 0   # both groupings ran

    S = st.conv2d(6, 3)                                    # a structure's products (product=)
    params = [rng.standard_normal(9) * 0.3 for _ in range(3)]
    X = rng.standard_normal((36, 4))
    products.clear()
    L, grads = st._loss_and_gradients([S] * 3, params, X, X, "mse", matmul=emulate)
    L_want, grads_want = st.loss_and_gradients([S] * 3, params, X, X, "mse")
    assert len(products) == 3 + 3 + 2                      # forward, gradients, backward
    np.testing.assert_allclose(L, L_want, rtol=1e-12)
    for g, w in zip(grads, grads_want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("steps", ["graphs", "auto"])
def test_graph_steps_launch_keep_wait_and_rewind_as_stepping_one_by_one(xp, monkeypatch, steps):
    """GraphSteps' launch, kept copy, wait and rewind, with stand-in graphs that replay the
    steps kernel by kernel (on the CuPy stand-in, which has no CUDA graphs): the history
    and iterates of steps="plain", bit for bit, also while the caller measures the kept
    copy and when the run stops inside a launched run."""
    if not hasattr(xp, "waits"):
        pytest.skip("runs on the CuPy stand-in (tests/cupy_standin) only")

    class Graph:
        def __init__(self, runs, n, losses):
            self.runs, self.n, self.losses = runs, n, losses

        def launch(self, stream=None):
            self.runs._save()
            for j in range(self.n):
                self.losses[j] = self.runs.step(self.runs.ps)

    captured, rewound = [], []

    def capture(self, n):
        captured.append(n)
        self.stream = types.SimpleNamespace(wait_event=lambda event: None, synchronize=lambda: None)
        L = self.step([p.copy() for p in self.ps])
        losses = xp.empty((n,) + L.shape, dtype=L.dtype)
        return Graph(self, n, losses), losses, None
    monkeypatch.setattr(align_cuda.GraphSteps, "_capture", capture)
    rewind = align_cuda.GraphSteps.rewind
    monkeypatch.setattr(align_cuda.GraphSteps, "rewind", lambda self, j: rewound.append(j) or rewind(self, j))
    rng = np.random.default_rng(44)
    weights, X, _ = random_problem(rng, "mse", [5, 6, 4], 9)
    Y = rng.standard_normal((4, 5)) @ X / 2                                 # interpolable
    weights = [xp.asarray(np.stack([W * (1 + 0.1 * b) for b in range(3)])) for W in weights]
    X, Y = xp.asarray(X), xp.asarray(Y)
    train = lambda how: align_fast.train(weights, X, Y, "mse", lr=0.05, max_steps=400, tol=1e-3,
                                         measure_every=120, measures={"m": align_fast.tracker(weights)},
                                         steps=how)
    monkeypatch.setattr(align_fast, "GRAPH_STEPS", 100)
    w1, h1 = train(steps)
    assert sorted(captured) == [20, 100]                  # runs of 100, and of 20 to a measurement
    assert 120 < h1.final_step < 400 and h1.stop_reason == "tol"           # stops in a run:
    assert len(rewound) == 1 and 0 < rewound[0] < 100                      # rewound to there
    w2, h2 = train("plain")
    assert sorted(captured) == [20, 100] and len(rewound) == 1             # (no runs: one by one)
    assert h1.final_step == h2.final_step and h1.steps == h2.steps
    np.testing.assert_array_equal(np.array(h1.losses), np.array(h2.losses))
    assert h1.measure_steps == h2.measure_steps
    for key in h2.measurements:
        np.testing.assert_array_equal(h1.measurements[key], h2.measurements[key])
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(align.to_numpy(a), align.to_numpy(b))


def _spy_on_launches(monkeypatch):
    """The results of GraphSteps.launch (True: a graph ran), in a list."""
    launched, launch = [], align_cuda.GraphSteps.launch
    monkeypatch.setattr(align_cuda.GraphSteps, "launch",
                        lambda self, k, keep=False: launched.append(launch(self, k, keep)) or launched[-1])
    return launched


@pytest.mark.skipif(CUPY is None, reason="CuPy with a CUDA GPU is not available")
@pytest.mark.parametrize("kind, widths, n, batch", [("mse_mean", [30, 40, 6, 3], 8, None),   # row space
                                                    ("ce", [30, 40, 6, 3], 8, None),
                                                    ("mse", [5, 6, 4], 9, 3)])              # a batch
def test_cuda_graph_steps_equal_kernel_by_kernel_steps(monkeypatch, kind, widths, n, batch):
    """On the GPU: replaying captured CUDA graphs (direct cuBLAS products) gives the
    iterates, losses and stopping step of launching the kernels one by one (steps="plain")."""
    rng = np.random.default_rng(41)
    weights, X, Y = random_problem(rng, kind, widths, n)
    if batch:
        weights = [np.stack([W * (1 + 0.1 * b) for b in range(batch)]) for W in weights]
    weights, X, Y = ([CUPY.asarray(a) for a in arrays] for arrays in (weights, [X], [Y]))
    captured = _spy_on_launches(monkeypatch)
    train = lambda steps: align_fast.train(weights, X[0], Y[0], kind, lr=0.05, max_steps=400, tol=1e-3,
                                           measure_every=120, measures={"m": align_fast.tracker(weights)},
                                           steps=steps)
    w1, h1 = train("graphs")
    assert captured and all(captured)                              # graphs really ran
    w2, h2 = train("plain")
    assert h1.final_step == h2.final_step and h1.stop_reason == h2.stop_reason
    np.testing.assert_allclose(h1.losses, h2.losses, rtol=1e-10)
    for key in h2.measurements:
        np.testing.assert_allclose(h1.measurements[key], h2.measurements[key], atol=1e-10)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(align.to_numpy(a), align.to_numpy(b), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(CUPY is None, reason="CuPy with a CUDA GPU is not available")
def test_cuda_graph_capture_survives_an_earlier_runs_garbage(monkeypatch):
    """On the GPU: an earlier run's graph steps left in a reference cycle (its memory
    pool and cuBLAS handle freed only by the cycle collector, with synchronizing calls)
    do not break the next capture, even with the collector due at every allocation:
    the collector is paused while steps are captured (seen failing on an H200)."""
    rng = np.random.default_rng(43)
    weights, X, Y = random_problem(rng, "mse_mean", [5, 4, 3], 6)
    weights, X, Y = [CUPY.asarray(W) for W in weights], CUPY.asarray(X), CUPY.asarray(Y)
    collector_on = []

    def loss_and_grads(ps, matmul=operator.matmul):
        collector_on.append(gc.isenabled())
        return align_fast._chain_gradients(ps, X, lambda F: align_fast._loss_at_outputs(F, Y, "mse_mean"),
                                           matmul)
    old = align_cuda.GraphSteps([W.copy() for W in weights],
                                functools.partial(align_fast._step, loss_and_grads, 0.01), 100)
    assert old.launch(50) and old.wait().shape == (50,)
    old.cycle = old                                                # garbage for the collector
    del old
    collector_on[:] = []
    captured = _spy_on_launches(monkeypatch)
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        align_fast.gradient_descent(weights, loss_and_grads, lr=0.01, max_steps=200, tol=0.0)
    finally:
        gc.set_threshold(*threshold)
    assert captured and all(captured)
    assert collector_on[0] and collector_on.count(False) >= 100 + 1   # reference; warm-up + 100
    assert gc.isenabled()


def test_gc_paused_collects_then_pauses_the_collector_and_restores_it():
    class Cycle:
        pass
    gone = []
    c = Cycle()
    c.me = c
    weakref.finalize(c, gone.append, True)
    del c
    with align_cuda.gc_paused():
        assert gone == [True] and not gc.isenabled()              # collected, then paused
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(KeyError), align_cuda.gc_paused():
            raise KeyError("x")
        assert not gc.isenabled()                                  # left as it was: off
    finally:
        gc.enable()


def test_direct_cublas_without_the_library_says_which_it_tried(monkeypatch):
    """(CUDA graph capture then falls back to kernel-by-kernel steps with this note.)"""
    monkeypatch.setattr(align_cuda.DirectCublas, "_load", lambda self, name: None)
    with pytest.raises(RuntimeError, match=r"no cuBLAS library .*libcublas\.so\.13"):
        align_cuda.DirectCublas(None, None)


@pytest.mark.skipif(CUPY is None, reason="CuPy with a CUDA GPU is not available")
def test_conv_steps_replayed_from_cuda_graphs_equal_kernel_by_kernel_steps(monkeypatch):
    """On the GPU: a convolutional network's steps are captured (its products go through the
    ``matmul`` that align_fast.gradient_descent passes) and give the losses, measures and
    iterates of launching kernels one by one."""
    rng = np.random.default_rng(6)
    S = st.conv2d(6, 3)
    params = [CUPY.asarray(rng.standard_normal(9) * 0.3) for _ in range(3)]
    X = CUPY.asarray(rng.standard_normal((36, 4)))
    captured = _spy_on_launches(monkeypatch)
    track = align_fast.tracker(st.layer_matrices([S] * 3, params))
    train = lambda steps: st.train([S] * 3, params, X, X, lr=0.01, max_steps=300, tol=0.0,
                                   measure_every=120, measures={"m": track},
                                   descend=functools.partial(align_fast.gradient_descent, steps=steps))
    p1, h1 = train("graphs")
    assert captured and all(captured)                              # graphs really ran
    assert h1.losses[-1] < 1e-2 * h1.losses[0]                     # (lr 0.05 diverges here)
    p2, h2 = train("plain")
    np.testing.assert_allclose(h1.losses, h2.losses, rtol=1e-10)
    for key in h2.measurements:
        np.testing.assert_allclose(h1.measurements[key], h2.measurements[key], atol=1e-10)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(align.to_numpy(a), align.to_numpy(b), rtol=1e-10, atol=1e-12)
