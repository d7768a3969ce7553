"""The paper's claims on align.py's reference code: gradients
(Eq. (8)), GD, usSVD (Definition 1), the measures of Section 6, Definition 2."""
import json
import math

import numpy as np
import pytest

import align
import verify
from conftest import finite_difference, random_orthogonal, random_problem

KINDS = ["mse", "mse_mean", "ce", "logistic", "exp"]


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


def test_gradients_on_backend_match_numpy(xp):
    rng = np.random.default_rng(1)
    weights, X, Y = random_problem(rng, "mse", [4, 6, 5, 3], 7)
    want = align.gradients(weights, X, Y)
    got = align.gradients([xp.asarray(W) for W in weights], xp.asarray(X), xp.asarray(Y))
    assert all(type(g).__module__.split(".")[0] == xp.__name__ for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(align.to_numpy(g), w, rtol=1e-12, atol=1e-14)


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


def test_ussvd_definition1_and_its_reorderings_and_sign_flips():
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
        U2, s2, V2 = align.ussvd_reorder(U, s, V, perm, signs)
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
    (lambda: align.loss([np.ones((3, 4))], np.ones((4, 2)), np.array([0, 3]), "ce"), r"labels that lie in 0..2"),
    (lambda: align.loss([np.ones((1, 4))], np.ones((4, 2)), np.array([[1.0, 0.5]]), "logistic"), "-1 or \\+1"),
    (lambda: align.loss([np.ones((2, 4))], np.ones((4, 2)), np.ones((2, 2)), "logistic"), "kd = 1"),
    (lambda: align.alignment([np.ones((3, 3))], how="sorted"), "how must be one of"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), lr=-1), "lr must be"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), max_steps=2.5),
     "max_steps must be an integer >= 0, got 2.5"),
    (lambda: align.train([np.ones((3, 4))], np.ones((4, 2)), np.ones((3, 2)), measure_every=0),
     "measure_every must be an integer >= 1"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


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


def test_every_pair_aligned_is_weaker_than_definition2_for_the_chain():
    rng = np.random.default_rng(27)
    Q = [random_orthogonal(rng, 3) for _ in range(4)]
    weights = align.aligned_network(Q, [np.array([3.0, 2.0, 1.0]), np.ones(3), np.array([3.0, 2.0, 1.0])])
    weights[1] = random_orthogonal(rng, 3) @ weights[1]       # W_2 W_2^T = I still commutes
    assert align.alignment(weights, "paired") == pytest.approx(1.0, abs=1e-12)
    assert align.is_aligned(weights[:2]) and align.is_aligned(weights[1:])
    assert not align.is_aligned(weights)




def chain_by_construction(rng, dtype=np.float64, smallest=1e-6):
    """An aligned chain W_i = Q_i Sigma_i Q_{i-1}^T (Definition 2 by construction): depth 2-4,
    widths 1-6, singular values log-uniform in [smallest, 1] with repeats, zeros and signs."""
    d = int(rng.integers(2, 5))
    widths = [int(k) for k in rng.integers(1, 7, d + 1)]
    bases = [random_orthogonal(rng, k) for k in widths]
    sigmas = []
    for a, b in zip(widths, widths[1:]):
        s = np.exp(rng.uniform(np.log(smallest), 0, min(a, b)))
        kind = rng.integers(4)
        if kind == 1 and s.size > 1:
            s[rng.integers(s.size)] = s[0]                               # a repeated value
        if kind == 2:
            s[rng.integers(s.size)] = 0.0                                 # a zero
        sigmas.append(s * rng.choice([-1.0, 1.0], s.size))
    return [W.astype(dtype) for W in align.aligned_network(bases, sigmas)]


def assert_witness(test, weights, tol):
    """The usSVDs of an AlignmentTest share U_i = V_{i+1} and reproduce each layer."""
    assert test, test.reason
    for i, (W, (U, s, V)) in enumerate(zip(weights, test.ussvds)):
        np.testing.assert_allclose(U.T @ U, np.eye(U.shape[0]), atol=1e-10)
        np.testing.assert_allclose(V.T @ V, np.eye(V.shape[0]), atol=1e-10)
        scale = max(np.linalg.norm(W, 2), 1e-300)
        assert np.abs(U @ align.rect_diag(s, *W.shape) @ V.T - W).max() <= 10 * tol * scale
        if i:
            assert test.ussvds[i - 1][0] is V or np.array_equal(test.ussvds[i - 1][0], V)


def test_definition2_accepts_aligned_chains_with_small_repeated_and_zero_singular_values():
    """Hundreds of aligned chains (small singular values down to 1e-6, repeated, zero,
    signed, any order, rectangular) are accepted, with witnesses that verify; float32
    chains (values down to 1e-3) at tol 1e-4."""
    rng = np.random.default_rng(180)
    for _ in range(300):
        weights = chain_by_construction(rng)
        assert_witness(align.is_aligned(weights), weights, 1e-8)
    for _ in range(100):
        weights = chain_by_construction(rng, np.float32, smallest=1e-3)
        assert_witness(align.is_aligned(weights, tol=1e-4), [W.astype(float) for W in weights], 1e-4)


def test_definition2_rejects_chains_with_a_non_commuting_gram_pair():
    """The same chains with one layer's input basis turned: where W_i W_i^T and
    W_{i+1}^T W_{i+1} do not commute, no usSVDs can share U_i = V_{i+1}."""
    rng, rejected = np.random.default_rng(181), 0
    while rejected < 200:
        weights = chain_by_construction(rng)
        i = int(rng.integers(1, len(weights)))
        k = weights[i].shape[1]
        turn = np.linalg.qr(np.eye(k) + 0.3 * rng.standard_normal((k, k)))[0]
        weights[i] = weights[i] @ turn
        A, B = weights[i - 1] @ weights[i - 1].T, weights[i].T @ weights[i]
        if np.linalg.norm(A @ B - B @ A) <= 1e-3 * np.linalg.norm(A) * np.linalg.norm(B):
            continue                                     # (this turn left them commuting)
        assert not align.is_aligned(weights)
        rejected += 1


def test_definition2_small_singular_values_are_not_merged_with_zero():
    """The issue's example: Q^T W Q diagonal to 1e-15 with singular values (1, 1e-2, 0) over
    four layers, and (1, 1e-5, 0) over two."""
    rng = np.random.default_rng(2)
    Q = [np.linalg.qr(rng.standard_normal((3, 3)))[0] for _ in range(5)]
    for values, d, tol in (([1.0, 1e-2, 0.0], 4, 1e-4), ([1.0, 1e-5, 0.0], 2, 1e-8)):
        weights = [Q[i + 1] @ np.diag(values) @ Q[i].T for i in range(d)]
        test = align.is_aligned(weights, tol=tol)
        assert_witness(test, weights, tol)
        assert test.residual < 1e-10


def authors_matched_invariance(weights_t, weights_0):
    """The authors' code, written out: per layer res = U_i(0)^T U_i(t) (i < d) and
    V_i(0)^T V_i(t) (i > 1) from plain reduced SVDs, sum of max(|res|, dim=1), over the count."""
    total, count, d = 0.0, 0, len(weights_t)
    for i, (Wt, W0) in enumerate(zip(weights_t, weights_0)):
        (Ut, _, Vtt), (U0, _, Vt0) = (np.linalg.svd(W, full_matrices=False) for W in (Wt, W0))
        for res in ([U0.T @ Ut] if i < d - 1 else []) + ([Vt0 @ Vtt.T] if i > 0 else []):
            total, count = total + np.abs(res).max(axis=1).sum(), count + res.shape[0]
    return total / count


@pytest.mark.parametrize("widths", [[20, 30, 8, 3], [12, 16, 6, 4], [9, 9, 9, 9], [3, 7, 2]])
def test_matched_invariance_scores_each_initial_direction_as_the_authors_code(widths):
    rng = np.random.default_rng(5)
    W0 = [rng.standard_normal((widths[i + 1], widths[i])) for i in range(len(widths) - 1)]
    Wt = [W + 0.3 * rng.standard_normal(W.shape) for W in W0]
    want = authors_matched_invariance(Wt, W0)
    assert align.invariance(Wt, W0, "matched") == pytest.approx(want, abs=1e-12)


def test_matched_invariance_of_the_issues_network_is_0_78744():
    """Issue #28's first row: 20-30-8-3, W_t = W_0 + 0.3 G, default_rng(5)."""
    rng = np.random.default_rng(5)
    widths = [20, 30, 8, 3]
    W0 = [rng.standard_normal((widths[i + 1], widths[i])) for i in range(3)]
    Wt = [W + 0.3 * rng.standard_normal(W.shape) for W in W0]
    assert align.invariance(Wt, W0, "matched") == pytest.approx(0.7874411632294943, abs=1e-12)


def test_definition2_decides_a_random_30_40_20_network():
    """Issue #23: the search for positions used to give up ("too large to decide") on
    ordinary networks; non-commuting Gram pairs are now rejected before any search."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        weights = [rng.standard_normal((40, 30)).astype(dtype),
                   rng.standard_normal((20, 40)).astype(dtype)]
        test = align.is_aligned(weights, tol=1e-6)
        assert not test and test.residual > 0.1 and "do not commute" in test.reason
        assert "array(" not in repr(test) and "residual=" in repr(test)


def test_definition2_gram_check_never_rejects_a_network_within_tol():
    """An aligned chain with every off-diagonal entry of Q_i^T W_i Q_{i-1} up to tol ||W_i||
    has a witness within tol: the commutator bound must let it through."""
    rng = np.random.default_rng(7)
    for tol in (1e-8, 1e-6, 1e-4):
        for _ in range(20):
            widths = list(rng.integers(1, 9, int(rng.integers(3, 6))))
            Q = [random_orthogonal(rng, k) for k in widths]
            weights = []
            for i in range(1, len(widths)):
                S = align.rect_diag(rng.uniform(0.5, 1.0, min(widths[i], widths[i - 1])),
                                    widths[i], widths[i - 1])
                E = rng.uniform(-1, 1, S.shape) * (1 - align.rect_diag(
                    np.ones(min(S.shape)), *S.shape))
                weights.append(Q[i] @ (S + 0.9 * tol * E / np.sqrt(S.size)) @ Q[i - 1].T)
            assert not align.gram_commutators(weights, tol)[2]


def _positions_by_brute_force(intervals, widths):
    """Whether positions exist, trying every assignment (small cases only)."""
    import itertools
    caps = [min(widths[a:b + 1]) for a, b in intervals]
    for index in itertools.product(*[range(c) for c in caps]):
        if all(len({j for j, (a, b) in zip(index, intervals) if a <= i <= b}) ==
               sum(a <= i <= b for a, b in intervals) for i in range(len(widths))):
            return True
    return False


def test_definition2_positions_exist_exactly_when_some_assignment_works():
    """The search over counts of (track end, string end) agrees with trying every
    assignment, on random strings of random widths, and its positions are valid."""
    rng = np.random.default_rng(23)
    found = 0
    for _ in range(400):
        widths = [int(k) for k in rng.integers(1, 4, int(rng.integers(2, 5)))]
        alive, intervals = [], []
        for i, k in enumerate(widths):               # random strings, k_i through space i
            keep = [s for s in alive if rng.random() < 0.6][:k]
            for s in set(alive) - set(keep):
                intervals[s][1] = i - 1
            alive = keep + list(range(len(intervals), len(intervals) + k - len(keep)))
            intervals += [[i, None] for _ in range(k - len(keep))]
        for s in alive:
            intervals[s][1] = len(widths) - 1
        intervals = [tuple(iv) for iv in intervals]
        index = align._assign_positions(intervals, widths)
        assert (index is not None) == _positions_by_brute_force(intervals, widths)
        if index is not None:
            found += 1
            for i in range(len(widths)):
                here = [j for j, (a, b) in zip(index, intervals) if a <= i <= b]
                assert sorted(here) == list(range(widths[i]))
    assert 50 < found < 400                          # both answers were exercised


def test_definition2_positions_refused_when_a_space_holds_more_strings_than_its_width():
    """Space 3 (width 4) holds five strings: no positions, an answer (None), not an error, also
    after the search has paired the spaces before it (a search that ever pairs a negative
    count of strings crashed here)."""
    widths = [4, 4, 5, 4, 2, 4]
    intervals = [(0, 2), (5, 5), (0, 1), (2, 2), (3, 5), (5, 5), (1, 2), (3, 3), (0, 0), (2, 3),
                 (3, 5), (0, 1), (2, 3)]
    assert sum(a <= 3 <= b for a, b in intervals) == 5
    assert align._assign_positions(intervals, widths) is None


def test_definition2_on_empty_layers():
    assert align.is_aligned([np.zeros((0, 0)), np.zeros((0, 0))])
    assert align.is_aligned([np.zeros((3, 2)), np.zeros((2, 3))])


def test_definition2_at_tol_0_accepts_exactly_diagonal_chains():
    """The boundary residual <= tol: a diagonal chain has residual exactly 0, so tol = 0
    accepts it (and a chain that is not aligned is still rejected at tol = 0)."""
    chain = [np.diag([3.0, -2.0, 1e-3]), np.array([[2.0, 0, 0], [0, 2.0, 0]])]
    test = align.is_aligned(chain, tol=0.0)
    assert test.aligned and test.residual == 0.0
    turned = [chain[0], chain[1] @ random_orthogonal(np.random.default_rng(3), 3)]
    assert not align.is_aligned(turned, tol=0.0).aligned


@pytest.mark.parametrize("lib", ["align", "align_fast"])
def test_training_at_tol_0_on_a_loss_of_exactly_0_runs_the_whole_budget(lib):
    """The stop test is loss < tol: at tol = 0 a loss of exactly 0 does not stop a run,
    on the reference and on every branch of the fast path (in-place runs, step by step)."""
    import align_fast
    train = {"align": align, "align_fast": align_fast}[lib].train
    X = np.random.default_rng(4).standard_normal((3, 6))
    weights = [np.zeros((4, 3)), np.zeros((2, 4))]
    for measure_every in (1, 50):
        out, hist = train(weights, X, np.zeros((2, 6)), lr=0.1, max_steps=120, tol=0.0,
                          measure_every=measure_every)
        assert hist.stop_reason == "max_steps" and hist.final_step == 120
        assert hist.steps == list(range(121)) and set(hist.losses) == {0.0}
        out, hist = train(weights, X, np.zeros((2, 6)), lr=0.1, max_steps=120, tol=1e-300,
                          measure_every=measure_every)
        assert hist.stop_reason == "tol" and hist.final_step == 0


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_measures_do_not_depend_on_the_scale_of_the_weights(scale):
    """rtol is relative to each layer's largest singular value: values equal up to rtol form
    one cluster and values below rtol * sigma_max are unused at every scale.  Here W_1 has a
    near-repeated pair (3, 3 + 3e-9) turned by 45 degrees in W_2, and W_2 a tiny third
    value (1e-9) whose direction W_1 does not share: both rules of both measures give 1."""
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    turn = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    tilt = random_orthogonal(np.random.default_rng(12), 4)[:, :3]     # W_2's right vectors
    tilt = np.column_stack([np.eye(4)[:, 0], np.eye(4)[:, 1:3] @ turn[1:, 1:] @ [1, 0], tilt[:, 2]])
    tilt = np.linalg.qr(tilt)[0] * np.sign(np.diag(np.linalg.qr(tilt)[1]))
    W1 = np.vstack([np.diag([5.0, 3.0, 3.0 + 3e-9]), np.zeros((1, 3))])  # 4 x 3, hidden e1-e3
    W2 = np.diag([4.0, 2.0, 1e-9]) @ tilt.T                             # 3 x 4
    weights = [scale * W1, scale * W2]
    assert align.alignment(weights) == pytest.approx(1.0, abs=1e-12)
    assert align.alignment([W.T for W in weights[::-1]]) == pytest.approx(1.0, abs=1e-12)
    assert align.invariance(weights, [W1, W2]) == pytest.approx(1.0, abs=1e-12)


def test_at_rtol_0_exactly_equal_values_still_cluster_and_exact_zeros_are_unused():
    """rtol = 0: singular values that are exactly equal (a diagonal W_1 with 3, 3) are one
    cluster, so W_2 turning that pair scores 1; an exactly zero value is unused."""
    c, s = np.cos(0.7), np.sin(0.7)
    W1 = np.diag([5.0, 3.0, 3.0, 0.0])
    W2 = np.diag([4.0, 2.0, 1.0, 0.0]) @ np.array([[1.0, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]]).T
    for weights in ([W1, W2], [W2.T, W1.T]):
        assert align.alignment(weights, rtol=0.0) == 1.0
    assert align.alignment([W1, W2], rtol=1e-6) == 1.0
    assert align.alignment([np.diag([5.0, 3.0, 2.0, 0.0]), W2], rtol=0.0) < 0.9   # distinct: turned
    # W_1 = diag(5, 3, 0): only e1, e2 are used; W_2's right vectors e1, (0, c, s), (0, -s, c)
    # give (1 + c) / 2, the zero direction's match c not counted.  (The authors' matched
    # rule scores every direction: (1 + c + c) / 3.)
    V = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    W1, W2 = np.diag([5.0, 3.0, 0.0]), np.diag([4.0, 2.0, 1.0]) @ V.T
    for weights in ([W1, W2], [W2.T, W1.T]):
        assert align.alignment(weights, rtol=0.0) == pytest.approx((1 + c) / 2, abs=1e-14)
        assert align.alignment(weights, "matched") == pytest.approx((1 + 2 * c) / 3, abs=1e-14)


def test_definition2_residual_is_the_witness_off_diagonal_relative_to_each_layer():
    """AlignmentTest.residual = max_i max |off-diagonal of U_i^T W_i V_i| / ||W_i||_2 for the
    returned witness, also for a network that is not aligned (tol large enough that the
    search runs), whatever the weights' scale."""
    rng = np.random.default_rng(14)

    def off(S):
        S = S.copy()
        np.fill_diagonal(S, 0.0)
        return np.abs(S).max()
    for scale in (1.0, 37.0):                 # (tol 0.05: e = 0.15 > 0.1, no Gram check)
        weights = [scale * rng.standard_normal((3, 3)) for _ in range(3)]
        test = align.is_aligned(weights, tol=0.05)
        per_layer = [off(U.T @ W @ V) / np.linalg.norm(W, 2) for W, (U, _, V) in zip(weights, test.ussvds)]
        assert test.residual == pytest.approx(max(per_layer), rel=1e-12) and not test.aligned
        assert test.reason.startswith(f"W_{1 + int(np.argmax(per_layer))} is off-diagonal")
    zero = align.is_aligned([np.zeros((3, 2)), rng.standard_normal((4, 3))], tol=1e-12)
    assert zero and zero.residual < 1e-15              # (a zero layer shares any vectors)


def test_definition2_gram_check_rejects_exactly_above_its_bound():
    """The commutator check rejects when ||[A, B]||_F / (||A|| ||B||) > 12 (e_1 + e_2) with
    e_i = tol sqrt(k_i k_(i-1)) (2 tol and sqrt(6) tol for layers 2 x 2 and 3 x 2): tol
    3% either side of c / (12 (2 + sqrt 6)) puts the bound either side of c."""
    rng = np.random.default_rng(15)
    weights = [np.eye(2), rng.standard_normal((2, 2)), rng.standard_normal((3, 2))]
    A, B = (W @ W.T / np.linalg.norm(W, 2) ** 2 for W in (weights[1], weights[2].T))
    c = np.linalg.norm(A @ B - B @ A)
    fast = align.is_aligned(weights, tol=1e-6)         # (rejected by the check without an SVD:
    frobenius = c * np.linalg.norm(weights[1], 2) ** 2 * np.linalg.norm(weights[2], 2) ** 2 / (
        np.linalg.norm(weights[1] @ weights[1].T) * np.linalg.norm(weights[2].T @ weights[2]))
    assert fast.residual == pytest.approx(frobenius, rel=1e-12) and frobenius < c   # a lower bound)
    bound = 12 * (2 + math.sqrt(6))           # times tol: e_2 = 2 tol, e_3 = sqrt(6) tol
    rejected = align.is_aligned(weights, tol=c / bound / 1.03).reason
    assert rejected.startswith("W_2 W_2^T and W_3^T W_3 do not commute")
    assert "do not commute" not in align.is_aligned(weights, tol=c / bound * 1.03).reason


def test_definition2_rounding_never_trips_the_gram_check():
    """At tol = 0 chains aligned to rounding are rejected (residual ~1e-16 > 0) by the search,
    not by the commutator check, whose rounding floor (10 eps k^2) is above their
    commutators."""
    rng = np.random.default_rng(16)
    for _ in range(20):
        weights = verify.aligned_chain(rng, [int(k) for k in rng.integers(4, 9, 4)])
        test = align.is_aligned(weights, tol=0.0)
        assert "do not commute" not in test.reason


def test_definition2_gram_check_applies_up_to_e_equal_to_0_1():
    """The commutator check is sound for e = tol sqrt(k_i k_(i-1)) <= 0.1, the boundary
    included: 32 x 32 layers at tol = 0.1 / 32 (e = 0.1 exactly) whose Gram matrices are
    projections on 16 planes turned by 45 degrees (commutator sqrt(8) > 12 * 0.2, relative to
    the spectral norms 1; the residual relative to the Frobenius norms 4 and 4)."""
    c = s = math.sqrt(0.5)
    P, Q = np.zeros((32, 32)), np.zeros((32, 32))
    for j in range(16):
        P[2 * j, 2 * j] = 1.0
        Q[2 * j:2 * j + 2, 2 * j:2 * j + 2] = [[c * c, c * s], [c * s, s * s]]
    assert (0.1 / 32) * math.sqrt(32 * 32) == 0.1
    test = align.is_aligned([P, Q], tol=0.1 / 32)
    assert not test and "do not commute" in test.reason
    assert test.residual == pytest.approx(math.sqrt(8) / 16, rel=1e-12)


def test_definition2_at_tol_0_with_zero_layers_and_exact_zeros():
    """At tol = 0 a string whose image is exactly zero ends (its norm 0 is not above 0 * ||W||):
    a zero first layer before diag(0, 0, 0, 1) is aligned with residual 0."""
    W2 = np.diag([0.0, 0.0, 0.0, 1.0])
    test = align.is_aligned([np.zeros((4, 2)), W2], tol=0.0)
    assert test and test.residual == 0.0


def test_is_aligned_continues_the_string_of_the_larger_image():
    """W_1 = diag(2, 1) fixes V_2 = (e1, e2) up to order; W_2 (1 x 2) has one position, taken
    by the larger image: off-diagonal 0.6 for [[0.8, 0.6]] and [[0.6, 0.8]] (not 0.8); at
    tol 0.3 (past the commutator test) [[0.28, 0.96]] is aligned with residual 0.28."""
    W1 = np.diag([2.0, 1.0])
    for W2, aligned, residual in (([[0.8, 0.6]], False, 0.6), ([[0.6, 0.8]], False, 0.6),
                                  ([[0.28, 0.96]], True, 0.28)):
        test = align.is_aligned([W1, np.array(W2)], tol=0.3)
        assert bool(test) == aligned and test.residual == pytest.approx(residual, rel=1e-12)


@pytest.mark.parametrize("multiple, impossible", [(10.5, True), (9.5, False)])
def test_commutator_test_allows_10_eps_k_squared_of_rounding_at_tol_0(multiple, impossible):
    """At tol 0 the commutator test leaves only rounding, 10 eps k^2: W_1 = diag(1, sqrt .5),
    W_2 = I + delta [[0, 1], [1, 0]] have relative commutator sqrt(2) delta (1 + delta)^-2,
    set to 10.5 eps k^2 (refused by the test) and 9.5 eps k^2 (left to the witness search)."""
    eps, k = np.finfo(float).eps, 2
    delta = multiple * eps * k ** 2 / np.sqrt(2)
    weights = [np.diag([1.0, np.sqrt(0.5)]), np.array([[1.0, delta], [delta, 1.0]])]
    worst, layer, refused = align.gram_commutators(weights, 0.0)
    A, B = weights[0] @ weights[0].T, weights[1].T @ weights[1]
    spectral = worst * np.linalg.norm(A) * np.linalg.norm(B) / (np.linalg.norm(A, 2) * np.linalg.norm(B, 2))
    assert spectral / (eps * k ** 2) == pytest.approx(multiple, rel=1e-3) and refused == impossible
    test = align.is_aligned(weights, tol=0.0)
    assert not test and ("do not commute" in test.reason) == impossible


@pytest.mark.parametrize("shape", [(2, 2), (40, 2), (3, 2)])
def test_is_aligned_turns_a_cluster_to_the_layers_own_singular_vectors(shape):
    """One layer with two singular values equal up to tol (0.8 and 0.8 (1 + 5e-9) at tol
    1e-8), in random bases: one cluster, whose witness is still turned to the layer's own
    singular vectors, so the residual is rounding (not the gap, ~1e-9)."""
    rng = np.random.default_rng(3)
    Q1, Q2 = (random_orthogonal(rng, k) for k in (shape[1], shape[0]))
    W = Q2 @ align.rect_diag(np.array([0.8, 0.8 * (1 + 5e-9)]), *shape) @ Q1.T
    test = align.is_aligned([W], tol=1e-8)
    assert test and test.residual < 1e-14


def test_commutator_ties_name_the_first_pair_of_layers():
    """W_3 = W_1^T and a symmetric W_2: the pairs (1, 2) and (2, 3) have commutators of equal
    norm, bit for bit ([B, A] = -[A, B]); the reason names the first pair."""
    W1, W2 = np.diag([1.0, 0.5]), np.array([[1.0, 0.5], [0.5, 1.0]])
    weights = [W1, W2, W1.T.copy()]
    A, B = W1 @ W1.T, W2.T @ W2
    test = align.is_aligned(weights, tol=0.0)
    assert not test and "W_1 W_1^T and W_2^T W_2 do not commute" in test.reason
    assert test.residual == pytest.approx(np.linalg.norm(A @ B - B @ A) / (np.linalg.norm(A) *
                                                                          np.linalg.norm(B)), rel=1e-14)




def test_definition2_positions_need_the_search_not_only_best_fit(monkeypatch):
    """is_aligned's step 3: widths 3-2-4-3-1-5 with strings over spaces 0-2, 1, 2-3 (two),
    2 and 3-4.  Best fit gives the string 0-2 the track ending at space 3 (position 1), and
    then space 3's string to space 4 finds no position left below k_4 = 1; the search puts
    it on the long track (position 0) and finds the witness."""
    rng = np.random.default_rng(0)
    widths = [3, 2, 4, 3, 1, 5]
    bases = [random_orthogonal(rng, k) for k in widths]
    sigmas = [np.array([1.5, 0.0]), np.array([1.2, 0.0]), np.array([0.0, 0.9, 0.7]),
              np.array([1.1]), np.array([0.0])]
    weights = align.aligned_network(bases, sigmas)
    test = align.is_aligned(weights)
    assert test and test.residual < 1e-14
    first = align._pairings

    def best_fit_only(tracks, strings):
        for pairing in first(tracks, strings):         # (the first pairing: best fit)
            yield pairing
            return
    monkeypatch.setattr(align, "_pairings", best_fit_only)
    assert "no positions" in align.is_aligned(weights).reason


def test_a_random_network_is_refused_without_an_svd(monkeypatch):
    """The fast "no" (Gram check relative to Frobenius norms): a random 300-300-300 network is
    refused before any SVD or spectral norm is computed, naming its layers, with the relative
    commutator ||[A, B]||_F / (||A||_F ||B||_F) as its residual."""
    rng = np.random.default_rng(90)
    weights = [rng.standard_normal((300, 300)) for _ in range(2)]

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD on the way to a fast no")
    A, B = weights[0] @ weights[0].T, weights[1].T @ weights[1]
    want = np.linalg.norm(A @ B - B @ A) / (np.linalg.norm(A) * np.linalg.norm(B))
    monkeypatch.setattr(np.linalg, "svd", no_svd)
    test = align.is_aligned(weights)
    assert not test and test.reason.startswith("W_1 W_1^T and W_2^T W_2 do not commute")
    assert test.residual == pytest.approx(want, rel=1e-10)


def test_rect_diag_refuses_a_float_size():
    with pytest.raises(ValueError, match="n must be an integer"):
        align.rect_diag(np.ones(2), 2, 3.0)
    np.testing.assert_array_equal(align.rect_diag([1, 2], 2, 3), [[1, 0, 0], [0, 2, 0]])


def test_a_pairs_commutator_bound_counts_its_own_two_layers_only():
    """Step 1 of is_aligned at tol 1e-3: the pair (W_1, W_2) of 3 x 3 layers has bound
    12 (e_1 + e_2) with e_i = tol sqrt(9); a large third layer (4000 x 3, e_3 = 0.11 > 0.1)
    does not make that pair undecidable.  A random pair is decided "no" at once."""
    rng = np.random.default_rng(31)
    Ws = [rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), rng.standard_normal((4000, 3))]
    worst, layer, impossible = align.gram_commutators(Ws, 1e-3)
    assert impossible and layer == 1 and worst > 12 * 6e-3
