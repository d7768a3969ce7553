"""Each exact speed-up of align_fast.py against align.py's reference: the same iterates to
rounding in float64, the same measures, the same stopping step."""
import dis
import inspect
import json
import sys
import time

import numpy as np
import pytest

import functools
import operator

import align_fast
import align
from conftest import finite_difference, greedy_cases, random_orthogonal, random_problem


def fast_and_reference(run):
    """(run(align_fast), run(align)): the same code through the fast module and the reference."""
    return run(align_fast), run(align)


def one(batch, b):
    """Network b of a batch (or a per-network data set)."""
    return [W[b] for W in batch] if isinstance(batch, list) else batch[b]


def each_alone(batch, X, Y, lr, **options):
    """align.train of each network of a batch alone (X and Y shared or one per network, lr one
    or one per network): the weights stacked, and each network's History."""
    own_y = Y.ndim == 3 or (Y.ndim == 2 and Y.dtype.kind in "iu")
    runs = [align.train(one(batch, b), X[b] if X.ndim == 3 else X, Y[b] if own_y else Y,
                        lr=lr[b] if np.ndim(lr) else lr, **options)
            for b in range(batch[0].shape[0])]
    return [np.stack([w[i] for w, _ in runs]) for i in range(len(batch))], [h for _, h in runs]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [None, 3])
def test_both_groupings_of_eq8_give_the_same_gradients_for_the_counted_flops(monkeypatch, depth, batch):
    """Eq. (8)'s products layer by layer (backpropagation) and grouped at the outputs:
    the same loss, weight and input gradients to rounding, with the multiply-adds
    _chain_costs counts for each (the cheaper grouping is the one taken)."""
    rng = np.random.default_rng(50 + depth)
    widths = [7] + [int(k) for k in rng.integers(8, 30, depth - 1)] + [3]
    weights, X, labels = random_problem(rng, "ce", widths, 40)
    if batch:
        weights = [np.stack([W + 0.1 * rng.standard_normal(W.shape) for _ in range(batch)]) for W in weights]
    Y = align.as_targets(labels, "ce", 3, 40)
    output_grad = lambda F: align.loss_and_output_gradient(F, Y, "ce")
    results, counted = {}, {}
    for at_outputs in (False, True):
        flops = []
        counting = lambda A, B: flops.append(A.shape[-2] * A.shape[-1] * B.shape[-1]) or A @ B
        monkeypatch.setattr(align_fast, "_cheaper_at_outputs", lambda shapes, n: at_outputs)
        results[at_outputs] = align_fast._chain_gradients(weights, X, output_grad, counting, True)
        counted[at_outputs] = sum(flops)
        monkeypatch.undo()
    (L1, grads1, dX1), (L2, grads2, dX2) = results[False], results[True]
    np.testing.assert_allclose(L2, L1, rtol=1e-13)
    for a, b in zip(grads2 + [dX2], grads1 + [dX1]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())
    shapes = tuple(W.shape[-2:] for W in weights)
    assert (counted[False], counted[True]) == align_fast._chain_costs(shapes, 40)
    assert align_fast._cheaper_at_outputs(shapes, 40) == (align_fast.AT_OUTPUTS_GAIN * counted[True] < counted[False])


def test_gradients_grouped_at_outputs_match_finite_differences():
    rng = np.random.default_rng(55)
    weights, X, Y = random_problem(rng, "mse", [3, 12, 12, 2], 30)
    assert align_fast._cheaper_at_outputs(tuple(W.shape for W in weights), 30)
    grads = align_fast._chain_gradients(weights, X, lambda F: align.loss_and_output_gradient(F, Y, "mse"))[1]
    for i in range(3):
        G = finite_difference(weights, X, Y, "mse", i)
        assert np.linalg.norm(grads[i] - G) <= 1e-6 * np.linalg.norm(G)
    assert not align_fast._cheaper_at_outputs(((9, 9),) * 3, 9)     # fig1a: layer by layer


def test_steps_in_place_only_where_eq8_goes_layer_by_layer(monkeypatch):
    """_SquaredLossSteps (call-bound small networks) backpropagates layer by layer; where
    grouping at the outputs is cheaper (n >= k0, narrow ends) train steps that way."""
    made, init = [], align_fast._SquaredLossSteps.__init__
    monkeypatch.setattr(align_fast._SquaredLossSteps, "__init__", lambda self, *a: made.append(a) or init(self, *a))
    rng = np.random.default_rng(56)
    for widths, n, in_place in (([5, 5, 5], 9, True), ([3, 12, 12, 2], 30, False)):
        weights, X, Y = random_problem(rng, "mse", widths, n)
        align_fast.train(weights, X, Y, max_steps=3)
        assert len(made) == in_place
        made.clear()


def test_greedy_matching_in_rounds_and_one_by_one_equals_the_sequential_greedy(monkeypatch):
    def zero_columns(rng, C, trial):                             # (left out by the greedy)
        if trial % 3 == 0:
            C[:, :, rng.random(C.shape[2]) < 0.4] = 0.0
    for C, capacity, want in greedy_cases(20, 400, 3, zero_columns):
        for largest, rows in ((0, 0), (40, 0), (0, 16), (10 ** 6, 0)):   # in rounds, rounds then
            monkeypatch.setattr(align_fast, "GREEDY_ONE_BY_ONE_MAX", largest)     # one by one, by maxima,
            monkeypatch.setattr(align_fast, "GREEDY_BY_MAXIMA_ROWS", rows)        # one by one
            np.testing.assert_array_equal(align_fast.greedy_match(C, capacity), want)
            np.testing.assert_array_equal(align_fast.greedy_match(C[0], capacity[0]), want[0])
    C, room = np.array([[[0.5, 0.0, 0.0], [0.2, 0.3, 0.0]]]), np.ones((1, 3), int)
    assert align_fast._without_zero_columns(C, room)[0].shape == (1, 2, 2)   # the zero column out
    C[0, 0, 1] = np.nan                              # (one by one: NaN last) no column left out
    assert align_fast._without_zero_columns(C, room)[0] is C


@pytest.mark.parametrize("kind", ["mse", "mse_mean", "ce", "logistic"])
@pytest.mark.parametrize("widths", [[12, 9, 5, 4], [20, 16, 3, 2], [12, 30, 4]])
@pytest.mark.parametrize("rotate_back_min", [1, 10 ** 6])     # other losses: samples rotated or not
def test_row_space_fast_path_gives_the_same_iterates_and_measures(monkeypatch, kind, widths,
                                                                  rotate_back_min):
    monkeypatch.setattr(align_fast, "ROTATE_BACK_MIN", rotate_back_min)
    if kind == "logistic":
        widths = widths[:-1] + [1]
    rng = np.random.default_rng(21)
    weights, X, Y = random_problem(rng, kind, widths, 6)               # n = 6 < k0
    (fast, hf), (slow, hs) = fast_and_reference(lambda lib: lib.train(
        weights, X, Y, kind, lr=0.05, max_steps=200, tol=0.0, measure_every=50,
        measures={"m": lib.tracker(weights)}))
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(hf.losses, hs.losses, rtol=1e-11)
    for key in hs.measurements:
        np.testing.assert_allclose(hf.measurements[key], hs.measurements[key], atol=1e-10)


def test_tracker_on_a_large_batch_measures_where_the_batch_is(xp, monkeypatch):
    """A large batch (on a GPU: decomposed and matched there) measures as NumPy does,
    networks with repeated singular values included (those go one by one)."""
    rng = np.random.default_rng(29)
    for widths in ([5, 5, 5, 5], [5, 7, 3]):
        w0 = [rng.standard_normal((6, widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        w1 = [W + 0.3 * rng.standard_normal(W.shape) for W in w0]
        w1[0][2] = np.eye(*w1[0].shape[1:])                      # network 2: repeated values
        want = {key: np.array([align.tracker(one(w0, b))(one(w1, b))[key] for b in range(6)])
                for key in align.MEASURE_KEYS}                   # align.py's reference, each alone
        monkeypatch.setattr(align_fast, "GPU_BATCH_MIN", 4)
        got = align_fast.tracker([xp.asarray(W) for W in w0])([xp.asarray(W) for W in w1])
        monkeypatch.undo()
        for key, value in want.items():
            assert type(got[key]) is np.ndarray
            np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mse", "ce"])
@pytest.mark.parametrize("per_network_data", [False, True])
def test_row_space_fast_path_on_a_batch_of_networks(monkeypatch, kind, per_network_data):
    monkeypatch.setattr(align_fast, "ROTATE_BACK_MIN", 1)            # ce: samples rotated too
    rng = np.random.default_rng(22)
    batch = [rng.standard_normal((3, 9, 12)) / 4, rng.standard_normal((3, 4, 9)) / 3]
    X = rng.standard_normal((3, 12, 5) if per_network_data else (12, 5))
    Y = rng.integers(0, 4, 5) if kind == "ce" else rng.standard_normal((4, 5))
    if per_network_data and kind == "mse":
        Y = np.stack([Y, 2 * Y, -Y])
    fast, _ = align_fast.train(batch, X, Y, kind, lr=0.05, max_steps=100, tol=0.0)
    slow, _ = each_alone(batch, X, Y, 0.05, kind=kind, max_steps=100, tol=0.0)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_batched_decompositions_split_across_threads_equal_one_call(monkeypatch):
    """A large host batch of small matrices is decomposed in pieces on threads: each
    matrix's SVD and eigh come out bit for bit as from one call, and a batch's
    measures as without threads."""
    rng = np.random.default_rng(31)
    A = rng.standard_normal((10, 5, 4))
    G = np.swapaxes(A, 1, 2) @ A
    svd = lambda M: np.linalg.svd(M, full_matrices=False)
    want = [svd(A), np.linalg.eigh(G)]
    w0 = [rng.standard_normal((4, 5, 5)) for _ in range(3)]
    w1 = [W + 0.2 * rng.standard_normal(W.shape) for W in w0]
    measures = align_fast.tracker(w0)(w1)
    monkeypatch.setattr(align_fast, "_CORES", 3)
    monkeypatch.setattr(align_fast, "THREADED_BATCH_MIN", 2)
    monkeypatch.setattr(align_fast, "_POOL", [])
    for got, expected in zip([align_fast._linalg(svd, A), align_fast._linalg(np.linalg.eigh, G)], want):
        for a, b in zip(got, expected):
            assert a.shape == b.shape and np.array_equal(a, b)
    assert align_fast._POOL and align_fast._POOL[0]._max_workers == 3
    threaded = align_fast.tracker(w0)(w1)
    for key, value in measures.items():
        np.testing.assert_array_equal(threaded[key], value)
    monkeypatch.setattr(align_fast, "THREADED_SIDE_MAX", 4)           # larger matrices: one call
    monkeypatch.setattr(align_fast, "_POOL", [])
    align_fast._linalg(svd, A)
    assert not align_fast._POOL


def test_float32_measures_through_the_gram_matrix_match_float64_svd():
    rng = np.random.default_rng(24)
    for shape in [(40, 30), (30, 40), (3, 25, 20), (3, 20, 25), (5, 2), (2, 7)]:   # (a side of 2: the Gram too)
        W = rng.standard_normal(shape).astype(np.float32)
        U, s, V = align_fast._reduced_svd(W)
        Uw, sw, Vtw = np.linalg.svd(W.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(s, sw, rtol=1e-12)
        np.testing.assert_allclose(np.abs((U * Uw).sum(-2)), 1.0, atol=1e-9)   # same vectors up to sign
        np.testing.assert_allclose(np.abs((V * np.swapaxes(Vtw, -1, -2)).sum(-2)), 1.0, atol=1e-9)
    low = np.outer(rng.standard_normal(6), rng.standard_normal(4)).astype(np.float32)   # rank 1
    U, s, V = align_fast._reduced_svd(low)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(U @ np.diag(s) @ V.T, low, atol=1e-5)
    lows = np.stack([low, 2 * low, np.outer(np.ones(6), np.arange(4)).astype(np.float32)])
    U, s, V = align_fast._reduced_svd(lows)
    np.testing.assert_allclose(np.swapaxes(U, -1, -2) @ U, np.broadcast_to(np.eye(4), (3, 4, 4)),
                               atol=1e-12)
    np.testing.assert_allclose((U * s[:, None, :]) @ np.swapaxes(V, -1, -2), lows, atol=1e-5)
    U, s, V = align_fast._reduced_svd(np.zeros((5, 3), np.float32))   # every value zero
    assert not s.any() and np.isfinite(U).all()
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)


def test_a_batch_whose_every_network_diverges_names_the_largest_rate():
    """Every network of a batch diverged: DivergenceError names the largest of the rates
    (the one to lower first), and an empty list of weights is refused as align refuses it."""
    rng = np.random.default_rng(53)
    weights, X, Y = random_problem(rng, "mse", [4, 4, 4], 4)
    batch = [np.stack([10 * W, 10 * W]) for W in weights]
    with pytest.raises(align.DivergenceError, match=r"lr = 200 \(the largest\)"):
        align_fast.train(batch, X, Y * 100, lr=[100.0, 200.0], max_steps=1000)
    with pytest.raises(ValueError, match="non-empty list"):
        align_fast.train([], X, Y)


def test_a_batch_with_a_zero_single_valued_layer_measures_as_align():
    """A network of a batch whose last layer (one output) is zero has a layer with one
    singular value, 0: not generic, so it is measured one by one, as align measures it."""
    rng = np.random.default_rng(54)
    w0 = [rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 1, 4))]
    w1 = [W + 0.3 * rng.standard_normal(W.shape) for W in w0]
    w1[1][1] = 0.0
    want = {key: np.array([align.tracker(one(w0, b))(one(w1, b))[key] for b in range(3)])
            for key in align.MEASURE_KEYS}
    got = align_fast.tracker(w0)(w1)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n, t", [(30, 30, 3), (40, 25, 1), (6, 6, 5)])
def test_directions_of_zero_singular_values_complete_an_orthonormal_basis(m, n, t, monkeypatch):
    rng = np.random.default_rng(m + t)
    U = np.linalg.qr(rng.standard_normal((m, n)))[0]
    missing = np.zeros(n, dtype=bool)
    missing[rng.choice(n, t, replace=False)] = True
    full_qr = []
    monkeypatch.setattr(align_fast, "_orth_complement", lambda *a: full_qr.append(1) or np.linalg.qr(
        a[0], mode="complete")[0][:, a[0].shape[1]:])
    done = align_fast._complete(np.where(missing, np.nan, U), missing)
    np.testing.assert_array_equal(done[:, ~missing], U[:, ~missing])
    np.testing.assert_allclose(done.T @ done, np.eye(n), atol=1e-13)
    assert not full_qr                                                # projections sufficed
    pair = np.zeros((4, 4))                                           # complement: e0 + e1, e2 + e3
    pair[:, :2] = np.array([[1, -1, 0, 0], [0, 0, 1, -1]]).T / np.sqrt(2)
    done = align_fast._complete(pair, np.array([False, False, True, True]))
    assert full_qr                                                    # e0, e1 project to one vector
    np.testing.assert_allclose(done.T @ done, np.eye(4), atol=1e-13)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_measures_split_along_the_invariant_subspace_equal_the_direct_ones(dtype, atol):
    rng = np.random.default_rng(25)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    weights, X, Y = [W.astype(dtype) for W in weights], X.astype(dtype), Y.astype(dtype)
    Q = align_fast._range_basis(np.concatenate([weights[0] @ X, weights[1].T], axis=1).astype(np.float64),
                           100 * np.finfo(dtype).eps).astype(dtype)
    split = align_fast._split_first_layers(weights[0], Q, X.T)
    assert split is not None
    C = rng.standard_normal((Q.shape[1], n)) * 0.1
    W2 = rng.standard_normal((3, Q.shape[1]))
    (got1, got2), static = split([C, W2])
    (U, s, V), want2 = [align_fast._reduced_svd(M) for M in (weights[0] + Q @ C @ X.T, W2 @ Q.T)]
    np.testing.assert_allclose(got1[1], s, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.abs(((Q @ got1[0][:, ~static]) * U[:, ~static]).sum(0)), 1.0,
                               atol=atol)                      # dynamic: in span(Q)
    assert not got1[0][:, static].any() and static.sum() > 0
    np.testing.assert_allclose(Q.T @ U[:, static], 0.0, atol=atol)   # static: orthogonal to it
    np.testing.assert_allclose(got2[1], want2[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.abs((got2[0] * want2[0]).sum(0)), 1.0, atol=atol)
    np.testing.assert_allclose(np.abs(((Q @ got2[2]) * want2[2]).sum(0)), 1.0, atol=atol)
    random_start = [rng.standard_normal(W.shape).astype(dtype) for W in weights]
    assert align_fast._split_first_layers(random_start[0], Q, X.T) is None


def test_split_measures_on_the_device_equal_the_host_ones(xp, monkeypatch):
    """Layer 1's moving directions decomposed where the arrays live (every decomposition
    on xp: on a GPU, eigh there) give the singular values and vectors of LAPACK's SVDs
    of the dense layers W_1 = W_1(0) + Q C X^T and W_2 = W~_2 Q^T."""
    rng = np.random.default_rng(28)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    Q = align_fast._range_basis(np.concatenate([weights[0] @ X, weights[1].T], axis=1), 1e-12)
    params = [rng.standard_normal((Q.shape[1], n)) * 0.1, rng.standard_normal((3, Q.shape[1]))]
    U1, s1, _ = np.linalg.svd(weights[0] + Q @ params[0] @ X.T)
    _, s2, V2t = np.linalg.svd(params[1] @ Q.T)
    monkeypatch.setattr(align_fast, "HOST_SVD_MAX", 0)
    monkeypatch.setattr(align_fast, "HOST_EIGH_MAX", 0)
    split = align_fast._split_first_layers(*(xp.asarray(a) for a in (weights[0], Q, X.T)))
    (got1, got2), static = split([xp.asarray(p) for p in params])
    assert type(got1[0]) is np.ndarray and 0 < static.sum() < static.size
    np.testing.assert_allclose(got1[1], s1[:20], rtol=1e-12)
    np.testing.assert_allclose(np.abs(((Q @ got1[0]) * U1[:, :20]).sum(0))[~static], 1.0, atol=1e-10)
    np.testing.assert_allclose(got2[1], s2, rtol=1e-12)
    np.testing.assert_allclose(np.abs(((Q @ got2[2]) * V2t[:3].T).sum(0)), 1.0, atol=1e-10)


def _train_with_split_measures(monkeypatch, widths, n, rtol, sigmas=None, y_scale=1.0,
                               max_steps=300, rng=None):
    """(whether each measurement used the split, align_fast's run, align's run) for an
    aligned start of the given widths trained in the row space (n < k0)."""
    rng = rng or np.random.default_rng(26)
    X, Y = rng.standard_normal((widths[0], n)), y_scale * rng.standard_normal((widths[-1], n))
    sigmas = sigmas(rng) if callable(sigmas) else sigmas
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1,
                                 sigmas=sigmas)
    split_used, pairs = [], align_fast._split_invariance_pairs
    monkeypatch.setattr(align_fast, "_split_invariance_pairs", lambda *a: split_used.append(
        pairs(*a) is not None) or pairs(*a))
    (_, fast), (_, slow) = fast_and_reference(lambda lib: lib.train(
        weights, X, Y, "mse_mean", lr=0.05, max_steps=max_steps, tol=0.0, measure_every=100,
        measures={"m": lib.tracker(weights, rtol=rtol)}))
    return split_used, fast, slow


@pytest.mark.parametrize("repeated, rtol", [(False, 1e-6), (True, 1e-6), (True, 0.05)])
def test_training_with_split_measures_records_the_same_values(repeated, rtol, monkeypatch):
    """Layer 1 split into static and moving directions (static ones left out as exact
    matches) measures as the dense SVDs do, also when singular values repeat across
    the two kinds (clusters that mix them)."""
    sigmas = (lambda rng: [np.ones(20), rng.uniform(0.5, 1, 3), rng.uniform(0.5, 1, 2)]) \
        if repeated else None
    split_used, fast, slow = _train_with_split_measures(monkeypatch, [20, 24, 3, 2], 6, rtol, sigmas)
    assert split_used == [True] * 4
    for key in slow.measurements:       # the matched rule depends on the basis SVD picks
        if not repeated or key.endswith("paired"):          # inside a repeated value
            np.testing.assert_allclose(fast.measurements[key], slow.measurements[key], atol=1e-9)


def test_a_tracker_of_other_weights_measures_against_its_own_start():
    """train's split measurement (layer 1 in the row space) is only for a tracker of the
    run's start: a tracker built on other weights compares with those."""
    rng = np.random.default_rng(45)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    later, _ = align_fast.train(weights, X, Y, "mse_mean", lr=0.05, max_steps=200, tol=0.0)
    for start in (weights, later):
        track = align_fast.tracker(start)
        out, hist = align_fast.train(later, X, Y, "mse_mean", lr=0.05, max_steps=100, tol=0.0,
                                measures={"m": track})
        for key, value in track(out).items():
            assert hist.measurements[key][-1] == pytest.approx(value, abs=1e-9)
    assert track.starts_at(later) and not track.starts_at(weights)


def until_interrupted(train):
    """train()'s (weights, History), also when it raises align.Interrupted (its .weights and
    .history then)."""
    try:
        return train()
    except align.Interrupted as stop:
        return stop.weights, stop.history


def _run_both(monkeypatch, run):
    """run(steps) one step at a time (steps="plain") and in runs of 5 steps replayed kernel
    by kernel (_StepRuns with a step: on NumPy, the bookkeeping of the CUDA-graph path);
    both results, and the rewinds of the runs."""
    eager = until_interrupted(lambda: run("plain"))
    rewinds = []

    class Spy(align_fast._StepRuns):
        def rewind(self, j):
            rewinds.append(j)
            super().rewind(j)
    monkeypatch.setattr(align_fast, "_runner", lambda steps, lg, lr, in_place=None: (
        lambda ps: Spy(ps, lr, 5, functools.partial(align_fast._step, lg, lr))))
    return eager, until_interrupted(lambda: run("auto")), rewinds


@pytest.mark.parametrize("tol, record_every, measure_every, max_steps, widths",
                         [(1e-3, 1, 11, 10_000, [5, 6, 4]),     # stops by tol inside a chunk
                          (0.0, 3, 25, 103, [5, 6, 4]),         # step budget, sparse records
                          (1e-3, 4, 1, 10_000, [5, 6, 4]),      # a measurement at every step
                          (1e-3, 1, 100, 10_000, [12, 9, 5, 4])])  # n < k0: row-space path
def test_chunked_steps_give_the_same_run_as_step_by_step(monkeypatch, tol, record_every,
                                                         measure_every, max_steps, widths):
    rng = np.random.default_rng(30)
    weights, X, Y = random_problem(rng, "mse", widths, 5)   # n = 5: interpolable
    calls = []
    run = lambda steps: align_fast.train(weights, X, Y, lr=0.05, max_steps=max_steps, tol=tol,
                                         record_every=record_every, measure_every=measure_every,
                                         measures={"a": lambda w, w0: align_fast.alignment(w)},
                                         callback=lambda s, L, h: calls.append(s), steps=steps)
    (w1, h1), (w2, h2), rewinds = _run_both(monkeypatch, run)
    assert h1.final_step == h2.final_step and h1.stop_reason == h2.stop_reason
    assert (rewinds and rewinds[0] > 0) if tol and measure_every > 1 else not rewinds
    assert h1.steps == h2.steps and h1.losses == h2.losses
    assert h1.measure_steps == h2.measure_steps and h1.measurements == h2.measurements
    assert calls[:len(calls) // 2] == calls[len(calls) // 2:]
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_chunked_steps_on_a_batch_and_on_divergence(monkeypatch):
    rng = np.random.default_rng(31)
    batch = [rng.standard_normal((3, 5, 5)) / 2 for _ in range(2)]
    X, Y = rng.standard_normal((3, 5, 9)), rng.standard_normal((3, 5, 9))
    run = lambda steps: align_fast.train(batch, X, Y, lr=0.05, max_steps=500, tol=1e-2, steps=steps)
    (w1, h1), (w2, h2), _ = _run_both(monkeypatch, run)
    assert h1.steps == h2.steps and h1.final_step == h2.final_step
    np.testing.assert_array_equal(np.array(h1.losses), np.array(h2.losses))
    for h in (h1, h2):                         # rows of a batch are arrays, as the eager loop's
        assert type(h.losses[0]) is np.ndarray and h.losses[0].shape == (3,)
        assert h.to_dict()["losses"][0] == h.losses[0].tolist()
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    weights, X, Y = random_problem(rng, "mse", [4, 4, 4], 4)
    stops = []
    for steps in ("plain", "auto"):                     # (the runs of _run_both, patched in)
        with pytest.raises(align.DivergenceError) as e:
            align_fast.train([W * 10 for W in weights], X, Y * 100, lr=100.0, max_steps=1000,
                             steps=steps)
        stops.append(e.value.history.final_step)
    assert stops[0] == stops[1] > 0


@pytest.mark.parametrize("record_every", [1, 3])
def test_chunked_steps_on_a_batch_stopping_at_different_steps_and_one_diverging(monkeypatch, record_every):
    """A batch whose networks stop below tol at different steps (one lr each), one of them
    diverging (lr 30: frozen where it diverged), in runs of 5 steps: the same records,
    stop and weights as step by step; the largest finite loss decides the stop."""
    rng = np.random.default_rng(32)
    problems = [random_problem(rng, "mse", [4, 5, 3], 8) for _ in range(4)]
    batch = [np.stack([p[0][i] for p in problems]) for i in range(2)]
    X = np.stack([p[1] for p in problems])
    Y = np.stack([rng.standard_normal((3, 4)) @ p[1] / 3 for p in problems])
    run = lambda steps: align_fast.train(batch, X, Y, lr=[0.02, 0.05, 0.1, 30.0], max_steps=3000,
                                         tol=1e-3, record_every=record_every, steps=steps)
    (w1, h1), (w2, h2), rewinds = _run_both(monkeypatch, run)
    assert h1.stop_reason == h2.stop_reason == "tol" and h1.final_step == h2.final_step < 3000
    assert rewinds and h1.steps == h2.steps
    L1, L2 = np.array(h1.losses), np.array(h2.losses)
    np.testing.assert_array_equal(L1, L2)
    assert not np.isfinite(L1[-1, 3]) and np.all(L1[-1, :3] < 1e-3)
    stops = [h1.steps[int(np.argmax(L1[:, b] < 1e-3))] for b in range(3)]
    assert len(set(stops)) == 3 and h1.final_step == max(stops)
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("measure_every, at", [(1, 40), (10, 3)])
def test_ctrl_c_in_a_measurement_keeps_every_step_taken(monkeypatch, measure_every, at):
    """Ctrl-C inside a measurement, between runs of steps (measure_every 10) or before any
    run was launched (measure_every 1: single steps only): the weights are those of a clean
    run to the step reached, nothing undone."""
    rng = np.random.default_rng(34)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)
    calls = []

    def measure(ws, w0):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return 0.0
    def run(steps):
        calls.clear()
        return align_fast.train(weights, X, Y, lr=0.05, max_steps=500, tol=0.0,
                                measure_every=measure_every, measures={"m": measure}, steps=steps)
    (_, h1), (w2, h2), _ = _run_both(monkeypatch, run)
    assert h2.stop_reason == "interrupted" and h2.final_step == (at - 1) * measure_every
    clean, _ = align.train(weights, X, Y, lr=0.05, max_steps=h2.final_step, tol=0.0)
    for a, b in zip(w2, clean):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("at", [5, 11, 12])
def test_ctrl_c_in_a_single_step_after_a_run_keeps_that_run(monkeypatch, at):
    """Runs of 5 steps between measurements every 6 steps leave one single step (5, 11, ...)
    after each run: Ctrl-C in its callback ends the run there with the run before it kept."""
    rng = np.random.default_rng(36)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)

    def interrupt(step, loss, hist):
        if step == at:
            raise KeyboardInterrupt
    (w1, h1), (w2, h2), _ = _run_both(monkeypatch, lambda steps: align_fast.train(
        weights, X, Y, lr=0.05, max_steps=100, tol=0.0, measure_every=6, callback=interrupt,
        steps=steps))
    assert h1.final_step == h2.final_step == at and h1.steps == h2.steps == list(range(at + 1))
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_runs_of_two_steps_go_in_place(monkeypatch):
    """measure_every 2: every run between measurements is 2 steps, taken by the in-place
    runner (runs of 1 step alone go step by step)."""
    ran, run = [], align_fast._SquaredLossSteps._run
    monkeypatch.setattr(align_fast._SquaredLossSteps, "_run", lambda self, n: ran.append(n) or run(self, n))
    rng = np.random.default_rng(35)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)
    align_fast.train(weights, X, Y, lr=0.05, max_steps=20, tol=0.0, measure_every=2)
    assert set(ran) == {2} and sum(ran) == 20


def test_single_network_chunks_record_python_floats(monkeypatch):
    rng = np.random.default_rng(33)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)
    (_, h1), (_, h2), _ = _run_both(monkeypatch, lambda steps: align_fast.train(
        weights, X, Y, lr=0.05, max_steps=30, tol=0.0, steps=steps))
    assert type(h1.losses[3]) is type(h2.losses[3]) is float and h1.losses == h2.losses


@pytest.mark.parametrize("kind, dtype, widths, record_every, tol",
                         [("mse", np.float64, [4, 5, 3], 1, 1e-3),          # stops inside a run
                          ("mse_mean", np.float32, [4, 6, 5, 3], 3, 1e-3),  # sparse records
                          ("mse", np.float64, [4, 3], 1, 0.0),              # one layer, budget
                          ("mse_mean", np.float64, [4, 4, 4, 4, 3], 2, 1e-3),
                          ("mse_mean", np.float64, [5, 5, 5, 5], 1, 1e-3)])   # k x k: stacked
@pytest.mark.parametrize("residuals_bytes", [0, align_fast.RESIDUALS_BYTES])   # losses at each step, after
def test_in_place_squared_loss_steps_give_the_same_numbers(monkeypatch, kind, dtype, widths,
                                                           record_every, tol, residuals_bytes):
    """NumPy's in-place runs of steps (a dense network, squared loss, n >= k0) against
    the step-by-step path: the same records and stopping step, iterates and losses
    equal to rounding (lr is applied to dL/dF instead of to each gradient)."""
    monkeypatch.setattr(align_fast, "RESIDUALS_BYTES", residuals_bytes)
    ran, run = [], align_fast._SquaredLossSteps._run
    monkeypatch.setattr(align_fast._SquaredLossSteps, "_run", lambda self, n: ran.append(n) or run(self, n))
    rng = np.random.default_rng(43)
    weights, X, _ = random_problem(rng, kind, widths, 7)
    Y = rng.standard_normal((widths[-1], widths[0])) @ X / 2         # interpolable
    weights, X, Y = [W.astype(dtype) for W in weights], X.astype(dtype), Y.astype(dtype)

    def train(lib):
        calls = []
        out, hist = lib.train(weights, X, Y, kind, lr=0.05, max_steps=1234, tol=tol,
                              record_every=record_every, measure_every=100,
                              measures={"a": lambda w, w0: lib.alignment(w)},
                              callback=lambda s, L, h: calls.append((s, L)))
        return out, hist, calls
    (w1, h1, c1), (w2, h2, c2) = fast_and_reference(train)
    assert ran and sum(ran) >= h1.final_step and max(ran) <= 100    # the fast run took runs
    assert h1.final_step == h2.final_step and h1.stop_reason == h2.stop_reason
    assert h1.final_step < 1234 if tol else h1.final_step == 1234
    rtol = 1e-11 if dtype == np.float64 else 1e-4
    assert h1.steps == h2.steps and [s for s, _ in c1] == [s for s, _ in c2]
    np.testing.assert_allclose(h1.losses, h2.losses, rtol=rtol)
    np.testing.assert_allclose([L for _, L in c1], [L for _, L in c2], rtol=rtol)
    assert h1.measure_steps == h2.measure_steps
    for key in h2.measurements:
        np.testing.assert_allclose(h1.measurements[key], h2.measurements[key], rtol=rtol)
    for a, b in zip(w1, w2):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_ctrl_c_in_the_callback_stops_a_run_of_steps_where_it_was(monkeypatch):
    rng = np.random.default_rng(44)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)

    def interrupt(step, L, h):
        if step == 57:
            raise KeyboardInterrupt
    (w1, h1), (w2, h2) = fast_and_reference(lambda lib: until_interrupted(lambda: lib.train(
        weights, X, Y, lr=0.05, max_steps=500, tol=0.0, callback=interrupt,
        measures={"a": lambda w, w0: lib.alignment(w)})))
    assert h1.stop_reason == h2.stop_reason == "interrupted"
    assert h1.final_step == h2.final_step == 57 and h1.steps == h2.steps == list(range(58))
    assert h1.measure_steps == h2.measure_steps == [0, 57]
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_in_place_steps_refuse_a_run_longer_than_their_buffers():
    rng = np.random.default_rng(45)
    weights, X, Y = random_problem(rng, "mse", [3, 4, 2], 5)
    steps = align_fast._SquaredLossSteps(weights, X, Y, "mse", 0.1)
    assert steps._run(steps.longest).shape == (steps.longest,)
    with pytest.raises(ValueError, match="longer than"):
        steps._run(steps.longest + 1)


def test_split_measures_fall_back_when_a_static_direction_is_used_at_one_time_only():
    """A static direction (same vector, same singular value at both times) counts as an
    exact match only if it is used (sigma > rtol * sigma_max) at both times."""
    q = np.linalg.qr(np.random.default_rng(42).standard_normal((4, 4)))[0]
    layer = lambda s, static: (np.where(static, 0.0, q[:, :3]), np.array(s), None)
    rest = (np.eye(2), np.array([1.0, 0.5]), q[:, :2])          # W_2: U, s, V in Q's coordinates
    static = np.array([False, True, True])
    now = [layer([0.5, 0.5, 7e-7], static), rest]               # max 0.5: 7e-7 is used
    then = [layer([1.0, 0.5, 7e-7], static), rest]              # max 1.0: 7e-7 is not
    split = lambda: align_fast._split_invariance_pairs(align.invariance_pairs(now, then, [3, 4, 2]),
                                                       now[0], then[0], 4, 1e-6, (static, static))
    assert split() is None
    then[0] = layer([0.6, 0.5, 7e-7], static)                   # used at both times
    pairs = split()
    assert pairs[-1].exact == 2 and pairs[-1].exact_used == 2 and pairs[-1].A.shape == (4, 1)




COPIED_ALONE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import align
assert align.__file__.startswith(sys.argv[1])
assert not {"align_fast", "align_cuda", "structured", "experiments", "runner"} & set(sys.modules)
print(json.dumps(align_numbers(align)))
"""


def align_numbers(lib):
    """Numbers from align's public functions on one problem (n < k0: align_fast.py's row
    space), training and measuring with ``lib`` (align, or align_fast)."""
    import numpy as np
    import align
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((12, 6)), rng.standard_normal((4, 6))
    U, V = np.linalg.svd(Y)[0], np.linalg.svd(X)[0]
    weights = align.aligned_init(U, V, [12, 9, 5, 4], seed=3)
    out, hist = lib.train(weights, X, Y, "mse", lr=0.05, max_steps=300, tol=0.0, measure_every=100,
                          measures={"m": lib.tracker(weights)})
    cert = align.invariance_certificate(X, X, [12, 12, 12])
    return {"forward": align.forward(weights, X).tolist(), "loss": float(align.loss(out, X, Y)),
            "gradients": [g.tolist() for g in align.gradients(out, X, Y)],
            "weights": [W.tolist() for W in out], "losses": hist.losses,
            "measurements": hist.measurements,
            "alignment": [lib.alignment(out, how) for how in ("paired", "matched")],
            "invariance": [lib.invariance(out, weights, how) for how in ("paired", "matched")],
            "is_aligned": [bool(align.is_aligned(weights)), bool(align.is_aligned(out, tol=1e-6))],
            "certificate": [bool(cert), cert.lam.tolist(), cert.lam_prime.tolist()]}


def test_align_copied_alone_gives_the_full_projects_numbers(tmp_path):
    """align.py alone in an empty folder, with NumPy only (importing no other module of the
    project): the public functions run and give align_fast's numbers to rounding."""
    import inspect
    import shutil
    import subprocess
    import sys
    shutil.copy(align.__file__, tmp_path / "align.py")
    script = inspect.getsource(align_numbers) + COPIED_ALONE
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    alone, full = json.loads(run.stdout), align_numbers(align_fast)
    assert alone.keys() == full.keys()
    assert alone["is_aligned"] == full["is_aligned"] == [True, False]
    assert alone["certificate"][0] and full["certificate"][0]
    for key in full:
        np.testing.assert_allclose(_leaves(alone[key]), _leaves(full[key]), rtol=1e-9, atol=1e-12,
                                   err_msg=key)


def _leaves(value):
    """The numbers of a nested JSON value (bools as 0 and 1), flat."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [float(value)]


@pytest.mark.parametrize("widths, n", [([6, 9, 4, 3], 12), ([20, 24, 3, 2], 6)])
def test_tracker_during_training_scores_invariance_as_the_authors_code(widths, n):
    """The fast tracker (row-space split where n < k0, batched where B > 1) measures the
    matched invariance of every recorded iterate as the authors' formula does."""
    from test_align import authors_matched_invariance
    rng = np.random.default_rng(46)
    X, Y = rng.standard_normal((widths[0], n)), rng.standard_normal((widths[-1], n))
    W0 = [rng.standard_normal((widths[i + 1], widths[i])) / 3 for i in range(len(widths) - 1)]
    for start in (W0, [np.stack([W, 1.1 * W]) for W in W0]):
        out, hist = align_fast.train(start, X, Y, "mse", lr=0.05, max_steps=100, tol=0.0,
                                measures={"m": align_fast.tracker(start)})
        got = np.atleast_1d(hist.measurements["invariance_matched"][-1])
        nets = [(out, start)] if out[0].ndim == 2 else \
            [([W[b] for W in out], [W[b] for W in start]) for b in range(2)]
        want = [authors_matched_invariance(wt, w0) for wt, w0 in nets]
        np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("widths, n, rates", [([4, 5, 3], 7, [0.02, 0.05, 0.1]),   # direct
                                              ([9, 6, 4, 3], 5, [0.02, 0.05, 0.1]),  # row space
                                              ([4, 5, 3], 7, [0.1, 0.03])])          # two
def test_a_batch_with_one_learning_rate_per_network_trains_each_as_alone(widths, n, rates):
    """train(lr=[...]) on a batch: each network steps with its own rate, stops at its own
    step (frozen below tol), and ends where it ends alone, on both implementations."""
    rng = np.random.default_rng(60)
    problems = [random_problem(rng, "mse", widths, n) for _ in rates]
    problems = [(w, X, rng.standard_normal((widths[-1], widths[0])) @ X / 2) for w, X, _ in problems]
    batch = [np.stack([p[0][i] for p in problems]) for i in range(len(widths) - 1)]
    X, Y = np.stack([p[1] for p in problems]), np.stack([p[2] for p in problems])
    for steps in ("auto", "plain"):
        out, hist = align_fast.train(batch, X, Y, lr=rates, max_steps=3000, tol=1e-3, steps=steps)
        for b, (weights, Xb, Yb) in enumerate(problems):
            alone, h = align.train(weights, Xb, Yb, lr=rates[b], max_steps=3000, tol=1e-3)
            stop = next(t for t, L in zip(hist.steps, hist.losses) if L[b] < 1e-3)
            assert stop == h.final_step
            for a, W in zip(out, alone):
                np.testing.assert_allclose(a[b], W, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one per network"):
        align_fast.train(batch, X, Y, lr=rates[:1])
    with pytest.raises(ValueError, match="positive finite"):
        align_fast.train(batch, X, Y, lr=[-0.1] + rates[1:])


def test_fast_measures_check_their_input_like_the_reference():
    """A tracker starts at a copy of its weights too (equal arrays, not only the same
    objects); invariance of networks of other shapes and rtol outside [0, 1) are errors."""
    rng = np.random.default_rng(37)
    weights, _, _ = random_problem(rng, "mse", [4, 5, 3], 6)
    track = align_fast.tracker(weights)
    assert track.starts_at([W.copy() for W in weights]) and not track.starts_at([W + 1 for W in weights])
    with pytest.raises(ValueError):
        align_fast.invariance(weights, [weights[0], weights[1][:2]])
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rtol"):
            align_fast.alignment(weights, rtol=bad)
        with pytest.raises(ValueError, match="rtol"):
            align_fast.tracker(weights, rtol=bad)


@pytest.mark.parametrize("widths", [[4, 3], [4, 5, 3]])
def test_fast_tracker_of_one_network_gives_python_floats_as_the_reference(widths):
    rng = np.random.default_rng(38)
    weights, _, _ = random_problem(rng, "mse", widths, 6)
    moved = [W + 0.1 * rng.standard_normal(W.shape) for W in weights]
    fast, ref = align_fast.tracker(weights)(moved), align.tracker(weights)(moved)
    assert fast.keys() == ref.keys()
    for key in ref:
        assert type(fast[key]) is type(ref[key]) is float and fast[key] == pytest.approx(ref[key], abs=1e-12)


def _batch_problem(rng, widths, n, count, dtype, shared_x):
    """A batch of ``count`` networks with targets they can fit (Y = A X), in ``dtype``."""
    problems = [random_problem(rng, "mse", widths, n) for _ in range(count)]
    batch = [np.stack([p[0][i] for p in problems]).astype(dtype) for i in range(len(widths) - 1)]
    X = problems[0][1] if shared_x else np.stack([p[1] for p in problems])
    Y = np.stack([rng.standard_normal((widths[-1], widths[0])) @ (X if shared_x else p[1]) / 3
                  for p in problems])
    return batch, X.astype(dtype), Y.astype(dtype)


@pytest.mark.parametrize("widths, n, kind, dtype, rates, record_every, shared_x", [
    ([5, 5, 5, 5], 5, "mse", np.float64, [0.1, 0.05, 0.1, 30.0], 1, False),   # k x k: stacked
    ([4, 6, 3], 8, "mse_mean", np.float64, 0.05, 3, True),    # other shapes, one X, sparse records
    ([5, 5, 5], 7, "mse", np.float32, [0.1, 0.05, 0.1, 0.2], 1, False)])
def test_a_batch_steps_in_place_with_the_references_iterates_bit_for_bit(
        monkeypatch, widths, n, kind, dtype, rates, record_every, shared_x):
    """_BatchSquaredLossSteps: networks stopping below tol at different steps (one diverging
    at lr 30: frozen where it diverged), each leaving the arrays where it stops, in runs of
    up to 100 steps: the plain loop's losses, stop and weights bit for bit (steps="plain":
    align.train's operations on the frozen gradients, each network tested against
    align.train alone in test_each_network_of_a_batch_ends_as_its_run_alone)."""
    rng = np.random.default_rng(70)
    batch, X, Y = _batch_problem(rng, widths, n, 4, dtype, shared_x)
    moving = []
    run_moving = align_fast._BatchSquaredLossSteps._run_moving
    monkeypatch.setattr(align_fast._BatchSquaredLossSteps, "_run_moving",
                        lambda self, *a: moving.append(int(self.moving.sum())) or run_moving(self, *a))
    run = lambda steps: align_fast.train(batch, X, Y, kind=kind, lr=rates, max_steps=4000, tol=1e-3,
                                         record_every=record_every, measure_every=100,
                                         measures={"m": align_fast.tracker(batch)}, steps=steps)
    (w1, h1), (w2, h2) = run("in_place"), run("plain")
    assert h1.stop_reason == h2.stop_reason == "tol" and h1.final_step == h2.final_step
    assert h1.steps == h2.steps and h1.measure_steps == h2.measure_steps
    np.testing.assert_array_equal(np.array(h1.losses), np.array(h2.losses))
    assert h1.measurements.keys() == h2.measurements.keys()
    for key in h1.measurements:                          # (the fast decompositions: to rounding)
        np.testing.assert_allclose(np.array(h1.measurements[key]), np.array(h2.measurements[key]),
                                   rtol=1e-12)
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    assert moving[0] == 4 and min(moving) < 4           # networks left the arrays as they stopped
    L = np.array(h1.losses)
    stops = [h1.steps[int(np.argmax(L[:, b] < 1e-3))] for b in range(4) if np.isfinite(L[-1, b])]
    assert len(set(stops)) > 1


def test_a_batch_of_one_is_never_frozen_inside_a_run():
    """_frozen_below leaves a lone network to the run's stop: with records every 7 steps it
    goes on below tol until a recorded step, in place as in the reference."""
    rng = np.random.default_rng(71)
    batch, X, Y = _batch_problem(rng, [4, 5, 3], 6, 1, np.float64, False)
    run = lambda steps, max_steps=5000, tol=1e-3: align_fast.train(
        batch, X, Y, lr=0.1, max_steps=max_steps, tol=tol, record_every=7, steps=steps)
    (w1, h1), (w2, h2) = run("in_place"), run("plain")
    assert h1.final_step == h2.final_step and h1.final_step % 7 == 0
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    before = run("plain", max_steps=h1.final_step - 1, tol=0)[0]
    assert align.loss(one(w1, 0), X[0], Y[0]) < align.loss(one(before, 0), X[0], Y[0])


def test_ctrl_c_in_the_callback_rewinds_a_batch_run_with_its_stopped_networks(monkeypatch):
    """Ctrl-C in the callback at step 57, inside a run of 100 steps in which networks stopped:
    the batch goes back to step 57 with the networks moving then, as the reference."""
    rng = np.random.default_rng(72)
    batch, X, Y = _batch_problem(rng, [4, 4, 4], 6, 3, np.float64, False)

    def stop_at_57(step, loss, hist):
        if step == 57:
            raise KeyboardInterrupt
    run = lambda steps: until_interrupted(lambda: align_fast.train(
        batch, X, Y, lr=[0.3, 0.05, 0.01], max_steps=1000, tol=0.05, callback=stop_at_57,
        steps=steps))
    (w1, h1), (w2, h2) = run("in_place"), run("plain")
    assert h1.stop_reason == h2.stop_reason == "interrupted" and h1.final_step == h2.final_step
    L = np.array(h1.losses)
    assert (L[:57] < 0.05).any(axis=0).sum() == 1         # one network stopped before step 57
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_a_batch_tracker_measures_only_the_networks_that_moved(monkeypatch):
    """Tracker on a NumPy batch: networks unchanged since its last call keep their values
    (not decomposed again), the others measured as a fresh tracker measures them; a NaN
    network counts as moved; weights of other shapes are measured whole."""
    rng = np.random.default_rng(73)
    start = [rng.standard_normal((4, 5, 5)) for _ in range(3)]
    tracker, sizes = align_fast.tracker(start), []
    svds = align_fast.reduced_svds
    monkeypatch.setattr(align_fast, "reduced_svds", lambda ws, *a: sizes.append(ws[0].shape[0]) or svds(ws, *a))
    now = [W + 0.1 * rng.standard_normal(W.shape) for W in start]
    first = tracker(now)
    now[1][2] += 0.05                                      # network 2 moves, the others stay
    second = tracker(now)
    fresh = align_fast.tracker(start)(now)
    assert sizes == [4, 1, 4, 4]                          # (the fresh one: its start, then all)
    for key in align.MEASURE_KEYS:
        np.testing.assert_array_equal(second[key], fresh[key])
        np.testing.assert_array_equal(np.delete(second[key], 2), np.delete(first[key], 2))
        assert second[key][2] != first[key][2]
    assert tracker(now)["alignment_paired"] is not second["alignment_paired"] and sizes[-1] == 4
    wider = [rng.standard_normal((4, 6, 6)) for _ in range(3)]
    assert align_fast.tracker(wider)(wider)["alignment_paired"].shape == (4,)


def test_range_basis_takes_the_rank_against_the_largest_singular_value():
    """Singular values (1, 1e-14) at rtol 1e-10: rank 1 (1e-14 is below 1e-10 x the largest);
    (100, 1e-6) at rtol 1e-6 and (1, 0.5) at 0.5: rank 1; a single column is its own basis; no column, none."""
    A = np.array([[1.0, 0.0], [0.0, 1e-14], [0.0, 0.0]])
    np.testing.assert_array_equal(np.abs(align_fast._range_basis(A, 1e-10)), [[1.0], [0.0], [0.0]])
    assert align_fast._range_basis(A, 1e-16).shape == (3, 2)
    assert align_fast._range_basis(np.diag([100.0, 1e-6]), 1e-6).shape == (2, 1)
    assert align_fast._range_basis(np.zeros((3, 0)), 1e-6).shape == (3, 0)
    assert align_fast._range_basis(np.diag([1.0, 0.5]), 0.5).shape == (2, 1)   # above, not at
    assert align_fast._range_basis(np.diag([1.0, 0.0]), 0.0).shape == (2, 1)
    np.testing.assert_allclose(np.abs(align_fast._range_basis(np.ones((4, 1)), 1e-10)), 0.5)


def _interrupt_at(code, line, before):
    """A tracer raising KeyboardInterrupt where ``code`` first reaches ``line``: Ctrl-C
    between two statements, as a signal arrives.  It then gives the thread back to the
    tracer ``before`` (coverage's, when the suite is traced)."""
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line:
            sys.settrace(before)
            raise KeyboardInterrupt
        return local
    return lambda frame, event, arg: local if frame.f_code is code else None


ADVANCE_LINES = sorted({line for _, line in dis.findlinestarts(align_fast._advance.__code__)
                        if line and line > align_fast._advance.__code__.co_firstlineno})


@pytest.mark.parametrize("line", ADVANCE_LINES)
def test_ctrl_c_between_any_two_statements_of_a_runs_bookkeeping_keeps_a_consistent_run(line):
    """Ctrl-C at each line of align_fast._advance (where it is first reached, in runs of 10
    steps with a callback, stopping by tol inside a run): the records are those of steps
    0..final_step and the weights the clean run's at final_step, bit for bit; before the
    callbacks of a run, the run is not taken (final_step at its start).  (The loss of the
    final step is recorded when it was computed before the interrupt.)"""
    rng = np.random.default_rng(46)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)
    Y = rng.standard_normal((3, 4)) @ X / 2
    run = lambda tol, max_steps=2000: until_interrupted(lambda: align_fast.train(
        weights, X, Y, lr=0.05, max_steps=max_steps, tol=tol, measure_every=10,
        callback=lambda *a: None))
    full, full_hist = run(tol=1e-3)
    code, before = align_fast._advance.__code__, sys.gettrace()
    sys.settrace(_interrupt_at(code, line, before))
    try:
        out, hist = run(tol=1e-3)
    finally:
        sys.settrace(before)
    assert sys.gettrace() is before                      # (coverage's tracer kept, when traced)
    assert hist.stop_reason in ("interrupted", "tol")
    assert hist.steps == list(range(len(hist.steps)))      # (the last step's loss: if taken)
    assert len(hist.steps) - hist.final_step in (0, 1) and hist.losses == full_hist.losses[:len(hist.steps)]
    clean, _ = run(tol=0.0, max_steps=hist.final_step) if hist.final_step else (weights, None)
    for a, b in zip(out, clean):
        np.testing.assert_array_equal(a, b)
    loop = inspect.getsource(align_fast._advance).splitlines()
    if "for j, value in" in loop[line - code.co_firstlineno]:
        assert hist.stop_reason == "interrupted" and hist.final_step % 10 == 0


def test_split_measures_of_a_two_layer_network_in_the_row_space(monkeypatch):
    """Two layers, n = 2 < k0 and a wide hidden layer (20 > n + k2): layer 1 is split with no
    deeper layers to decompose (this raised), and the measures are the reference's."""
    split_used, fast, slow = _train_with_split_measures(
        monkeypatch, [6, 20, 4], 2, 1e-6, max_steps=200, rng=np.random.default_rng(47))
    assert split_used and all(split_used)
    for key in slow.measurements:
        np.testing.assert_allclose(fast.measurements[key], slow.measurements[key], atol=1e-9)


def test_split_measures_count_static_directions_against_the_largest_value_now(monkeypatch):
    """At rtol 0.8 a static direction of layer 1 (value 1) is used while the largest value
    is below 1 / 0.8 and unused once the moving ones grow past it: the split is exact only
    while both times count the same (else the dense measures), and the paired values are
    the reference's."""
    sigmas = lambda rng: [np.ones(20), rng.uniform(0.5, 1, 3), rng.uniform(0.5, 1, 2)]
    split_used, fast, slow = _train_with_split_measures(
        monkeypatch, [20, 24, 3, 2], 6, 0.8, sigmas, y_scale=3.0, max_steps=600)
    assert True in split_used and False in split_used
    for key in ("alignment_paired", "invariance_paired"):
        np.testing.assert_allclose(fast.measurements[key], slow.measurements[key], atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_measures_far_from_the_start_equal_the_dense_ones(seed):
    """k0 = 4 < k1 = 12: far from the start (C and W~2 large and random, so U_1 turns well
    out of its start's span and the complement of span(U_1(0)) takes matches) the split
    measures are the dense layers' by align.tracker."""
    rng = np.random.default_rng(seed)
    widths, n = [4, 12, 6, 2], 2
    X, Y = rng.standard_normal((4, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    Q = align_fast._range_basis(np.concatenate([weights[0] @ X, weights[1].T], axis=1), 1e-12)
    start = [np.zeros((Q.shape[1], n)), weights[1] @ Q, weights[2]]
    now = [5 * rng.standard_normal((Q.shape[1], n)), rng.standard_normal((6, Q.shape[1])), weights[2]]
    dense = lambda ps: [weights[0] + Q @ ps[0] @ X.T, ps[1] @ Q.T, ps[2]]
    got = align_fast._split_measure(weights[0], Q, X.T, start)(align_fast.tracker(dense(start)), now)
    want = align.tracker(dense(start))(dense(now))
    assert want["invariance_paired"] < 0.9
    for key in ("alignment_paired", "invariance_paired"):
        assert got[key] == pytest.approx(want[key], abs=1e-10)


def test_batch_steps_refuse_a_run_longer_than_their_runs():
    rng = np.random.default_rng(48)
    batch, X, Y = _batch_problem(rng, [3, 4, 2], 5, 2, np.float64, False)
    steps = align_fast._BatchSquaredLossSteps(batch, X, Y, "mse", 0.01, 0.0)
    assert steps._run(steps.longest).shape == (steps.longest, 2)
    with pytest.raises(ValueError, match="longer than"):
        steps._run(steps.longest + 1)


def test_a_learning_rate_of_zero_is_refused():
    rng = np.random.default_rng(49)
    weights, X, Y = random_problem(rng, "mse", [3, 4, 2], 5)
    batch = [np.stack([W, W]) for W in weights]
    for lib in (align, align_fast):
        with pytest.raises(ValueError, match="positive finite"):
            lib.train(weights, X, Y, lr=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        align_fast.train(batch, X, np.stack([Y, Y]), lr=[0.1, 0.0])


def test_wall_time_is_the_runs_duration():
    """wall_time: seconds from the start, finished or diverged: more than 0 and at most the
    call's own duration (no bound that depends on the machine's speed)."""
    rng = np.random.default_rng(50)
    weights, X, Y = random_problem(rng, "mse", [3, 4, 2], 5)
    for lib in (align, align_fast):
        start = time.perf_counter()
        _, hist = lib.train(weights, X, Y, lr=0.05, max_steps=50, tol=0.0)
        assert 0.0 < hist.wall_time <= time.perf_counter() - start
        start = time.perf_counter()
        with pytest.raises(align.DivergenceError) as e:
            lib.train([10 * W for W in weights], X, 100 * Y, lr=100.0, max_steps=1000)
        assert 0.0 < e.value.history.wall_time <= time.perf_counter() - start


def test_a_network_exactly_at_tol_goes_on():
    """_frozen_below stops a network of a batch below tol: one whose loss is exactly tol
    still steps, on both implementations (the batch's other network is far above)."""
    rng = np.random.default_rng(52)
    problems = [random_problem(rng, "mse", [3, 4, 2], 5) for _ in range(2)]
    batch = [np.stack([p[0][i] for p in problems]) for i in range(2)]
    X, Y = np.stack([p[1] for p in problems]), np.stack([p[2] for p in problems])
    Y[1] *= 10
    at = align_fast.train(batch, X, Y, max_steps=0, tol=0.0)[1].losses[0][0]     # (the batch's sum)
    for steps in ("plain", "auto"):
        out, hist = align_fast.train(batch, X, Y, lr=0.05, max_steps=3, tol=at, steps=steps)
        assert hist.losses[0][0] == at and hist.final_step == 3
        assert not np.array_equal(out[0][0], batch[0][0])


def test_first_hidden_basis_takes_the_rank_at_100_eps_of_the_dtype():
    """[W_1(0) X, W_2(0)^T] with singular values 1 and s (float32, eps = 1.19e-7): rank 2 for
    s = 1.198e-5 (above 100 eps), 1 for s = 1.15e-5."""
    X = np.array([[1.0], [0.0], [0.0]], dtype=np.float32)
    W10 = np.zeros((6, 3), dtype=np.float32)
    W10[0, 0] = 1.0                                          # W_1(0) X = e1
    for value, rank in ((1.198e-5, 2), (1.15e-5, 1)):
        W2 = np.zeros((1, 6), dtype=np.float32)
        W2[0, 1] = value                                     # W_2(0)^T = s e2
        assert align_fast._first_hidden_basis([W10, W2], X).shape == (6, rank)


def test_the_split_tolerance_scales_with_the_first_layer():
    """The invariance check of _split_first_layers is relative to ||W_1(0)||^2: an aligned
    start scaled by 100 splits as it does at scale 1 (rounding grows with the scale)."""
    rng = np.random.default_rng(25)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    for scale in (1.0, 100.0):
        W10 = scale * weights[0]
        Q = align_fast._range_basis(np.concatenate([W10 @ X, weights[1].T], axis=1), 1e-12)
        assert align_fast._split_first_layers(W10, Q, X.T) is not None


def test_measures_at_rtol_0_of_a_batch_with_a_zero_singular_value():
    """A zero singular value is not used at rtol 0 (0 > 0 fails): the batch's networks are not
    generic, and the fast tracker gives the reference's values."""
    rng = np.random.default_rng(53)
    start = [np.stack([np.diag([1.0, 0.5, 0.0])] * 2) for _ in range(2)]   # (an exact zero)
    now = [W.copy() for W in start]
    for W in now:
        W[0, :2, :2] += 0.3 * rng.standard_normal((2, 2))          # network 0 turns, its zero stays
    fast = align_fast.tracker(start, rtol=0.0)(now)
    ref = [align.tracker(one(start, b), rtol=0.0)(one(now, b)) for b in range(2)]
    assert fast["alignment_paired"][0] < 1.0
    for key in align.MEASURE_KEYS:
        np.testing.assert_allclose(fast[key], [r[key] for r in ref], rtol=1e-12)



# ------------------------------------------------------------------- batches --
@pytest.mark.parametrize("kind", ["mse", "mse_mean", "ce", "logistic", "exp"])
@pytest.mark.parametrize("steps", ["auto", "plain"])
def test_each_network_of_a_batch_ends_as_its_run_alone(kind, steps):
    """A batch of three networks, each with its own data and learning rate, stopping below
    tol at different steps: every network ends where align.train alone ends it, to 1e-12
    relative in float64, at the same step, for every loss (freezing a stopped network is
    what makes this hold)."""
    rng = np.random.default_rng(80)
    widths = [4, 6, 1 if kind in ("logistic", "exp") else 3]
    problems = [random_problem(rng, kind, widths, 8) for _ in range(3)]
    batch = [np.stack([p[0][i] for p in problems]) for i in range(2)]
    X, Y = np.stack([p[1] for p in problems]), np.stack([p[2] for p in problems])
    if kind in ("mse", "mse_mean"):
        Y = np.stack([rng.standard_normal((3, 4)) @ x / 2 for x in X])            # interpolable
    rates = [0.1, 0.05, 0.03]
    tol = 1.0001 * max(align.train(one(batch, b), X[b], Y[b], kind, lr=rates[b], max_steps=60,
                                   tol=0.0)[1].losses[-1] for b in range(3))   # all stop by 60
    alone, histories = each_alone(batch, X, Y, rates, kind=kind, max_steps=400, tol=tol)
    out, hist = align_fast.train(batch, X, Y, kind, lr=rates, max_steps=400, tol=tol, steps=steps)
    assert len({h.final_step for h in histories}) > 1 and hist.final_step == max(
        h.final_step for h in histories)
    L = np.array(hist.losses)
    for b, h in enumerate(histories):
        assert h.stop_reason == "tol" and h.steps[-1] == h.final_step
        assert hist.steps[int(np.argmax(L[:, b] < tol))] == h.final_step      # its own stop
        for a, W in zip(out, alone):
            assert np.abs(a[b] - W[b]).max() <= 1e-12 * np.abs(W[b]).max()


def test_eq8_on_a_batch_equals_each_network_alone():
    rng = np.random.default_rng(2)
    widths, B = [4, 5, 3], 3
    batch = [rng.standard_normal((B, widths[i + 1], widths[i])) for i in range(2)]
    X, Y = rng.standard_normal((B, 4, 6)), rng.standard_normal((B, 3, 6))
    L, grads = align_fast._chain_gradients(batch, X, lambda F: align_fast._loss_at_outputs(F, Y, "mse"))
    for b in range(B):
        assert L[b] == pytest.approx(align.loss(one(batch, b), X[b], Y[b]), rel=1e-13)
        for g, s in zip(grads, align.gradients(one(batch, b), X[b], Y[b])):
            np.testing.assert_allclose(g[b], s, rtol=1e-12)


def test_alignment_and_invariance_of_a_batch_give_one_value_per_network():
    """align_fast.alignment and invariance of a batch (3-D layers; they raised IndexError):
    each network's value is align's on that network; align refuses a batch, naming the fix."""
    rng = np.random.default_rng(81)
    for widths in ([5, 5, 5], [5, 7, 3], [4, 6, 6, 2]):
        start = [rng.standard_normal((4, widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        now = [W + 0.2 * rng.standard_normal(W.shape) for W in start]
        for how in ("paired", "matched"):
            got = align_fast.alignment(now, how)
            assert got.shape == (4,)
            np.testing.assert_allclose(got, [align.alignment(one(now, b), how) for b in range(4)],
                                       rtol=0, atol=1e-14)
            got = align_fast.invariance(now, start, how)
            np.testing.assert_allclose(got, [align.invariance(one(now, b), one(start, b), how)
                                             for b in range(4)], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="align_fast trains batches"):
        align.alignment(now)


def test_steps_names_a_strategy_that_applies():
    rng = np.random.default_rng(82)
    weights, X, Y = random_problem(rng, "ce", [4, 5, 3], 6)
    with pytest.raises(ValueError, match="steps must be one of"):
        align_fast.train(weights, X, Y, "ce", steps="fast")
    with pytest.raises(ValueError, match="'in_place' a squared loss"):
        align_fast.train(weights, X, Y, "ce", max_steps=5, steps="in_place")
    with pytest.raises(ValueError, match="'graphs' needs CuPy"):
        align_fast.train(weights, X, Y, "ce", max_steps=5, steps="graphs")
    with pytest.raises(ValueError, match="gradient_descent takes"):
        align_fast.gradient_descent(weights, lambda ps: (0.0, ps), steps="in_place")
    plain = align_fast.train(weights, X, Y, "ce", lr=0.1, max_steps=20, steps="plain")[0]
    for a, b in zip(plain, align.train(weights, X, Y, "ce", lr=0.1, max_steps=20)[0]):
        np.testing.assert_array_equal(a, b)                        # align.train's loop


@pytest.mark.parametrize("steps", ["auto", "plain"])
def test_ctrl_c_in_train_reaches_the_caller_with_the_run_so_far(steps):
    """Ctrl-C (here in the callback at step 30) is not swallowed: train raises
    align.Interrupted, a KeyboardInterrupt, carrying the weights and History of a clean run
    to step 30."""
    rng = np.random.default_rng(83)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)

    def interrupt(step, loss, hist):
        if step == 30:
            raise KeyboardInterrupt
    for lib in (align, align_fast):
        options = {"steps": steps} if lib is align_fast else {}
        with pytest.raises(KeyboardInterrupt) as e:
            lib.train(weights, X, Y, lr=0.05, max_steps=100, tol=0.0, callback=interrupt, **options)
        assert isinstance(e.value, align.Interrupted)
        hist = e.value.history
        assert hist.stop_reason == "interrupted" and hist.final_step == 30 and hist.steps[-1] == 30
        clean, _ = align.train(weights, X, Y, lr=0.05, max_steps=30, tol=0.0)
        for a, b in zip(e.value.weights, clean):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_tracker_on_a_batch_equals_one_network_at_a_time():
    rng = np.random.default_rng(23)
    for widths in ([6, 6, 6, 6], [5, 7, 3]):
        w0 = [rng.standard_normal((4, widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        w1 = [W + 0.2 * rng.standard_normal(W.shape) for W in w0]
        got = align_fast.tracker(w0)(w1)
        for b in range(4):
            want = align.tracker(one(w0, b))(one(w1, b))
            for key, value in want.items():
                assert got[key][b] == pytest.approx(value, abs=1e-12)
    aligned = align.aligned_network([random_orthogonal(rng, 4) for _ in range(3)],
                                    [np.array([3.0, 2.0, 2.0, 1.0])] * 2)     # repeated values
    generic = [rng.standard_normal((4, 4)) for _ in range(2)]
    mixed = [np.stack([a, g]) for a, g in zip(aligned, generic)]
    got = align_fast.tracker(mixed)(mixed)
    assert got["alignment_paired"][0] == pytest.approx(1.0, abs=1e-12)
    assert got["alignment_paired"][1] == pytest.approx(align.alignment(generic), abs=1e-12)


def test_a_network_diverging_in_a_batch_stops_and_the_others_go_on_as_alone():
    """One network of a batch diverges (its data 30 times larger); it is frozen where it
    diverged and measured as NaN, and the others end exactly as their own runs."""
    rng = np.random.default_rng(8)
    nets = [[rng.standard_normal((4, 4)) / 2 for _ in range(3)] for _ in range(3)]
    Xs = [rng.standard_normal((4, 6)) * (30 if b == 1 else 1) for b in range(3)]
    Ys = [rng.standard_normal((4, 6)) for _ in range(3)]
    batch = [np.stack([net[i] for net in nets]) for i in range(3)]
    out, hist = align_fast.train(batch, np.stack(Xs), np.stack(Ys), lr=0.05, max_steps=400, tol=0.0,
                                 measure_every=50, measures={"m": align_fast.tracker(batch)})
    rows = np.array(hist.losses)
    assert not np.isfinite(rows[-1, 1]) and np.isfinite(rows[:, [0, 2]]).all()
    last = hist.measurements["alignment_paired"][-1][1]        # (frozen: NaN if not finite)
    assert np.isnan(last) or 0 <= last <= 1
    for b in (0, 2):
        alone, own = align.train(nets[b], Xs[b], Ys[b], lr=0.05, max_steps=400, tol=0.0,
                                 measure_every=50, measures={"m": align.tracker(nets[b])})
        np.testing.assert_allclose(rows[:, b], own.losses, rtol=1e-10)
        for W, A in zip(out, alone):
            np.testing.assert_allclose(W[b], A, rtol=1e-9, atol=1e-12)


def test_networks_of_a_batch_with_non_finite_weights_are_measured_as_nan():
    rng = np.random.default_rng(9)
    ps = [rng.standard_normal((2, 3, 3))]
    ps[0][1, 0, 0] = np.inf
    measure = lambda ws, w0: {"size": np.abs(ws[0]).sum(axis=(1, 2))}
    _, hist = align_fast.gradient_descent(ps, lambda ws: (np.array([1.0, np.nan]), [0 * ws[0]]),
                                          max_steps=2, tol=0.0, measures={"m": measure})
    sizes = np.array(hist.measurements["size"])
    assert np.isnan(sizes[:, 1]).all() and np.allclose(sizes[:, 0], np.abs(ps[0][0]).sum())
    rows = lambda ws, w0: {"rows": np.abs(ws[0]).sum(axis=2)}       # (b, 3) values per network
    _, hist = align_fast.gradient_descent(ps, lambda ws: (np.array([1.0, np.nan]), [0 * ws[0]]),
                                          max_steps=2, tol=0.0, measures={"m": rows})
    rows = np.array(hist.measurements["rows"])
    assert rows.shape == (2, 2, 3) and np.isnan(rows[:, 1]).all()
    np.testing.assert_allclose(rows[:, 0], np.broadcast_to(np.abs(ps[0][0]).sum(axis=1), (2, 3)))


def test_matched_invariance_of_a_batch_scores_each_initial_direction_as_the_authors_code():
    from test_align import authors_matched_invariance
    rng = np.random.default_rng(5)
    for widths in ([20, 30, 8, 3], [3, 7, 2]):
        W0 = [rng.standard_normal((widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        Wt = [W + 0.3 * rng.standard_normal(W.shape) for W in W0]
        want = authors_matched_invariance(Wt, W0)
        batch_t, batch_0 = ([np.stack([W, W]) for W in ws] for ws in (Wt, W0))
        got = align_fast.tracker(batch_0)(batch_t)["invariance_matched"]
        np.testing.assert_allclose(got, [want, want], atol=1e-12)


def test_a_batch_from_lists_and_with_data_for_another_batch_size():
    """Batches convert lists like one network; data for 3 networks given to a batch of 2 is
    refused, naming the sizes."""
    rng = np.random.default_rng(84)
    batch = [rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 2, 4))]
    X, Y = rng.standard_normal((3, 3, 5)), rng.standard_normal((3, 2, 5))
    with pytest.raises(ValueError, match="X holds data for 3 networks but the batch has B = 2"):
        align_fast.train(batch, X, Y[:2], max_steps=1)
    with pytest.raises(ValueError, match="Y holds data for 3 networks"):
        align_fast.train(batch, X[:2], Y, max_steps=1)
    a = align_fast.train([W.tolist() for W in batch], X[:2].tolist(), Y[:2].tolist(), max_steps=3)[0]
    b = align_fast.train(batch, X[:2], Y[:2], max_steps=3)[0]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
