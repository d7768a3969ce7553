"""Core of align.py: gradients (Eq. (8)), GD, usSVD (Definition 1), measures, Definition 2."""
import gc
import json
import math
import types
import weakref

import numpy as np
import pytest

import align
from conftest import CUPY, greedy_cases, random_orthogonal

KINDS = ["mse", "mse_mean", "ce", "logistic", "exp"]


def random_problem(rng, kind, widths, n):
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_eq8_gradients_match_finite_differences(kind, depth):
    rng = np.random.default_rng(depth * 10 + KINDS.index(kind))
    widths = list(rng.integers(2, 6, depth + 1))
    if kind in ("logistic", "exp"):
        widths[-1] = 1
    weights, X, Y = random_problem(rng, kind, widths, n=int(rng.integers(3, 8)))
    grads = align.gradients(weights, X, Y, kind)
    for i in range(depth):
        G = finite_difference(weights, X, Y, kind, i)
        assert np.linalg.norm(grads[i] - G) <= 1e-6 * np.linalg.norm(G)


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
    Y = align.prepare_targets(labels, "ce", 3, 40)
    output_grad = lambda F: align._loss_and_output_grad(F, Y, "ce")
    results, counted, mm = {}, {}, align._mm
    for at_outputs in (False, True):
        flops = []
        monkeypatch.setattr(align, "_mm", lambda A, B: flops.append(A.shape[-2] * A.shape[-1] * B.shape[-1])
                            or mm(A, B))
        monkeypatch.setattr(align, "_cheaper_at_outputs", lambda shapes, n: at_outputs)
        results[at_outputs], counted[at_outputs] = align._chain_gradients(weights, X, output_grad, True), sum(flops)
        monkeypatch.undo()
    (L1, grads1, dX1), (L2, grads2, dX2) = results[False], results[True]
    np.testing.assert_allclose(L2, L1, rtol=1e-13)
    for a, b in zip(grads2 + [dX2], grads1 + [dX1]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())
    shapes = tuple(W.shape[-2:] for W in weights)
    assert (counted[False], counted[True]) == align._chain_costs(shapes, 40)
    assert align._cheaper_at_outputs(shapes, 40) == (align.AT_OUTPUTS_GAIN * counted[True] < counted[False])


def test_gradients_grouped_at_outputs_match_finite_differences():
    rng = np.random.default_rng(55)
    weights, X, Y = random_problem(rng, "mse", [3, 12, 12, 2], 30)
    assert align._cheaper_at_outputs(tuple(W.shape for W in weights), 30)
    grads = align.gradients(weights, X, Y)
    for i in range(3):
        G = finite_difference(weights, X, Y, "mse", i)
        assert np.linalg.norm(grads[i] - G) <= 1e-6 * np.linalg.norm(G)
    assert not align._cheaper_at_outputs(((9, 9),) * 3, 9)     # fig1a: layer by layer


def test_steps_in_place_only_where_eq8_goes_layer_by_layer(monkeypatch):
    """_SquaredLossSteps (call-bound small networks) backpropagates layer by layer; where
    grouping at the outputs is cheaper (n >= k0, narrow ends) train steps that way."""
    made = []
    monkeypatch.setattr(align, "_SquaredLossSteps", lambda *a: made.append(a) or align._StepChunks(
        a[0], lambda ps: align._loss_and_gradients(ps, a[1], a[2], a[3]), a[4]))
    rng = np.random.default_rng(56)
    for widths, n, in_place in (([5, 5, 5], 9, True), ([3, 12, 12, 2], 30, False)):
        weights, X, Y = random_problem(rng, "mse", widths, n)
        align.train(weights, X, Y, max_steps=3)
        assert len(made) == in_place
        made.clear()


def test_gradients_on_backend_match_numpy(xp):
    rng = np.random.default_rng(1)
    weights, X, Y = random_problem(rng, "mse", [4, 6, 5, 3], 7)
    want = align.gradients(weights, X, Y)
    got = align.gradients([xp.asarray(W) for W in weights], xp.asarray(X), xp.asarray(Y))
    assert all(type(g).__module__.split(".")[0] == xp.__name__ for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(align.to_numpy(g), w, rtol=1e-12, atol=1e-14)


def test_batched_networks_match_one_at_a_time():
    rng = np.random.default_rng(2)
    widths, B = [4, 5, 3], 3
    batch = [rng.standard_normal((B, widths[i + 1], widths[i])) for i in range(2)]
    X, Y = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    L = align.loss(batch, X, Y)
    grads = align.gradients(batch, X, Y)
    for b in range(B):
        single = [W[b] for W in batch]
        assert L[b] == pytest.approx(align.loss(single, X, Y), rel=1e-13)
        for g, s in zip(grads, align.gradients(single, X, Y)):
            np.testing.assert_allclose(g[b], s, rtol=1e-12)


def test_mse_conventions_differ_by_kd_over_2():
    rng = np.random.default_rng(3)
    weights, X, Y = random_problem(rng, "mse", [5, 4, 6], 8)
    ratio = align.loss(weights, X, Y, "mse") / align.loss(weights, X, Y, "mse_mean")
    assert ratio == pytest.approx(6 / 2)


def test_cross_entropy_labels_and_one_hot_agree_and_are_stable():
    rng = np.random.default_rng(4)
    weights, X, labels = random_problem(rng, "ce", [5, 4, 3], 9)
    onehot = np.eye(3)[:, labels]
    assert align.loss(weights, X, labels, "ce") == pytest.approx(
        align.loss(weights, X, onehot, "ce"), rel=1e-14)
    big = [W * 1e3 for W in weights]
    value = align.loss(big, X, labels, "ce")
    grads = align.gradients(big, X, labels, "ce")
    assert math.isfinite(value) and value > 0
    assert all(np.isfinite(g).all() for g in grads)
    # the loss of a confidently right network is near zero, not nan
    F = align.forward(big, X)
    assert align.loss(big, X, F.argmax(0), "ce") < 1e-3


def test_logistic_loss_is_stable_for_large_margins():
    X = np.array([[1.0, -1.0]])
    Y = np.array([[1.0, 1.0]])
    for scale in (1e3, 1e6):
        L = align.loss([np.array([[scale]])], X, Y, "logistic")
        assert L == pytest.approx(scale / 2, rel=1e-9)   # log(1+e^{-s}) + log(1+e^{s}) over 2


def test_gradient_descent_reaches_threshold_and_records():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3, 10))
    target = rng.standard_normal((3, 3))
    Y = target @ X
    weights = [np.eye(3) + 0.1 * rng.standard_normal((3, 3)) for _ in range(2)]
    before = [W.copy() for W in weights]
    calls = []
    out, hist = align.train(weights, X, Y, lr=0.05, max_steps=20_000, tol=1e-8,
                            measure_every=50, measures={"align": lambda w, w0: align.alignment(w)},
                            callback=lambda step, L, h: calls.append(step))
    assert hist.stop_reason == "tol"
    assert hist.losses[-1] < 1e-8 <= hist.losses[-2]
    assert hist.steps == list(range(hist.final_step + 1)) == calls
    assert hist.measure_steps[0] == 0 and hist.measure_steps[-1] == hist.final_step
    assert all(s % 50 == 0 for s in hist.measure_steps[:-1])
    assert len(hist.measurements["align"]) == len(hist.measure_steps)
    np.testing.assert_allclose(out[1] @ out[0], target, atol=1e-3)
    assert all((a == b).all() for a, b in zip(weights, before))   # inputs untouched
    json.dumps(hist.to_dict())


def test_gradient_descent_stops_at_step_budget():
    rng = np.random.default_rng(6)
    weights, X, Y = random_problem(rng, "mse", [3, 3, 3], 4)
    _, hist = align.train(weights, X, Y, lr=1e-3, max_steps=7, tol=0.0, record_every=3)
    assert hist.stop_reason == "max_steps" and hist.final_step == 7
    assert hist.steps == [0, 3, 6, 7]


def test_gradient_descent_divergence_names_step_and_lr():
    rng = np.random.default_rng(7)
    weights, X, Y = random_problem(rng, "mse", [4, 4, 4], 4)
    with pytest.raises(align.DivergenceError, match=r"at step \d+ with lr = 100.*smaller") as e:
        align.train([W * 10 for W in weights], X, Y * 100, lr=100.0, max_steps=1000)
    assert e.value.history.stop_reason == "diverged"
    assert all(math.isfinite(L) for L in e.value.history.losses)


def test_ussvd_definition1_and_its_permutations_and_flips():
    rng = np.random.default_rng(8)
    for m, n in [(4, 6), (6, 4), (5, 5)]:
        A = rng.standard_normal((m, n))
        U, s, V = align.ussvd(A)
        assert U.shape == (m, m) and V.shape == (n, n) and s.shape == (min(m, n),)
        np.testing.assert_allclose(U.T @ U, np.eye(m), atol=1e-13)
        np.testing.assert_allclose(V.T @ V, np.eye(n), atol=1e-13)
        np.testing.assert_allclose(align.ussvd_matrix(U, s, V), A, atol=1e-13)
        perm = rng.permutation(min(m, n))
        signs = rng.choice([-1.0, 1.0], min(m, n))
        U2, s2, V2 = align.ussvd_flip(*align.ussvd_permute(U, s, V, perm), signs)
        assert (s2 < 0).any() or (signs > 0).all()
        np.testing.assert_allclose(align.ussvd_matrix(U2, s2, V2), A, atol=1e-13)
        np.testing.assert_allclose(U2.T @ U2, np.eye(m), atol=1e-13)


# ------------------------------------------------------------- measures ----

def aligned_case(rng, widths, values=(-2.0, 1.0, 1.0, 0.0, 3.0)):
    """An aligned network with shuffled, signed, repeated and zero singular values."""
    bases = [random_orthogonal(rng, k) for k in widths]
    sigmas = [rng.choice(values, min(widths[i], widths[i + 1])) for i in range(len(widths) - 1)]
    return align.aligned_network(bases, sigmas), bases


ALIGNED_WIDTHS = [[4, 4, 4, 4], [5, 7, 3, 6, 4], [2, 6, 6, 1], [6, 3, 8], [3, 3]]


@pytest.mark.parametrize("widths", ALIGNED_WIDTHS)
def test_definition2_networks_score_exactly_one_on_paired_rule(widths):
    for seed in range(6):
        weights, _ = aligned_case(np.random.default_rng(seed), widths)
        assert align.alignment(weights, "paired") == pytest.approx(1.0, abs=1e-12)
        assert align.is_aligned(weights)


def test_repeated_singular_values_in_any_basis_still_score_one():
    rng = np.random.default_rng(9)
    Q = [random_orthogonal(rng, 4) for _ in range(3)]
    weights = align.aligned_network(Q, [np.ones(4), np.array([3.0, 3.0, -1.0, 0.0])])
    # the library SVD of W_1 = Q_1 Q_0^T returns an arbitrary basis of R^4
    assert align.alignment(weights, "paired") == pytest.approx(1.0, abs=1e-12)
    assert align.alignment(weights, "matched") < 0.999


def rotate(W, angle, rng):
    """W rotated on the left by a small random rotation of the given angle."""
    k = W.shape[0]
    A = rng.standard_normal((k, k))
    A = (A - A.T) / np.linalg.norm(A - A.T, 2) * angle
    w, E = np.linalg.eig(A)
    return (E @ np.diag(np.exp(w)) @ np.linalg.inv(E)).real @ W


def test_unaligned_pair_scores_below_one_and_is_rejected():
    rng = np.random.default_rng(10)
    for widths in ([4, 4, 4, 4], [5, 7, 3, 6]):
        bases = [random_orthogonal(rng, k) for k in widths]
        sigmas = [rng.uniform(1, 2, min(widths[i], widths[i + 1])) for i in range(len(widths) - 1)]
        weights = align.aligned_network(bases, sigmas)
        weights[1] = rotate(weights[1], 1e-3, rng)
        assert align.alignment(weights, "paired") < 1 - 1e-8
        test = align.is_aligned(weights)
        assert not test and test.residual > 1e-5


def test_generic_random_network_is_far_from_aligned():
    rng = np.random.default_rng(11)
    weights = [rng.standard_normal((6, 6)) for _ in range(3)]
    assert align.alignment(weights, "paired") < 0.9
    assert align.alignment(weights, "matched") < 0.9
    assert not align.is_aligned(weights)


def test_matched_rule_is_the_authors_row_maximum():
    rng = np.random.default_rng(12)
    weights = [rng.standard_normal((5, 4)), rng.standard_normal((3, 5)), rng.standard_normal((2, 3))]
    total, rows = 0.0, 0
    for A, B in zip(weights, weights[1:]):
        U = np.linalg.svd(A, full_matrices=False)[0]
        V = np.linalg.svd(B, full_matrices=False)[2].T
        M = np.abs(V.T @ U)
        total, rows = total + M.max(1).sum(), rows + M.shape[0]
    assert align.alignment(weights, "matched") == pytest.approx(total / rows, rel=1e-12)


def test_measures_lie_in_unit_interval_and_invariance_of_self_is_one():
    rng = np.random.default_rng(13)
    for _ in range(5):
        weights = [rng.standard_normal((5, 5)) for _ in range(3)]
        other = [rng.standard_normal((5, 5)) for _ in range(3)]
        for how in ("paired", "matched"):
            assert 0 <= align.alignment(weights, how) <= 1 + 1e-12
            assert 0 <= align.invariance(weights, other, how) <= 1 + 1e-12
            assert align.invariance(weights, weights, how) == pytest.approx(1.0, abs=1e-12)


def test_invariance_ignores_changes_of_singular_values_only():
    rng = np.random.default_rng(14)
    weights, bases = aligned_case(rng, [5, 5, 5, 5], values=(1.0, 2.0, 3.0, 4.0, 5.0))
    later = align.aligned_network(bases, [rng.uniform(1, 9, 5) for _ in range(3)])
    assert align.invariance(later, weights, "paired") == pytest.approx(1.0, abs=1e-12)
    moved = [rotate(W, 0.3, rng) for W in later]
    assert align.invariance(moved, weights, "paired") < 0.995


def test_measures_on_backend(xp):
    rng = np.random.default_rng(15)
    weights, _ = aligned_case(rng, [4, 5, 4])
    dev = [xp.asarray(W) for W in weights]
    assert align.alignment(dev) == pytest.approx(1.0, abs=1e-12)
    assert align.is_aligned(dev)


# -------------------------------------------------------- Definition 2 ----

def test_is_aligned_returns_witnessing_ussvds():
    rng = np.random.default_rng(16)
    for widths in ALIGNED_WIDTHS:
        weights, _ = aligned_case(rng, widths)
        test = align.is_aligned(weights)
        assert test and test.residual < 1e-12
        for i, (W, (U, s, V)) in enumerate(zip(weights, test.ussvds)):
            np.testing.assert_allclose(U.T @ U, np.eye(U.shape[0]), atol=1e-12)
            np.testing.assert_allclose(align.ussvd_matrix(U, s, V), W, atol=1e-12)
            if i + 1 < len(weights):
                np.testing.assert_array_equal(U, test.ussvds[i + 1][2])


def test_is_aligned_rank_one_layers_agree_with_dot_product():
    rng = np.random.default_rng(17)
    for trial in range(8):
        u = rng.standard_normal(5)
        u /= np.linalg.norm(u)
        v = u if trial % 2 == 0 else rng.standard_normal(5)
        v /= np.linalg.norm(v)
        W1 = np.outer(u, rng.standard_normal(4))
        W2 = np.outer(rng.standard_normal(3), v)
        expected = abs(v @ u) > 1 - 1e-12
        assert bool(align.is_aligned([W1, W2])) == expected


def test_commuting_grams_are_not_enough_for_rectangular_layers():
    W1 = np.array([[1.0], [0.0], [0.0]])            # uses e_1 of the 3-dim middle space
    W2 = np.array([[0.0, 1.0, 0.0]])                # uses e_2
    assert np.allclose((W1 @ W1.T) @ (W2.T @ W2), (W2.T @ W2) @ (W1 @ W1.T))
    assert not align.is_aligned([W1, W2])
    assert align.alignment([W1, W2], "paired") == 0.0
    assert align.is_aligned([W1, np.array([[2.0, 0.0, 0.0]])])


# ------------------------------------------------------------ bad input ----

@pytest.mark.parametrize("call, message", [
    (lambda: align.loss([np.ones((3, 4)), np.ones((2, 5))], np.ones((4, 2)), np.ones((2, 2))),
     "W_2 .* needs 3 columns"),
    (lambda: align.loss([np.ones((3, 4))], np.ones((5, 2)), np.ones((3, 2))), "X must be k0 x n = 4"),
    (lambda: align.loss([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 3))), "Y must be kd x n = 3 x 2"),
    (lambda: align.loss([np.full((3, 4), np.nan)], np.ones((4, 2)), np.ones((3, 2))), "W_1 contains NaN.*learning rate"),
    (lambda: align.loss([np.ones((3, 4))], np.full((4, 2), np.inf), np.ones((3, 2))), "X contains NaN or inf .clean the data"),
    (lambda: align.loss([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), "hinge"), "unknown loss kind 'hinge'"),
    (lambda: align.loss([np.ones((3, 4))], np.ones((4, 2)), np.array([0, 3]), "ce"), r"labels must lie in 0..2"),
    (lambda: align.loss([np.ones((1, 4))], np.ones((4, 2)), np.array([[1.0, 0.5]]), "logistic"), "-1 or \\+1"),
    (lambda: align.loss([np.ones((2, 4))], np.ones((4, 2)), np.ones((2, 2)), "logistic"), "kd = 1"),
    (lambda: align.alignment([np.ones((3, 3))], how="sorted"), "how must be one of"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), lr=-1), "lr must be"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), max_steps=2.5),
     "max_steps must be an integer >= 0, got 2.5"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), measure_every=0),
     "measure_every must be an integer >= 1"),
    (lambda: align.select_device("tpu"), "device must be one of"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(CUPY is not None, reason="a GPU is available here")
def test_gpu_without_cupy_names_what_is_missing(capsys):
    with pytest.raises(align.DeviceError, match="CuPy"):
        align.select_device("gpu")
    assert align.select_device("auto") is np
    assert "CPU" in capsys.readouterr().err


def test_tracker_equals_the_separate_measures():
    rng = np.random.default_rng(18)
    w0 = [rng.standard_normal((5, 4)), rng.standard_normal((3, 5))]
    w1 = [W + 0.1 * rng.standard_normal(W.shape) for W in w0]
    got = align.tracker(w0)(w1)
    for how in ("paired", "matched"):
        assert got[f"alignment_{how}"] == pytest.approx(align.alignment(w1, how), abs=1e-14)
        assert got[f"invariance_{how}"] == pytest.approx(align.invariance(w1, w0, how), abs=1e-14)


def test_layer_gradients_of_a_matrix_loss_match_finite_differences():
    rng = np.random.default_rng(19)
    weights = [rng.standard_normal((3, 3)) for _ in range(3)]
    M = rng.standard_normal((3, 3))
    value = lambda ws: 0.5 * (M * align.forward(ws, np.eye(3))).sum() ** 2
    P = align.forward(weights, np.eye(3))
    grads = align.layer_gradients(weights, np.eye(3), (M * P).sum() * M)
    h = 1e-6
    for i, W in enumerate(weights):
        for idx in [(0, 0), (1, 2)]:
            W[idx] += h
            up = value(weights)
            W[idx] -= 2 * h
            down = value(weights)
            W[idx] += h
            assert grads[i][idx] == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_greedy_matching_in_rounds_and_one_by_one_equals_the_sequential_greedy(monkeypatch):
    def zero_columns(rng, C, trial):                             # (left out by the greedy)
        if trial % 3 == 0:
            C[:, :, rng.random(C.shape[2]) < 0.4] = 0.0
    for C, capacity, want in greedy_cases(20, 400, 3, zero_columns):
        for largest, rows in ((0, 0), (40, 0), (0, 16), (10 ** 6, 0)):   # in rounds, rounds then
            monkeypatch.setattr(align, "GREEDY_ONE_BY_ONE_MAX", largest)     # one by one, by maxima,
            monkeypatch.setattr(align, "GREEDY_BY_MAXIMA_ROWS", rows)        # one by one
            np.testing.assert_array_equal(align._greedy_match(C, capacity), want)
            np.testing.assert_array_equal(align._greedy_match(C[0], capacity[0]), want[0])
    C, room = np.array([[[0.5, 0.0, 0.0], [0.2, 0.3, 0.0]]]), np.ones((1, 3), int)
    assert align._without_zero_columns(C, room)[0].shape == (1, 2, 2)   # the zero column out
    C[0, 0, 1] = np.nan                              # (one by one: NaN last) no column left out
    assert align._without_zero_columns(C, room)[0] is C


@pytest.mark.parametrize("kind", ["mse", "mse_mean", "ce", "logistic"])
@pytest.mark.parametrize("widths", [[12, 9, 5, 4], [20, 16, 3, 2], [12, 30, 4]])
@pytest.mark.parametrize("rotate_back_min", [1, 10 ** 6])     # other losses: samples rotated or not
def test_row_space_fast_path_gives_the_same_iterates_and_measures(monkeypatch, kind, widths,
                                                                  rotate_back_min):
    monkeypatch.setattr(align, "ROTATE_BACK_MIN", rotate_back_min)
    if kind == "logistic":
        widths = widths[:-1] + [1]
    rng = np.random.default_rng(21)
    weights, X, Y = random_problem(rng, kind, widths, 6)               # n = 6 < k0
    track = align.tracker(weights)
    fast, hf = align.train(weights, X, Y, kind, lr=0.05, max_steps=200, tol=0.0,
                           measure_every=50, measures={"m": track})
    slow, hs = align.train(weights, X, Y, kind, lr=0.05, max_steps=200, tol=0.0,
                           measure_every=50, measures={"m": track}, fast=False)
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
        want = align.tracker(w0)(w1)
        monkeypatch.setattr(align, "GPU_BATCH_MIN", 4)
        got = align.tracker([xp.asarray(W) for W in w0])([xp.asarray(W) for W in w1])
        monkeypatch.undo()
        for key, value in want.items():
            assert type(got[key]) is np.ndarray
            np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-12)


def test_measuring_a_large_batch_on_a_gpu_waits_for_it_once(xp, monkeypatch):
    """No wait per network or per matching round: one transfer of the values (counted on
    the CuPy stand-in, whose ``waits`` counts what makes a host wait for a GPU)."""
    if not hasattr(xp, "waits"):
        pytest.skip("waits are counted on the CuPy stand-in (tests/cupy_standin) only")
    rng = np.random.default_rng(30)
    w0 = [xp.asarray(rng.standard_normal((70, 6, 6))) for _ in range(3)]
    w1 = [W + 0.1 * xp.asarray(rng.standard_normal(W.shape)) for W in w0]
    track = align.tracker(w0)
    track(w1)
    before = xp.waits[0]
    values = track(w1)
    assert xp.waits[0] - before == 1
    assert all(v.shape == (70,) and 0 < v.min() <= v.max() <= 1 for v in values.values())


@pytest.mark.parametrize("kind", ["mse", "ce"])
@pytest.mark.parametrize("per_network_data", [False, True])
def test_row_space_fast_path_on_a_batch_of_networks(monkeypatch, kind, per_network_data):
    monkeypatch.setattr(align, "ROTATE_BACK_MIN", 1)            # ce: samples rotated too
    rng = np.random.default_rng(22)
    batch = [rng.standard_normal((3, 9, 12)) / 4, rng.standard_normal((3, 4, 9)) / 3]
    X = rng.standard_normal((3, 12, 5) if per_network_data else (12, 5))
    Y = rng.integers(0, 4, 5) if kind == "ce" else rng.standard_normal((4, 5))
    if per_network_data and kind == "mse":
        Y = np.stack([Y, 2 * Y, -Y])
    fast, _ = align.train(batch, X, Y, kind, lr=0.05, max_steps=100, tol=0.0)
    slow, _ = align.train(batch, X, Y, kind, lr=0.05, max_steps=100, tol=0.0, fast=False)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_tracker_on_a_batch_equals_one_network_at_a_time():
    rng = np.random.default_rng(23)
    for widths in ([6, 6, 6, 6], [5, 7, 3]):
        w0 = [rng.standard_normal((4, widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
        w1 = [W + 0.2 * rng.standard_normal(W.shape) for W in w0]
        got = align.tracker(w0)(w1)
        for b in range(4):
            want = align.tracker([W[b] for W in w0])([W[b] for W in w1])
            for key, value in want.items():
                assert got[key][b] == pytest.approx(value, abs=1e-12)
    aligned = aligned_case(rng, [4, 4, 4])[0]                               # repeated values
    generic = [rng.standard_normal((4, 4)) for _ in range(2)]
    mixed = [np.stack([a, g]) for a, g in zip(aligned, generic)]
    got = align.tracker(mixed)(mixed)
    assert got["alignment_paired"][0] == pytest.approx(1.0, abs=1e-12)
    assert got["alignment_paired"][1] == pytest.approx(align.alignment(generic), abs=1e-12)


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
    measures = align.tracker(w0)(w1)
    monkeypatch.setattr(align, "_CORES", 3)
    monkeypatch.setattr(align, "THREADED_BATCH_MIN", 2)
    monkeypatch.setattr(align, "_pools", {})
    for got, expected in zip([align._linalg(svd, A), align._linalg(np.linalg.eigh, G)], want):
        for a, b in zip(got, expected):
            assert a.shape == b.shape and np.array_equal(a, b)
    assert "lapack" in align._pools and align._pools["lapack"]._max_workers == 3
    threaded = align.tracker(w0)(w1)
    for key, value in measures.items():
        np.testing.assert_array_equal(threaded[key], value)
    monkeypatch.setattr(align, "THREADED_SIDE_MAX", 4)           # larger matrices: one call
    monkeypatch.setattr(align, "_pools", {})
    align._linalg(svd, A)
    assert not align._pools


def test_float32_measures_through_the_gram_matrix_match_float64_svd():
    rng = np.random.default_rng(24)
    for shape in [(40, 30), (30, 40), (3, 25, 20)]:
        W = rng.standard_normal(shape).astype(np.float32)
        U, s, V = align._reduced_svd(W)
        Uw, sw, Vtw = np.linalg.svd(W.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(s, sw, rtol=1e-12)
        np.testing.assert_allclose(np.abs((U * Uw).sum(-2)), 1.0, atol=1e-9)   # same vectors up to sign
        np.testing.assert_allclose(np.abs((V * np.swapaxes(Vtw, -1, -2)).sum(-2)), 1.0, atol=1e-9)
    low = np.outer(rng.standard_normal(6), rng.standard_normal(4)).astype(np.float32)   # rank 1
    U, s, V = align._reduced_svd(low)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(U @ np.diag(s) @ V.T, low, atol=1e-5)


@pytest.mark.parametrize("m, n, t", [(30, 30, 3), (40, 25, 1), (6, 6, 5)])
def test_directions_of_zero_singular_values_complete_an_orthonormal_basis(m, n, t, monkeypatch):
    rng = np.random.default_rng(m + t)
    U = np.linalg.qr(rng.standard_normal((m, n)))[0]
    missing = np.zeros(n, dtype=bool)
    missing[rng.choice(n, t, replace=False)] = True
    full_qr = []
    monkeypatch.setattr(align, "_orth_complement", lambda *a: full_qr.append(1) or np.linalg.qr(
        a[0], mode="complete")[0][:, a[0].shape[1]:])
    done = align._complete(np.where(missing, np.nan, U), missing)
    np.testing.assert_array_equal(done[:, ~missing], U[:, ~missing])
    np.testing.assert_allclose(done.T @ done, np.eye(n), atol=1e-13)
    assert not full_qr                                                # projections sufficed
    pair = np.zeros((4, 4))                                           # complement: e0 + e1, e2 + e3
    pair[:, :2] = np.array([[1, -1, 0, 0], [0, 0, 1, -1]]).T / np.sqrt(2)
    done = align._complete(pair, np.array([False, False, True, True]))
    assert full_qr                                                    # e0, e1 project to one vector
    np.testing.assert_allclose(done.T @ done, np.eye(4), atol=1e-13)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_measures_split_along_the_invariant_subspace_equal_the_direct_ones(dtype, atol):
    rng = np.random.default_rng(25)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    weights, X, Y = [W.astype(dtype) for W in weights], X.astype(dtype), Y.astype(dtype)
    Q = align._range_basis(np.concatenate([weights[0] @ X, weights[1].T], axis=1).astype(np.float64),
                           100 * np.finfo(dtype).eps).astype(dtype)
    split = align._split_first_layers(weights[0], Q, X.T)
    assert split is not None
    C = rng.standard_normal((Q.shape[1], n)) * 0.1
    W2 = rng.standard_normal((3, Q.shape[1]))
    (got1, got2), static = split([C, W2])
    (U, s, V), want2 = [align._reduced_svd(M) for M in (weights[0] + Q @ C @ X.T, W2 @ Q.T)]
    np.testing.assert_allclose(got1[1], s, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.abs(((Q @ got1[0][:, ~static]) * U[:, ~static]).sum(0)), 1.0,
                               atol=atol)                      # dynamic: in span(Q)
    assert not got1[0][:, static].any() and static.sum() > 0
    np.testing.assert_allclose(Q.T @ U[:, static], 0.0, atol=atol)   # static: orthogonal to it
    np.testing.assert_allclose(got2[1], want2[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.abs((got2[0] * want2[0]).sum(0)), 1.0, atol=atol)
    np.testing.assert_allclose(np.abs(((Q @ got2[2]) * want2[2]).sum(0)), 1.0, atol=atol)
    random_start = [rng.standard_normal(W.shape).astype(dtype) for W in weights]
    assert align._split_first_layers(random_start[0], Q, X.T) is None


def test_split_measures_on_the_device_equal_the_host_ones(xp, monkeypatch):
    """Layer 1's moving directions decomposed where the arrays live (large layers:
    eigh on the GPU) give the host's singular values and vectors."""
    rng = np.random.default_rng(28)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1)
    Q = align._range_basis(np.concatenate([weights[0] @ X, weights[1].T], axis=1), 1e-12)
    params = [rng.standard_normal((Q.shape[1], n)) * 0.1, rng.standard_normal((3, Q.shape[1]))]
    (want1, want2), want_static = align._split_first_layers(weights[0], Q, X.T)(params)
    monkeypatch.setattr(align, "HOST_SVD_MAX", 0)                  # every decomposition on xp
    monkeypatch.setattr(align, "HOST_EIGH_MAX", 0)
    split = align._split_first_layers(*(xp.asarray(a) for a in (weights[0], Q, X.T)))
    (got1, got2), static = split([xp.asarray(p) for p in params])
    assert (static == want_static).all() and type(got1[0]) is np.ndarray
    np.testing.assert_allclose(got1[1], want1[1], rtol=1e-12)
    np.testing.assert_allclose(np.abs((got1[0] * want1[0]).sum(0))[~static], 1.0, atol=1e-10)
    np.testing.assert_allclose(got2[1], want2[1], rtol=1e-12)
    np.testing.assert_allclose(np.abs((got2[2] * want2[2]).sum(0)), 1.0, atol=1e-10)


@pytest.mark.parametrize("repeated, rtol", [(False, 1e-6), (True, 1e-6), (True, 0.05)])
def test_training_with_split_measures_records_the_same_values(repeated, rtol, monkeypatch):
    """Layer 1 split into static and moving directions (static ones left out as exact
    matches) measures as the dense SVDs do, also when singular values repeat across
    the two kinds (clusters that mix them)."""
    rng = np.random.default_rng(26)
    widths, n = [20, 24, 3, 2], 6
    X, Y = rng.standard_normal((20, n)), rng.standard_normal((2, n))
    sigmas = [np.ones(20), rng.uniform(0.5, 1, 3), rng.uniform(0.5, 1, 2)] if repeated else None
    weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=1,
                                 sigmas=sigmas)
    track = align.tracker(weights, rtol=rtol)
    split_used, pairs = [], align._invariance_pairs
    monkeypatch.setattr(align, "_invariance_pairs", lambda *a, **k: split_used.append(
        a[-1] is not None and pairs(*a, **k) is not None) or pairs(*a, **k))
    _, fast = align.train(weights, X, Y, "mse_mean", lr=0.05, max_steps=300, tol=0.0,
                          measure_every=100, measures={"m": track})
    assert split_used == [True] * 4
    _, slow = align.train(weights, X, Y, "mse_mean", lr=0.05, max_steps=300, tol=0.0,
                          measure_every=100, measures={"m": track}, fast=False)
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
    later, _ = align.train(weights, X, Y, "mse_mean", lr=0.05, max_steps=200, tol=0.0)
    for start in (weights, later):
        track = align.tracker(start)
        out, hist = align.train(later, X, Y, "mse_mean", lr=0.05, max_steps=100, tol=0.0,
                                measures={"m": track})
        for key, value in track(out).items():
            assert hist.measurements[key][-1] == pytest.approx(value, abs=1e-9)
    assert track.starts_at(later) and not track.starts_at(weights)


def test_every_pair_aligned_is_weaker_than_definition2_for_the_chain():
    rng = np.random.default_rng(27)
    Q = [random_orthogonal(rng, 3) for _ in range(4)]
    weights = align.aligned_network(Q, [np.array([3.0, 2.0, 1.0]), np.ones(3), np.array([3.0, 2.0, 1.0])])
    weights[1] = random_orthogonal(rng, 3) @ weights[1]       # W_2 W_2^T = I still commutes
    assert align.alignment(weights, "paired") == pytest.approx(1.0, abs=1e-12)
    assert align.is_aligned(weights[:2]) and align.is_aligned(weights[1:])
    assert not align.is_aligned(weights)


def _run_both(monkeypatch, run):
    """run() kernel by kernel and in replayed chunks (on NumPy: _StepChunks, the
    bookkeeping of the CUDA-graph path); returns both results."""
    monkeypatch.setattr(align, "_chunker", lambda *a: None)
    eager = run()
    rewinds = []

    class Spy(align._StepChunks):
        def rewind(self, j):
            rewinds.append(j)
            super().rewind(j)
    monkeypatch.setattr(align, "CUDA_GRAPH_STEPS", 5)     # (the first case stops inside a run)
    monkeypatch.setattr(align, "_chunker", Spy)
    return eager, run(), rewinds


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
    run = lambda: align.train(weights, X, Y, lr=0.05, max_steps=max_steps, tol=tol,
                              record_every=record_every, measure_every=measure_every,
                              measures={"a": lambda w, w0: align.alignment(w)},
                              callback=lambda s, L, h: calls.append(s))
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
    run = lambda: align.train(batch, X, Y, lr=0.05, max_steps=500, tol=1e-2)
    (w1, h1), (w2, h2), _ = _run_both(monkeypatch, run)
    assert h1.steps == h2.steps and h1.final_step == h2.final_step
    np.testing.assert_array_equal(np.array(h1.losses), np.array(h2.losses))
    assert h1.losses[0].shape == (3,) and h1.to_dict()["losses"][0] == h1.losses[0].tolist()
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    weights, X, Y = random_problem(rng, "mse", [4, 4, 4], 4)
    steps = []
    for chunker in (None, align._StepChunks):
        monkeypatch.setattr(align, "_chunker", chunker or (lambda *a: None))
        with pytest.raises(align.DivergenceError) as e:
            align.train([W * 10 for W in weights], X, Y * 100, lr=100.0, max_steps=1000)
        steps.append(e.value.history.final_step)
    assert steps[0] == steps[1] > 0


@pytest.mark.parametrize("kind, dtype, widths, record_every, tol",
                         [("mse", np.float64, [4, 5, 3], 1, 1e-3),          # stops inside a run
                          ("mse_mean", np.float32, [4, 6, 5, 3], 3, 1e-3),  # sparse records
                          ("mse", np.float64, [4, 3], 1, 0.0),              # one layer, budget
                          ("mse_mean", np.float64, [4, 4, 4, 4, 3], 2, 1e-3),
                          ("mse_mean", np.float64, [5, 5, 5, 5], 1, 1e-3)])   # k x k: stacked
@pytest.mark.parametrize("residuals_bytes", [0, align.RESIDUALS_BYTES])   # losses at each step, after
def test_in_place_squared_loss_steps_give_the_same_numbers(monkeypatch, kind, dtype, widths,
                                                           record_every, tol, residuals_bytes):
    """NumPy's in-place runs of steps (a dense network, squared loss, n >= k0) against
    the step-by-step path: the same records and stopping step, iterates and losses
    equal to rounding (lr is applied to dL/dF instead of to each gradient)."""
    monkeypatch.setattr(align, "RESIDUALS_BYTES", residuals_bytes)
    ran, run = [], align._SquaredLossSteps._run
    monkeypatch.setattr(align._SquaredLossSteps, "_run", lambda self, n: ran.append(n) or run(self, n))
    rng = np.random.default_rng(43)
    weights, X, _ = random_problem(rng, kind, widths, 7)
    Y = rng.standard_normal((widths[-1], widths[0])) @ X / 2         # interpolable
    weights, X, Y = [W.astype(dtype) for W in weights], X.astype(dtype), Y.astype(dtype)
    runs = []
    for fast in (True, False):
        calls = []
        out, hist = align.train(weights, X, Y, kind, lr=0.05, max_steps=1234, tol=tol, fast=fast,
                                record_every=record_every, measure_every=100,
                                measures={"a": lambda w, w0: align.alignment(w)},
                                callback=lambda s, L, h: calls.append((s, L)))
        runs.append((out, hist, calls))
    (w1, h1, c1), (w2, h2, c2) = runs
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


def test_ctrl_c_in_the_callback_stops_a_run_of_steps_where_it_was():
    rng = np.random.default_rng(44)
    weights, X, Y = random_problem(rng, "mse", [4, 5, 3], 6)
    results = []
    for fast in (True, False):
        def interrupt(step, L, h):
            if step == 57:
                raise KeyboardInterrupt
        out, hist = align.train(weights, X, Y, lr=0.05, max_steps=500, tol=0.0, fast=fast,
                                callback=interrupt, measures={"a": lambda w, w0: align.alignment(w)})
        results.append((out, hist))
    (w1, h1), (w2, h2) = results
    assert h1.stop_reason == h2.stop_reason == "interrupted"
    assert h1.final_step == h2.final_step == 57 and h1.steps == h2.steps == list(range(58))
    assert h1.measure_steps == h2.measure_steps == [0, 57]
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_gemm_plan_reads_every_layout_the_steps_use(monkeypatch):
    """The direct cuBLAS product (CUDA-graph capture) emulated on NumPy: column-major
    gemm of the planned operands gives A @ B for plain, transposed, batched and
    broadcast operands, and every product of training runs (both groupings of Eq. (8),
    the row-space path with and without rotated samples, a batch)."""
    from numpy.lib.stride_tricks import as_strided
    rng = np.random.default_rng(40)

    def stored(M, op, ld, bstride, batch):
        r, c = M.shape[-2:]
        rows, cols = (c, r) if op == 0 else (r, c)          # the column-major matrix in memory
        view = as_strided(M, (batch, rows, cols), (bstride * M.itemsize, M.itemsize, ld * M.itemsize))
        return view if op == 0 else np.swapaxes(view, 1, 2)  # op(stored) = M^T

    def emulate(A, B):
        A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, ldC, sC, batch) = align._gemm_plan(A, B)
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
    for kind, widths, n, batch in (("ce", [12, 30, 4], 6, None), ("ce", [40, 30, 2], 20, None),
                                   ("mse", [3, 12, 12, 2], 30, 2), ("mse", [5, 5, 5], 9, 3)):
        weights, X, Y = random_problem(rng, kind, widths, n)
        if batch:                                  # (a batch: no in-place NumPy steps)
            weights = [np.stack([W] * batch) for W in weights]
        run = lambda: align.train(weights, X, Y, kind, lr=0.05, max_steps=20, tol=0.0)[0]
        want = run()
        monkeypatch.setattr(align, "_mm", emulate)
        got = run()
        monkeypatch.undo()
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_in_place_steps_refuse_a_run_longer_than_their_buffers():
    rng = np.random.default_rng(45)
    weights, X, Y = random_problem(rng, "mse", [3, 4, 2], 5)
    steps = align._SquaredLossSteps(weights, X, Y, "mse", 0.1)
    assert steps._run(steps.longest).shape == (steps.longest,)
    with pytest.raises(ValueError, match="longer than"):
        steps._run(steps.longest + 1)


@pytest.mark.parametrize("launch_thread", [False, True])
def test_graph_chunks_with_launches_here_or_on_the_helper_thread(xp, monkeypatch, launch_thread):
    """_CudaGraphChunks' launch, kept copy, wait and rewind, with stand-in graphs that
    replay the steps kernel by kernel (on the CuPy stand-in, which has no CUDA graphs):
    the history of stepping one by one, also while the helper thread steps and the
    caller measures the kept copy."""
    if not hasattr(xp, "waits"):
        pytest.skip("runs on the CuPy stand-in (tests/cupy_standin) only")

    class Graph:
        def __init__(self, chunks, n, losses):
            self.chunks, self.n, self.losses = chunks, n, losses

        def launch(self, stream=None):
            self.chunks._save()
            for j in range(self.n):
                self.losses[j] = self.chunks._step()

    captured = []

    def capture(self, n):
        captured.append(n)
        self.stream = types.SimpleNamespace(wait_event=lambda event: None, synchronize=lambda: None)
        L, _ = self.loss_and_grads([p.copy() for p in self.ps])
        losses = xp.empty((n,) + L.shape, dtype=L.dtype)
        return Graph(self, n, losses), losses, None
    monkeypatch.setattr(align._CudaGraphChunks, "_capture", capture)
    monkeypatch.setattr(align, "GRAPH_LAUNCH_THREAD", launch_thread)
    rng = np.random.default_rng(44)
    weights, X, _ = random_problem(rng, "mse", [5, 6, 4], 9)
    Y = rng.standard_normal((4, 5)) @ X / 2                                 # interpolable
    weights = [xp.asarray(np.stack([W * (1 + 0.1 * b) for b in range(3)])) for W in weights]
    X, Y = xp.asarray(X), xp.asarray(Y)
    train = lambda: align.train(weights, X, Y, "mse", lr=0.05, max_steps=400, tol=1e-3,
                                measure_every=120, measures={"m": align.tracker(weights)})
    monkeypatch.setattr(align, "CUDA_GRAPH_STEPS", 100)
    w1, h1 = train()
    monkeypatch.setattr(align, "CUDA_GRAPH_STEPS", 0)
    w2, h2 = train()
    assert captured and 120 < h1.final_step < 400 and h1.stop_reason == "tol"   # stops in a run
    assert h1.final_step == h2.final_step and h1.steps == h2.steps
    np.testing.assert_array_equal(np.array(h1.losses), np.array(h2.losses))
    assert h1.measure_steps == h2.measure_steps
    for key in h2.measurements:
        np.testing.assert_array_equal(h1.measurements[key], h2.measurements[key])
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(align.to_numpy(a), align.to_numpy(b))


@pytest.mark.skipif(CUPY is None, reason="CuPy with a CUDA GPU is not available")
@pytest.mark.parametrize("kind, widths, n, batch", [("mse_mean", [30, 40, 6, 3], 8, None),   # row space
                                                    ("ce", [30, 40, 6, 3], 8, None),
                                                    ("mse", [5, 6, 4], 9, 3)])              # a batch
@pytest.mark.parametrize("launch_thread", [False, True])
def test_cuda_graph_steps_equal_kernel_by_kernel_steps(monkeypatch, kind, widths, n, batch, launch_thread):
    """On the GPU: replaying captured CUDA graphs (direct cuBLAS products; launched here
    or from the helper thread) gives the iterates, losses and stopping step of launching
    the kernels one by one."""
    monkeypatch.setattr(align, "GRAPH_LAUNCH_THREAD", launch_thread)
    rng = np.random.default_rng(41)
    weights, X, Y = random_problem(rng, kind, widths, n)
    if batch:
        weights = [np.stack([W * (1 + 0.1 * b) for b in range(batch)]) for W in weights]
    weights, X, Y = ([CUPY.asarray(a) for a in arrays] for arrays in (weights, [X], [Y]))
    captured = []
    launch = align._CudaGraphChunks.launch
    monkeypatch.setattr(align._CudaGraphChunks, "launch",
                        lambda self, k, keep=False: captured.append(launch(self, k, keep)) or captured[-1])
    train = lambda: align.train(weights, X[0], Y[0], kind, lr=0.05, max_steps=400, tol=1e-3,
                                measure_every=120, measures={"m": align.tracker(weights)})
    w1, h1 = train()
    assert captured and all(captured)                              # graphs really ran
    monkeypatch.setattr(align, "CUDA_GRAPH_STEPS", 0)
    w2, h2 = train()
    assert h1.final_step == h2.final_step and h1.stop_reason == h2.stop_reason
    np.testing.assert_allclose(h1.losses, h2.losses, rtol=1e-10)
    for key in h2.measurements:
        np.testing.assert_allclose(h1.measurements[key], h2.measurements[key], atol=1e-10)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(align.to_numpy(a), align.to_numpy(b), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(CUPY is None, reason="CuPy with a CUDA GPU is not available")
def test_cuda_graph_capture_survives_an_earlier_runs_garbage(monkeypatch):
    """On the GPU: an earlier run's graph chunks left in a reference cycle (its memory
    pool and cuBLAS handle freed only by the cycle collector, with synchronizing calls)
    do not break the next capture, even with the collector due at every allocation:
    the collector is paused while steps are captured (seen failing on an H200)."""
    rng = np.random.default_rng(43)
    weights, X, Y = random_problem(rng, "mse_mean", [5, 4, 3], 6)
    weights, X, Y = [CUPY.asarray(W) for W in weights], CUPY.asarray(X), CUPY.asarray(Y)
    collector_on = []

    def loss_and_grads(ps):
        collector_on.append(gc.isenabled())
        return align._loss_and_gradients(ps, X, Y, "mse_mean")
    old = align._CudaGraphChunks([W.copy() for W in weights], loss_and_grads, 0.01)
    assert old.launch(50) and old.wait().shape == (50,)
    old.cycle = old                                                # garbage for the collector
    del old
    captured, collector_on[:] = [], []
    launch = align._CudaGraphChunks.launch
    monkeypatch.setattr(align._CudaGraphChunks, "launch",
                        lambda self, k, keep=False: captured.append(launch(self, k, keep)) or captured[-1])
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        align.gradient_descent(weights, loss_and_grads, lr=0.01, max_steps=200, tol=0.0)
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
    with align._gc_paused():
        assert gone == [True] and not gc.isenabled()              # collected, then paused
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(KeyError), align._gc_paused():
            raise KeyError("x")
        assert not gc.isenabled()                                  # left as it was: off
    finally:
        gc.enable()


def test_split_measures_fall_back_when_a_static_direction_is_used_at_one_time_only():
    """A static direction (same vector, same singular value at both times) counts as an
    exact match only if it is used (sigma > rtol * sigma_max) at both times."""
    q = np.linalg.qr(np.random.default_rng(42).standard_normal((4, 4)))[0]
    layer = lambda s, static: (np.where(static, 0.0, q[:, :3]), np.array(s), None)
    rest = (np.eye(2), np.array([1.0, 0.5]), q[:, :2])          # W_2: U, s, V in Q's coordinates
    static = np.array([False, True, True])
    now = [layer([0.5, 0.5, 7e-7], static), rest]               # max 0.5: 7e-7 is used
    then = [layer([1.0, 0.5, 7e-7], static), rest]              # max 1.0: 7e-7 is not
    assert align._invariance_pairs(now, then, [3, 4, 2], 1e-6, (static, static)) is None
    then[0] = layer([0.6, 0.5, 7e-7], static)                   # used at both times
    pairs = align._invariance_pairs(now, then, [3, 4, 2], 1e-6, (static, static))
    assert pairs[-1].exact == 2 and pairs[-1].exact_used == 2 and pairs[-1].A.shape == (4, 1)


def test_direct_cublas_without_the_library_says_which_it_tried(monkeypatch):
    """(CUDA graph capture then falls back to kernel-by-kernel steps with this note.)"""
    monkeypatch.setattr(align._DirectCublas, "_load", lambda self, name: None)
    with pytest.raises(RuntimeError, match=r"no cuBLAS library .*libcublas\.so\.13"):
        align._DirectCublas(None, None)
