"""Section 5 on align.py's reference code: layer structures, Theorem 2, Proposition 5
and Theorem 3."""
import numpy as np
import pytest

import align
import structured as st


STRUCTURES = {
    "conv2d": lambda: st.conv2d(4, 3),
    "toeplitz": lambda: st.toeplitz(5),
    "circulant": lambda: st.circulant(5),
    "diagonal": lambda: st.diagonal(5),
    "banded": lambda: st.banded(5, 1),
    "mask": lambda: st.mask(np.random.default_rng(0).random((5, 5)) < 0.5),
    "from_basis": lambda: st.from_basis(list(np.random.default_rng(1).standard_normal((6, 5, 5)))),
}


def sliding_window(image, filt):
    """Direct cross-correlation with zero padding, one output pixel at a time."""
    p, s = image.shape[0], filt.shape[0]
    h = (s - 1) // 2
    out = np.zeros_like(image)
    for y in range(p):
        for x in range(p):
            for a in range(s):
                for b in range(s):
                    yy, xx = y + a - h, x + b - h
                    if 0 <= yy < p and 0 <= xx < p:
                        out[y, x] += filt[a, b] * image[yy, xx]
    return out


@pytest.mark.parametrize("p, s", [(5, 3), (6, 5), (4, 1)])
def test_conv2d_matrix_is_the_sliding_window_cross_correlation(p, s):
    rng = np.random.default_rng(p)
    S = st.conv2d(p, s)
    assert S.r == s * s
    c = rng.standard_normal(s * s)
    W = S.to_matrix(c)
    images = rng.standard_normal((p * p, 3))
    for j in range(3):
        want = sliding_window(images[:, j].reshape(p, p), c.reshape(s, s)).ravel()
        np.testing.assert_allclose(W @ images[:, j], want, atol=1e-12)
    np.testing.assert_allclose(S.matmul(c, images), W @ images, atol=1e-12)
    np.testing.assert_allclose(S.rmatmul(c, images), W.T @ images, atol=1e-12)
    delta = rng.standard_normal((p * p, 3))
    np.testing.assert_allclose(S.outer_gradient(delta, images),
                               S.coefficient_gradient(delta @ images.T), atol=1e-12)


def test_conv2d_appendix_I_matrix_is_the_flipped_filter():
    c = np.arange(1.0, 10.0)                  # c_1..c_9 of Appendix I
    W = st.conv2d(3, 3).to_matrix(c[::-1])    # true convolution = correlation with flipped filter
    c1, c2, c3, c4, c5, c6, c7, c8, c9 = c
    appendix = np.array([
        [c5, c4, 0, c2, c1, 0, 0, 0, 0], [c6, c5, c4, c3, c2, c1, 0, 0, 0],
        [0, c6, c5, 0, c3, c2, 0, 0, 0], [c8, c7, 0, c5, c4, 0, c2, c1, 0],
        [c9, c8, c7, c6, c5, c4, c3, c2, c1], [0, c9, c8, 0, c6, c5, 0, c3, c2],
        [0, 0, 0, c8, c7, 0, c5, c4, 0], [0, 0, 0, c9, c8, c7, c6, c5, c4],
        [0, 0, 0, 0, c9, c8, 0, c6, c5]])
    np.testing.assert_array_equal(W, appendix)


@pytest.mark.parametrize("name", STRUCTURES)
def test_structure_basis_operations(name):
    S = STRUCTURES[name]()
    rng = np.random.default_rng(2)
    c = rng.standard_normal(S.r)
    W = S.to_matrix(c)
    np.testing.assert_allclose(S.coefficients(W), c, rtol=1e-10, atol=1e-12)
    G = rng.standard_normal(S.shape)
    P = S.project(G)
    np.testing.assert_allclose(S.project(P), P, atol=1e-10)                   # idempotent
    for j in range(min(S.r, 6)):                                               # G - P orthogonal to S
        A = S.to_matrix(np.eye(S.r)[j])
        assert abs(((G - P) * A).sum()) < 1e-9
    with pytest.raises(ValueError, match="not in"):
        S.coefficients(W + 1e-3 * (G - P) / np.linalg.norm(G - P) * np.linalg.norm(W))


def test_named_structures_have_the_right_dimension():
    assert st.toeplitz(4).r == 7 and st.circulant(4).r == 4 and st.diagonal(4).r == 4
    assert st.banded(5, 1).r == 13 and st.conv2d(28, 3).r == 9
    T = st.toeplitz(4).to_matrix(np.arange(7.0))
    assert all(len(set(np.diagonal(T, o))) == 1 for o in range(-3, 4))


def run_both(structures, params, X, Y, lr, steps, kind="mse"):
    """GD on coefficients, and projected GD W <- W - lr pi_S(dL/dW) on matrices."""
    coeffs = [p.copy() for p in params]
    mats = st.layer_matrices(structures, params)
    for _ in range(steps):
        _, g = st.loss_and_gradients(structures, coeffs, X, Y, kind)
        coeffs = [p - lr * gi for p, gi in zip(coeffs, g)]
        dense = align.gradients(mats, X, Y, kind)
        mats = [W - lr * (S.pi(G) if S is not None else G) for S, W, G in zip(structures, mats, dense)]
    return st.layer_matrices(structures, coeffs), mats


@pytest.mark.parametrize("name", STRUCTURES)
def test_theorem2_coefficient_gd_is_projected_gd(name):
    S = STRUCTURES[name]()
    rng = np.random.default_rng(3)
    k = S.shape[0]
    structures = [S, None, S]
    params = [rng.standard_normal(S.r) * 0.3, rng.standard_normal((k, k)) / k, rng.standard_normal(S.r) * 0.3]
    X, Y = rng.standard_normal((k, 6)), rng.standard_normal((k, 6))
    got, want = run_both(structures, params, X, Y, lr=0.01, steps=20)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_theorem2_orthonormal_basis_gives_orthogonal_projection_conv_shows_scaling():
    rng = np.random.default_rng(4)
    G = rng.standard_normal((16, 16))
    Q = np.linalg.qr(rng.standard_normal((256, 5)))[0]
    S = st.from_basis([q.reshape(16, 16) for q in Q.T])           # orthonormal basis
    np.testing.assert_allclose(S.pi(G), S.project(G), atol=1e-12)
    conv = st.conv2d(4, 3)                                        # orthogonal, not normalised
    norms = np.diag(conv.gram())
    assert norms.min() == 9 and norms.max() == 16                 # corner taps hit 9 of 16 pixels
    np.testing.assert_allclose(conv.coefficient_gradient(conv.pi(G)),
                               norms * conv.coefficient_gradient(conv.project(G)), rtol=1e-12)
    assert not np.allclose(conv.pi(G), conv.project(G))


def test_structured_training_on_backend(xp):
    rng = np.random.default_rng(5)
    S = st.conv2d(5, 3)
    params = [xp.asarray(rng.standard_normal(9) * 0.3) for _ in range(2)]
    X = xp.asarray(rng.standard_normal((25, 4)))
    out, hist = st.train([S, S], params, X, X, lr=0.05, max_steps=50, tol=0.0)
    assert hist.losses[-1] < hist.losses[0]
    assert type(out[0]).__module__.split(".")[0] == xp.__name__


@pytest.mark.parametrize("call, message", [
    (lambda: st.conv2d(5, 2), "odd filter size"),
    (lambda: st.toeplitz(3).to_matrix(np.ones(4)), "the 5 coefficients"),
    (lambda: st.toeplitz(3).pi(np.ones((3, 4))), "must be 3 x 3"),
    (lambda: st.from_basis([np.eye(2), 2 * np.eye(2)]), r"basis matrices \[1\] are linear"),
    (lambda: st.from_basis([np.eye(2), np.ones((3, 3))]), "one shape"),
    (lambda: st.mask(np.ones((2, 2))), "boolean"),
    (lambda: st.train([st.toeplitz(3)], [np.ones(5)], np.ones((4, 2)), np.ones((3, 2))), "takes 3 inputs"),
    (lambda: st.conv2d(3, 3).matmul(np.ones(9), np.ones((8, 2))), "acts on 9 x n"),
    (lambda: st.toeplitz(0), "toeplitz needs a matrix size k >= 1"),
    (lambda: st.circulant(2.5), "circulant needs a matrix size k >= 1"),
    (lambda: st.diagonal(-1), "diagonal needs a matrix size k >= 1"),
    (lambda: st.banded(0, 1), "banded needs a matrix size k >= 1"),
])
def test_bad_structures_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_proposition5_bound_and_the_papers_convolution_example():
    assert st.alignment_impossible(9, 16, 16)                  # m = 4: 28 x 28 style example
    assert not st.alignment_impossible(9, 9, 9)                # m = 3 is not covered
    for m in range(4, 9):
        for n in range(m * m, m * m + 3):
            assert st.alignment_impossible(9, m * m, n)
    assert not st.alignment_impossible(9, 16, 10)              # C(6, 2) = 15 too many
    assert st.alignment_impossible(0, 5, 4) and not st.alignment_impossible(3, 5, 3)


@pytest.mark.parametrize("seed", range(3))
def test_theorem3_interpolating_structured_network_is_not_aligned(seed):
    rng = np.random.default_rng(seed)
    S = st.conv2d(4, 3)                                          # r = 9 < k - 1 = 15
    assert st.alignment_impossible(S.r, 16, 20)
    teacher = [rng.standard_normal(9) * 0.5 for _ in range(2)]
    teacher[0][4] += 1.0
    teacher[1][4] += 1.0
    X = rng.standard_normal((16, 20)) / 4
    Y = st.layer_matrices([S, S], teacher)[1] @ st.layer_matrices([S, S], teacher)[0] @ X
    start = [t + 0.1 * rng.standard_normal(9) for t in teacher]
    out, hist = st.train([S, S], start, X, Y, lr=0.1, max_steps=20_000, tol=1e-12, record_every=10)
    assert hist.losses[-1] < 1e-10
    weights = st.layer_matrices([S, S], out)
    test = align.is_aligned(weights, tol=1e-6)
    assert not test and test.residual > 1e-2
    assert align.alignment(weights) < 0.9


@pytest.mark.parametrize("seed", range(3))
def test_theorem3_contrast_dense_network_on_certified_data_stays_aligned(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((16, 20)) / 4
    cert = align.invariance_certificate(X, X, [16] * 3)
    weights = align.aligned_init(cert.U, cert.V, [16] * 3, sigmas=[rng.uniform(0.5, 1, 16)] * 2)
    out, hist = align.train(weights, X, X, lr=0.5, max_steps=20_000, tol=1e-12, record_every=10)
    assert hist.losses[-1] < 1e-7
    assert align.is_aligned(out, tol=1e-8)


def test_from_basis_with_disjoint_supports_and_entries_other_than_one():
    """Basis 2 E_11, 3 E_22: Gram diag(4, 9) (squares of the entries), coefficients read
    back, project(G) keeps the diagonal, pi(G) = sum_j <A_j, G> A_j = diag(4 G_11, 9 G_22)."""
    E = np.zeros((2, 2, 3))
    E[0, 0, 0], E[1, 1, 1] = 2.0, 3.0
    S = st.from_basis(list(E))
    np.testing.assert_array_equal(S.gram(), np.diag([4.0, 9.0]))
    W = S.to_matrix(np.array([0.5, -1.0]))
    np.testing.assert_array_equal(W, [[1.0, 0, 0], [0, -3.0, 0]])
    np.testing.assert_allclose(S.coefficients(W), [0.5, -1.0], rtol=1e-15)
    G = np.arange(1.0, 7.0).reshape(2, 3)
    np.testing.assert_allclose(S.project(G), [[1.0, 0, 0], [0, 5.0, 0]], rtol=1e-15)
    np.testing.assert_allclose(S.pi(G), [[4.0, 0, 0], [0, 45.0, 0]], rtol=1e-15)


def test_structures_at_their_smallest_sizes_and_their_names():
    """The boundaries of the constructors: conv2d(2, 3) (s = 2p - 1) but not s = 2p + 1,
    k = 1 structures, a band of width 0 (the diagonal), one basis matrix; circulant's
    A_j[i, (i + j) mod k] = 1 pinned; a mask named after its shape."""
    assert st.conv2d(2, 3).r == 9
    with pytest.raises(ValueError, match="wider than 2p - 1"):
        st.conv2d(2, 5)
    for make in (st.toeplitz, st.circulant, st.diagonal):
        S = make(1)
        np.testing.assert_array_equal(S.to_matrix(np.array([2.5])), [[2.5]])
    np.testing.assert_array_equal(st.banded(4, 0).to_matrix(np.arange(1.0, 5.0)), np.diag(np.arange(1.0, 5.0)))
    np.testing.assert_array_equal(st.circulant(3).to_matrix(np.array([1.0, 2.0, 3.0])),
                                  [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])
    one = st.from_basis([np.arange(6.0).reshape(3, 2)])
    assert one.r == 1 and one.shape == (3, 2)
    assert repr(st.mask(np.eye(3, 4) > 0)).count("mask(3x4, r=3)") == 1


def test_from_basis_on_tall_matrices_with_overlapping_supports_and_at_large_scale():
    """A 3 x 2 basis with overlapping supports: the Gram matrix of the entries is B B^T,
    coefficients are read back at scale 1e6, and a dependent matrix is found at that scale."""
    A = [np.array([[1.0, 2.0], [0, 1.0], [3.0, 0]]), np.array([[0, 1.0], [1.0, 0], [1.0, 1.0]])]
    S = st.from_basis([1e6 * M for M in A])
    B = np.stack([1e6 * M.ravel() for M in A])
    np.testing.assert_allclose(S.gram(), B @ B.T, rtol=1e-14)
    W = S.to_matrix(np.array([0.5, -2.0]))
    np.testing.assert_allclose(S.coefficients(W), [0.5, -2.0], rtol=1e-12)
    with pytest.raises(ValueError, match=r"basis matrices \[2\]"):
        st.from_basis([1e6 * A[0], 1e6 * A[1], 1e6 * (A[0] - 3 * A[1])])
    with pytest.raises(ValueError, match="not in"):
        S.coefficients(W + 1e-3 * np.abs(W).max() * np.eye(3, 2)[::-1])


def test_structured_networks_name_the_layer_that_does_not_fit():
    S = st.toeplitz(3)
    X = np.ones((3, 4))
    with pytest.raises(ValueError, match="one parameter array per layer: 2 structures, 1 params"):
        st.check_structured([S, S], [np.zeros(5)], X)
    with pytest.raises(ValueError, match="dense layer W_1 must have 3 columns"):
        st.check_structured([None, S], [np.zeros((3, 2)), np.zeros(5)], X)
    with pytest.raises(ValueError, match=r"layer 2 \(toeplitz\(4\)\) takes 4 inputs but gets 3"):
        st.check_structured([S, st.toeplitz(4)], [np.zeros(5), np.zeros(7)], X)


def test_structured_networks_that_fit_and_their_loss_over_three_layers():
    """check_structured accepts a dense 4 x 3 layer then a 2 x 4 structure (kd = 2), and the
    loss of a 3-layer structured network is align.loss of its dense matrices."""
    rng = np.random.default_rng(18)
    tall = st.from_basis(list(rng.standard_normal((3, 2, 4))))
    X = rng.standard_normal((3, 5))
    assert st.check_structured([None, tall], [np.zeros((4, 3)), np.zeros(3)], X)[2] == 2
    structures = [st.toeplitz(3), None, st.diagonal(3)]
    params = [rng.standard_normal(5), rng.standard_normal((3, 3)), rng.standard_normal(3)]
    Y = rng.standard_normal((3, 5))
    for order in ([0, 1, 2], [0, 2, 1]):                 # (a dense layer third, a structure third)
        chosen = [structures[i] for i in order], [params[i] for i in order]
        L, _ = st.loss_and_gradients(*chosen, X, Y)
        assert L == pytest.approx(align.loss(st.layer_matrices(*chosen), X, Y), rel=1e-14)


def test_structured_train_defaults_record_every_step_and_measure_every_100_up_to_10000():
    S = st.diagonal(2)
    _, hist = st.train([S], [np.array([0.5, 0.5])], np.eye(2), np.eye(2), tol=0.0,
                       measures={"c": lambda ws, w0: float(ws[0][0, 0])})
    assert hist.final_step == 10_000 and hist.steps[:3] == [0, 1, 2]
    assert hist.measure_steps[:3] == [0, 100, 200] and hist.measure_steps[-1] == 10_000


@pytest.mark.parametrize("r, k, n, impossible", [(7, 9, 9, True), (8, 9, 9, False), (7, 9, 8, True),
                                                 (8, 9, 8, False), (6, 9, 7, True), (7, 9, 7, False)])
def test_proposition5_bound_at_its_boundaries(r, k, n, impossible):
    """r < k - 1 - C(k - n, 2): k - n = 0 or 1 leaves k - 1; k - n = 2 takes C(2, 2) = 1 more."""
    assert st.alignment_impossible(r, k, n) is impossible


def test_structures_at_tol_0_accept_exact_members_and_refuse_exact_duplicates():
    """The boundaries at tol = 0: a matrix exactly in the span has gap 0 and its coefficients
    are read; a basis matrix repeated exactly has remainder 0 and is named as dependent."""
    S = st.diagonal(3)
    np.testing.assert_array_equal(S.coefficients(np.diag([1.0, -2.0, 3.0]), tol=0.0), [1.0, -2.0, 3.0])
    E = np.zeros((2, 2))
    E[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"basis matrices \[1\]"):
        st.from_basis([E, E.copy()], tol=0.0)
