"""Section 4 of the paper, each statement checked on numbers (float64) with align.py's
reference code."""
import math

import numpy as np
import pytest

import align
from conftest import random_orthogonal
import verify
from verify import drift_run



def certified_data(rng, task, k, n=None):
    """(X, Y) for autoencoding, matrix factorisation and matrix inversion (Section 4.2)."""
    n = n or k + 3
    if task == "autoencoding":
        X = rng.standard_normal((k, n))
        return X, X.copy()
    if task == "factorisation":
        return np.eye(k), rng.standard_normal((k, k))
    if task == "inversion":
        return random_orthogonal(rng, k) @ np.diag(rng.uniform(1, 2, k)) @ random_orthogonal(rng, k), np.eye(k)
    raise ValueError(task)


def normalise(X, Y):
    """Scale the data so that lr = 0.05 is a stable step for the squared loss."""
    s = np.linalg.norm(X, 2) / math.sqrt(X.shape[1])
    return X / s, Y / s


def run_aligned(X, Y, widths, steps, seed):
    """verify.drift_run, with the certificate required: (weights, History, certificate,
    largest off-diagonal of U_i^T W_i(t) V_i)."""
    drift, hist, out, cert = drift_run(np, X, Y, widths, steps, seed)
    assert cert, f"certificate expected, violation {cert.violation}"
    return out, hist, cert, drift


@pytest.mark.parametrize("task", ["autoencoding", "factorisation", "inversion"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_alignment_is_invariant_on_certified_data(task, seed):
    rng = np.random.default_rng(seed)
    k = 4 + seed
    X, Y = normalise(*certified_data(rng, task, k))
    out, hist, cert, drift = run_aligned(X, Y, [k] * 4, steps=10_000, seed=seed)
    assert drift < 1e-10                       # U_i, V_i (and V_1, U_d: strong) never move
    assert align.is_aligned(out)
    assert align.alignment(out) == pytest.approx(1.0, abs=1e-10)
    assert hist.losses[-1] < 1e-8              # zero training loss in the limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem4_rectangular_network_stays_aligned(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((6, 20))
    X /= np.linalg.norm(X, 2) / math.sqrt(20)
    E = np.linalg.eigh(X @ X.T)[1]
    A = random_orthogonal(rng, 3) @ align.rect_diag(rng.uniform(0.5, 1.5, 3), 3, 6) @ E.T
    Y = A @ X                                   # U^T Y X^T V diagonal for V = E, U = Q
    widths = [6, 8, 4, 3]
    out, hist, cert, drift = run_aligned(X, Y, widths, steps=10_000, seed=seed)
    assert cert.r == 3 and drift < 1e-10
    assert align.is_aligned(out)
    assert hist.losses[-1] < 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_alignment_is_lost_on_uncertified_data(seed):
    rng = np.random.default_rng(seed)
    X, Y = normalise(rng.standard_normal((5, 5)), rng.standard_normal((5, 5)))
    cert = align.invariance_certificate(X, Y, [5] * 4)
    assert not cert and cert.violation > 1e-3
    U, V = random_orthogonal(rng, 5), random_orthogonal(rng, 5)
    weights = align.aligned_init(U, V, [5] * 4, seed=seed)
    assert align.is_aligned(weights)
    out, _ = align.train(weights, X, Y, lr=0.05, max_steps=2000, tol=0.0)
    assert not align.is_aligned(out, tol=1e-6)
    assert align.alignment(out) < 1 - 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_certificate_handles_repeated_eigenvalues_rank_deficiency_and_few_samples(seed):
    rng = np.random.default_rng(seed)
    k = 5
    # X X^T = I (all eigenvalues repeated): the basis must diagonalise Y X^T too
    Q = random_orthogonal(rng, k)
    cert = align.invariance_certificate(Q, rng.standard_normal((k, k)), [k] * 3)
    assert cert and cert.residual < 1e-10
    # n < k0, X rank deficient: autoencoding is still certified
    X = rng.standard_normal((k, 3))
    cert = align.invariance_certificate(X, X, [k] * 3)
    assert cert and cert.residual < 1e-10
    assert np.allclose(cert.U.T @ X @ X.T @ cert.V, np.diag(cert.lam), atol=1e-10)
    # matrix sensing with M_i = U Lambda_i V^T
    U, V = random_orthogonal(rng, k), random_orthogonal(rng, k)
    Ms = np.stack([U @ np.diag(rng.standard_normal(k)) @ V.T for _ in range(7)])
    ok, Uc, Vc, res = align.sensing_certificate(Ms)
    assert ok and res < 1e-10
    assert not align.sensing_certificate(rng.standard_normal((7, k, k)))[0]


def test_certificate_rejects_generic_gaussian_data_far_from_rounding():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        cert = align.invariance_certificate(rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), [4] * 3)
        assert not cert and cert.violation > 1e-3


def test_aligned_init_is_aligned_balanced_and_rectangular():
    rng = np.random.default_rng(3)
    widths = [6, 8, 4, 3]
    U, V = random_orthogonal(rng, 3), random_orthogonal(rng, 6)
    weights = align.aligned_init(U, V, widths, seed=1)
    assert [W.shape for W in weights] == [(8, 6), (4, 8), (3, 4)]
    assert align.is_aligned(weights)
    balanced = align.aligned_init(U, V, widths, seed=1, balanced=True)
    for A, B in zip(balanced, balanced[1:]):
        np.testing.assert_allclose(B.T @ B, A @ A.T, atol=1e-12)
    with pytest.raises(ValueError, match="U must be kd x kd"):
        align.aligned_init(V, U, widths)


@pytest.mark.parametrize("kind", ["mse", "mse_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corollary1_reduced_dynamics_equal_full_gd(kind, seed):
    rng = np.random.default_rng(seed)
    k, d = 5, 3 + seed
    X, Y = normalise(*certified_data(rng, "autoencoding", k, n=9))
    cert = align.invariance_certificate(X, Y, [k] * (d + 1))
    sig0 = [rng.uniform(0.3, 1.0, k) for _ in range(d)]
    weights = align.aligned_init(cert.U, cert.V, [k] * (d + 1), sigmas=sig0)
    bases = [cert.V] + [np.eye(k)] * (d - 1) + [cert.U]
    steps, lr = 300, 0.05
    traj = align.singular_value_dynamics(np.array(sig0), cert.lam, cert.lam_prime, lr, 9, steps,
                                         kind=kind, kd=k)
    ws = [W.copy() for W in weights]
    for t in range(steps + 1):
        if t % 50 == 0:
            full = np.array([np.diagonal(bases[i + 1].T @ W @ bases[i]) for i, W in enumerate(ws)])
            np.testing.assert_allclose(traj[t], full, rtol=1e-10, atol=1e-13)
        grads = align.gradients(ws, X, Y, kind)
        ws = [W - lr * G for W, G in zip(ws, grads)]


def test_corollary1_printed_eq6_product_over_all_j_is_wrong():
    sig = np.array([[0.5], [0.4], [0.3]])
    lam, lamp = np.array([1.0]), np.array([2.0])
    step = align.singular_value_dynamics(sig, lam, lamp, lr=0.1, n=1, steps=1)[1]
    S = sig.prod()
    others = np.array([[0.4 * 0.3], [0.5 * 0.3], [0.5 * 0.4]])
    np.testing.assert_allclose(step, sig + 0.1 * others * (lamp - lam * S))
    assert not np.allclose(step, sig + 0.1 * S * (lamp - lam * S))


@pytest.mark.parametrize("seed", range(4))
def test_proposition2_linear_convergence_under_its_learning_rate(seed):
    rng = np.random.default_rng(seed)
    d, r, n = 3 + seed % 2, 4, 10
    lam, lamp = rng.uniform(0.5, 2, r), rng.uniform(0.5, 2, r)
    sig0 = rng.uniform(0.2, 0.6, (d, r))
    assert (sig0.prod(0) < lamp / lam).all()
    lr = align.prop2_learning_rate(sig0, lam, lamp, n)
    steps = 3000
    traj = align.singular_value_dynamics(sig0, lam, lamp, lr, n, steps)
    S = traj.prod(axis=1)                         # (steps + 1, r)
    target = lamp / lam
    assert (np.diff(S, axis=0) >= -1e-15).all()   # monotone increase
    assert (S <= target + 1e-12).all()
    eta = lr * lam / n
    rate = 1 - d * eta * S[0] ** (2 - 2 / d)
    t = np.arange(steps + 1)[:, None]
    assert ((target - S) <= (target - S[0]) * rate ** t + 1e-12).all()
    assert (rate < 1).all() and (target - S[-1] < target - S[0]).all()      # linear, and moving


@pytest.mark.parametrize("kind", ["mse", "logistic", "exp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proposition1_rank_one_output_network_stays_aligned(kind, seed):
    rng = np.random.default_rng(seed)
    k0, n, widths = 8, 6, [8, 5, 4, 1]
    X = rng.standard_normal((k0, n)) / math.sqrt(k0)
    Y = rng.choice([-1.0, 1.0], (1, n)) if kind != "mse" else rng.standard_normal((1, n))
    bases = [random_orthogonal(rng, k) for k in widths]
    sigmas = [np.array([0.8] + [0.0] * (min(a, b) - 1)) for a, b in zip(widths, widths[1:])]
    weights = align.aligned_network(bases, sigmas)
    out, hist = align.train(weights, X, Y, kind=kind, lr=0.2, max_steps=4000, tol=1e-3,
                            measure_every=400,
                            measures={"aligned": lambda w, _: bool(align.is_aligned(w, tol=1e-9))})
    assert all(hist.measurements["aligned"])
    assert all(np.linalg.matrix_rank(W, tol=1e-9) == 1 for W in out)
    assert hist.losses[-1] < 0.05


@pytest.mark.parametrize("check", [verify.proposition3_and_appendix_g, verify.proposition4])
def test_propositions_3_and_4_as_verify_checks_them(check):
    """Proposition 3 (the balanced aligned factorisation attains 2 ||P||_*, the minimum;
    Appendix G as printed fails) and Proposition 4 (an interpolating aligned network's
    W_d^T and W_1^T align with Y X^T (X X^T)^{-1}; a random one's do not): verify's own
    checks, over four seeds, are the single statement of each."""
    rows = check(np, range(4), None)
    assert len(rows) >= 2 and all(row.holds for row in rows), [r for r in rows if not r.holds]


def test_theorem1_and_corollary1_on_backend(xp):
    rng = np.random.default_rng(7)
    k = 5
    X, Y = normalise(*certified_data(rng, "autoencoding", k))
    cert = align.invariance_certificate(X, Y, [k] * 4)
    sig0 = [rng.uniform(0.5, 1.0, k) for _ in range(3)]
    weights = align.aligned_init(xp.asarray(cert.U), xp.asarray(cert.V), [k] * 4, sigmas=sig0)
    out, hist = align.train(weights, xp.asarray(X), xp.asarray(Y), lr=0.05, max_steps=2000, tol=0.0)
    assert align.is_aligned(out)
    traj = align.singular_value_dynamics(xp.asarray(np.array(sig0)), cert.lam, cert.lam_prime, 0.05,
                                         X.shape[1], 2000, record_every=2000)
    bases = [cert.V] + [np.eye(k)] * 2 + [cert.U]
    full = np.array([np.diagonal(bases[i + 1].T @ align.to_numpy(W) @ bases[i]) for i, W in enumerate(out)])
    np.testing.assert_allclose(align.to_numpy(traj[-1]), full, rtol=1e-9)


@pytest.mark.parametrize("d, batch, every", [(3, (), 1), (4, (2,), 25), (16, (), 7), (17, (), 10)])
def test_corollary1_recursion_same_numbers_on_every_backend(xp, d, batch, every):
    """On the GPU one thread runs all steps of a direction (up to depth 16; deeper
    networks take the array path): the same operations in the same order as NumPy."""
    rng = np.random.default_rng(60 + d)
    r = 5
    sig0 = rng.uniform(0.8, 1.0, batch + (d, r))
    lam, lamp = rng.uniform(0.5, 2, r), rng.uniform(0.5, 2, r)
    want = align.singular_value_dynamics(sig0, lam, lamp, 0.01, 4, 100, record_every=every)
    got = align.singular_value_dynamics(xp.asarray(sig0), xp.asarray(lam), lamp, 0.01, 4, 100,
                                        record_every=every)
    assert got.shape == want.shape == (100 // every + 1,) + batch + (d, r)
    np.testing.assert_allclose(align.to_numpy(got), want, rtol=1e-14, atol=0)


def test_proposition2_learning_rate_on_a_hand_computed_example():
    """gamma = (n ln 2 / d) min_k [min_i sigma_k(W_i(0))^2 lam_k / lam'_k^2] over lam'_k != 0:
    here n = 3, d = 2, the smallest sigmas per k are (0.5, 2, 0.7), k = 2 has lam' = 0, and
    the terms for k = 1, 3 are 0.25 * 4 / 9 and 0.49 * 1 / 1."""
    sigmas0 = np.array([[1.0, 2.0, 0.7], [0.5, 3.0, 0.9]])
    gamma = align.prop2_learning_rate(sigmas0, [4.0, 9.0, 1.0], [3.0, 0.0, 1.0], n=3)
    assert gamma == pytest.approx(3 * math.log(2) / 2 * (0.25 * 4 / 9), rel=1e-14)


def test_balanced_factorization_with_a_given_non_symmetric_orthonormal_w():
    """Proposition 3 with W != W^T: W_1 = W Sigma^{1/2} V^T, W_2 = U Sigma^{1/2} W^T, so
    W_2 W_1 = P, W_1 W_1^T = W_2^T W_2 (balanced) and the norms sum to 2 ||P||_*."""
    rng = np.random.default_rng(11)
    P = rng.standard_normal((3, 4))
    W = random_orthogonal(rng, 3)
    assert np.abs(W - W.T).max() > 0.1
    W1, W2 = align.balanced_factorization(P, W=W)
    U, s, Vt = np.linalg.svd(P)
    np.testing.assert_allclose(W2 @ W1, P, atol=1e-12)
    np.testing.assert_allclose(W1, W @ np.diag(np.sqrt(s)) @ Vt[:3], atol=1e-12)
    np.testing.assert_allclose(W2, U @ np.diag(np.sqrt(s)) @ W.T, atol=1e-12)
    np.testing.assert_allclose(W1 @ W1.T, W2.T @ W2, atol=1e-12)
    assert np.sum(W1 ** 2) + np.sum(W2 ** 2) == pytest.approx(2 * s.sum(), rel=1e-12)


def refinement_data():
    """X X^T = diag(1, 1, 4) and (YX^T)^T YX^T with eigenvectors e1, (0, c, s), (0, -s, c):
    S's eigenspace span(e1, e2) holds one joint eigenvector, e1, found only by refining it
    (G e2 leaves the eigenspace)."""
    c, s = math.cos(0.4), math.sin(0.4)
    Q = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    X = np.diag([1.0, 1.0, 2.0])
    C = np.diag([3.0, 1.0, 2.0]) @ Q.T
    return X, C @ np.linalg.inv(X.T)


@pytest.mark.parametrize("sx, sy", [(1.0, 1.0), (1e3, 1e3), (1e-3, 1e2)])
def test_certificate_refines_an_eigenspace_to_its_joint_eigenvector_at_any_scale(sx, sy):
    X, Y = refinement_data()
    cert = align.invariance_certificate(sx * X, sy * Y, [3, 3, 1, 3])
    assert cert.ok and cert.r == 1 and cert.residual < 1e-12
    assert abs(cert.V[0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert cert.lam_prime[0] == pytest.approx(3.0 * sx * sy, rel=1e-12)
    assert cert.lam[0] == pytest.approx(sx ** 2, rel=1e-12)
    assert not align.invariance_certificate(X, Y, [3, 3, 2, 3]).ok     # (only one joint vector)


def test_certificate_at_a_bottleneck_keeps_the_modes_of_largest_gain():
    """With r < rank the certificate keeps the joint modes of largest lam'^2 / lam (each
    mode's loss reduction): lam = (1, 4, 1/4), lam' = (3, 4, 1/2) give gains (9, 4, 1), so
    r = 2 keeps modes 1 and 2 in that order (by lam' alone, or lam'^2 lam: 2 before 1)."""
    X, Y = np.diag([1.0, 2.0, 0.5]), np.diag([3.0, 2.0, 1.0])
    cert = align.invariance_certificate(X, Y, [3, 2, 3])
    assert cert.ok and cert.r == 2
    np.testing.assert_allclose(cert.lam_prime, [3.0, 4.0], rtol=1e-12)
    np.testing.assert_allclose(cert.lam, [1.0, 4.0], rtol=1e-12)
    assert "lam=" not in repr(cert) and "array(" not in repr(cert)


def test_sensing_certificate_does_not_depend_on_the_scale_of_the_matrices():
    rng = np.random.default_rng(17)
    U, V = random_orthogonal(rng, 4), random_orthogonal(rng, 4)
    Ms = np.stack([U @ np.diag(rng.standard_normal(4)) @ V.T for _ in range(5)])
    for scale in (1e-3, 1.0, 1e4):
        ok, _, _, residual = align.sensing_certificate(scale * Ms)
        assert ok and residual < 1e-12
    Ms[0] += 0.01 * rng.standard_normal((4, 4))
    residuals = [align.sensing_certificate(scale * Ms)[3] for scale in (1e-3, 1.0, 1e4)]
    np.testing.assert_allclose(residuals, residuals[1], rtol=1e-6)
    assert residuals[1] > 1e-4


def test_aligned_init_balanced_shares_the_product_of_signed_values_and_refuses_near_orthogonal():
    """balanced: each layer gets |prod_i sigma_i|^(1/d) per mode (d = 2 here: sqrt(|-1 * 9|),
    sqrt(4 * 1)); a U that is 0.9 I (Q^T Q - I = -0.19 I) is not orthogonal."""
    I = np.eye(2)
    weights = align.aligned_init(I, I, [2, 2, 2], sigmas=[[-1.0, 4.0], [9.0, 1.0]], balanced=True)
    for W in weights:
        np.testing.assert_allclose(np.abs(np.diagonal(W)), [3.0, 2.0], rtol=1e-14)
    with pytest.raises(ValueError, match="orthogonal"):
        align.aligned_init(0.9 * I, I, [2, 2, 2])


def test_joint_eigenvectors_refine_an_eigenspace_at_any_scale():
    """_joint_eigenvectors on the refinement data: S's 2-dimensional eigenspace holds one
    joint eigenvector (e1), its 1-dimensional one (e3) none: exactly +-e1, at any scale."""
    X, Y = refinement_data()
    for scale in (1e-3, 1.0, 1e3):
        S, C = (scale * X) @ (scale * X).T, (scale * Y) @ (scale * X).T
        J = align._joint_eigenvectors(S, C.T @ C, 1e-9)
        assert J.shape == (3, 1) and abs(J[0, 0]) == pytest.approx(1.0, abs=1e-12)


def violation_data():
    """X X^T = diag(1, 2, 3), (YX^T)^T YX^T = G = [[2, 1, 0], [1, 2, 0], [0, 0, 5]]: only e3
    is a joint eigenvector; G e_j - (e_j^T G e_j) e_j has norms (1, 1, 0), ||G||_2 = 5."""
    G = np.array([[2.0, 1, 0], [1, 2, 0], [0, 0, 5]])
    w, Q = np.linalg.eigh(G)
    C = Q @ np.diag(np.sqrt(w)) @ Q.T
    X = np.diag(np.sqrt([1.0, 2.0, 3.0]))
    return X, C @ np.linalg.inv(X.T)


def test_certificate_violation_on_a_hand_example():
    """r = 1: e3 is enough (ok); r = 2: the violation is the 2nd smallest residual norm over
    ||G||_2 = 1 / 5 (none for r = 1: 0 / 5)."""
    X, Y = violation_data()
    assert align.invariance_certificate(X, Y, [3, 1, 3]).ok
    cert = align.invariance_certificate(X, Y, [3, 2, 3])
    assert not cert.ok and cert.violation == pytest.approx(0.2, rel=1e-12)
    assert align.invariance_certificate(X, Y, [3, 3, 3]).violation == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("moved", ["X", "Y"])
def test_certificate_residual_is_its_largest_off_block_entry(moved):
    """Data 1e-8 away from the condition (X moved: the V^T S V term leads; Y moved: the
    U^T C V term): the certificate at tol 1e-6 holds (residual <= 1e3 tol) with residual =
    max(off-block of U^T C V / ||C||_2, off-block of V^T S V / ||S||_2)."""
    X, Y = refinement_data()
    noise = 1e-8 * np.random.default_rng(19).standard_normal(X.shape)
    X, Y = (X + noise, Y) if moved == "X" else (X, Y + noise)
    cert = align.invariance_certificate(X, Y, [3, 3, 1, 3], tol=1e-6)
    S, C = X @ X.T, Y @ X.T

    def off_block(M, r):
        M = np.abs(M) * (1 - np.eye(*M.shape))
        M[r:, r:] = 0
        return M.max()
    want = max(off_block(cert.U.T @ C @ cert.V, 1) / np.linalg.norm(C, 2),
               off_block(cert.V.T @ S @ cert.V, 1) / np.linalg.norm(S, 2))
    assert cert.ok and cert.residual == pytest.approx(want, rel=1e-9) and 1e-10 < want < 1e-6


def test_certificates_at_tol_0_accept_exact_data():
    """The boundary residual <= 1e3 tol: diagonal sensing matrices have residual exactly 0,
    accepted at tol = 0 (and a non-diagonalisable pair is not)."""
    Ms = np.stack([np.diag([3.0, 1.0, 2.0]), np.diag([1.0, 5.0, -1.0])])
    ok, U, V, residual = align.sensing_certificate(Ms, tol=0.0)
    assert ok and residual == 0.0
    Ms[1, 0, 1] = 1.0
    assert not align.sensing_certificate(Ms, tol=0.0)[0]


def test_aligned_init_accepts_a_basis_exactly_at_its_orthogonality_tolerance():
    """|Q^T Q - I| <= 1e-6 is orthogonal enough: Q = [[1, 0], [1e-6, 1]] has largest entry
    of Q^T Q - I exactly 1e-6 (accepted); 2e-6 is refused."""
    I = np.eye(2)
    assert len(align.aligned_init(np.array([[1.0, 0.0], [1e-6, 1.0]]), I, [2, 2, 2], seed=0)) == 2
    with pytest.raises(ValueError, match="orthogonal"):
        align.aligned_init(np.array([[1.0, 0.0], [2e-6, 1.0]]), I, [2, 2, 2], seed=0)


def test_certificate_uses_at_most_kd_minus_rank_zero_images():
    """u_j of a zero lambda'_j must lie in null((Y X^T)^T): at most kd - rank(Y X^T) of them.
    S = X X^T has eigenvectors e3, e4 (in the null space of C = Y X^T = [diag(1, 2), 0]) and
    a 2 x 2 block [[3, .5], [.5, 2]] sharing no eigenvector with G = C^T C = diag(1, 4, 0, 0).
    C has rank kd = 2, so e3, e4 cannot serve: for r = 2 the condition fails, its violation
    that of the block's eigenvectors v = (c, s): ||G v - (v^T G v) v|| / ||G||_2 = 3 |cs| / 4
    = 0.375 |sin 2 theta| with tan 2 theta = 1, not 0 (e3's and e4's)."""
    S = np.diag([3.0, 2.0, 5.0, 7.0])
    S[0, 1] = S[1, 0] = 0.5
    w, E = np.linalg.eigh(S)
    X = E @ np.diag(np.sqrt(w)) @ E.T                       # X X^T = S
    C = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    Y = C @ np.linalg.solve(S, X)                           # Y X^T = C
    for tol in (1e-9, 0.0):                                 # (at 0: images exactly 0 are zero)
        cert = align.invariance_certificate(X, Y, [4, 2, 2], tol=tol)
        assert not cert.ok and cert.U is None
        assert cert.violation == pytest.approx(0.375 / np.sqrt(2), rel=1e-9)


def test_certificate_with_a_zero_width_layer_holds_with_identities():
    """r = 0 (a layer of width 0): nothing to share; U and V are the identities of R^kd and
    R^k0 (k0 = 3 here, not the n = 5 samples)."""
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((3, 5)), rng.standard_normal((2, 5))
    cert = align.invariance_certificate(X, Y, [3, 0, 2])
    assert cert.ok and cert.residual == 0.0
    np.testing.assert_array_equal(cert.V, np.eye(3))
    np.testing.assert_array_equal(cert.U, np.eye(2))


def test_certificate_ranks_modes_by_lam_prime_squared_over_lam():
    """r = 1 of three joint modes with lam = (1, 5, 0.1), lam' = (1, 2, 0.3): gains lam'^2 /
    lam = (1, 0.8, 0.9) keep mode 1 (lam'^3 / lam would keep mode 2, lam' / lam mode 3)."""
    X = np.diag(np.sqrt([1.0, 5.0, 0.1]))
    Y = np.diag([1.0, 2.0, 0.3]) @ np.linalg.inv(X.T)        # Y X^T = diag(1, 2, 0.3)
    cert = align.invariance_certificate(X, Y, [3, 1, 3])
    assert cert.ok
    np.testing.assert_allclose(cert.lam, [1.0], rtol=1e-12)
    np.testing.assert_allclose(cert.lam_prime, [1.0], rtol=1e-12)
    np.testing.assert_allclose(np.abs(cert.V[:, 0]), [1.0, 0.0, 0.0], atol=1e-12)


def test_certificate_violation_takes_zero_images_relative_to_the_size_of_y_x():
    """The example of test_certificate_uses_at_most_kd_minus_rank_zero_images with C scaled
    by 1000 and e3, e4 given images of 1e-8 (below tol 1e-9 x ||C||_2 = 2e-6: zero): the same
    violation, 0.375 / sqrt 2."""
    S = np.diag([3.0, 2.0, 5.0, 7.0])
    S[0, 1] = S[1, 0] = 0.5
    w, E = np.linalg.eigh(S)
    X = E @ np.diag(np.sqrt(w)) @ E.T
    C = 1e3 * np.array([[1.0, 0.0, 1e-11, 0.0], [0.0, 2.0, 0.0, 1e-11]])
    Y = C @ np.linalg.solve(S, X)
    cert = align.invariance_certificate(X, Y, [4, 2, 2])
    assert not cert.ok
    assert cert.violation == pytest.approx(0.375 / np.sqrt(2), rel=1e-6)


def test_sensing_certificate_of_negative_matrices_holds():
    """M_i = U D_i V^T with negative D_i: diagonalisable (residual rounding), and the
    residual is the largest |off-diagonal entry| of U^T M_i V over the largest |entry|."""
    rng = np.random.default_rng(13)
    U, V = random_orthogonal(rng, 3), random_orthogonal(rng, 3)
    Ms = np.stack([U @ np.diag(-rng.uniform(1, 2, 3)) @ V.T for _ in range(2)])
    ok, Uc, Vc, residual = align.sensing_certificate(Ms)
    assert ok and residual < 1e-14
    Ms[1, 0, 1] -= 0.5                                   # not diagonalisable any more
    ok, Uc, Vc, residual = align.sensing_certificate(Ms)
    off = (Uc.T @ Ms @ Vc) * (1.0 - np.eye(3))
    assert not ok and residual == np.abs(off).max() / np.abs(Ms).max()


def test_aligned_init_refuses_a_wrong_shape_of_either_side_and_a_tall_chain():
    I3, I2 = np.eye(3), np.eye(2)
    with pytest.raises(ValueError, match="U must be kd x kd"):
        align.aligned_init(I3, I2, [2, 3, 2], seed=0)           # U wrong, V right
    with pytest.raises(ValueError, match="U must be kd x kd"):
        align.aligned_init(I2, I3, [2, 3, 2], seed=0)           # V wrong, U right
    tall = np.eye(3)[:, :2]                                    # orthonormal columns, not square
    with pytest.raises(ValueError, match="chain\\[0\\] must be an orthogonal matrix"):
        align.aligned_init(I2, I2, [2, 3, 2], seed=0, chain=[tall])


def test_certificate_refuses_a_basis_that_does_not_block_diagonalise(monkeypatch):
    """The last check of invariance_certificate: should the joint eigenvectors be off (here
    turned by 1e-3 on purpose), the residual (1e-3) is above 1e3 tol and the answer is no."""
    X, Y = refinement_data()
    joint = align._joint_eigenvectors
    turn = np.linalg.qr(np.eye(3) + 1e-3 * np.random.default_rng(3).standard_normal((3, 3)))[0]
    monkeypatch.setattr(align, "_joint_eigenvectors", lambda S, G, tol: turn @ joint(S, G, tol))
    cert = align.invariance_certificate(X, Y, [3, 3, 1, 3], tol=1e-9)
    assert not cert.ok and 1e-4 < cert.residual < 1e-2


def test_sensing_certificate_takes_rectangular_matrices():
    """Matrix sensing with k x m measurement matrices M_i = U D_i V^T (U k x k, V m x m)."""
    rng = np.random.default_rng(23)
    U, V = random_orthogonal(rng, 3), random_orthogonal(rng, 5)
    Ms = np.stack([U @ align.rect_diag(rng.standard_normal(3), 3, 5) @ V.T for _ in range(4)])
    ok, Uc, Vc, residual = align.sensing_certificate(Ms)
    assert ok and residual < 1e-13 and Uc.shape == (3, 3) and Vc.shape == (5, 5)


def test_aligned_init_takes_any_orthogonal_chain_of_the_hidden_widths():
    rng = np.random.default_rng(29)
    U, V = random_orthogonal(rng, 2), random_orthogonal(rng, 3)
    chain = [random_orthogonal(rng, 4), random_orthogonal(rng, 5)]
    weights = align.aligned_init(U, V, [3, 4, 5, 2], chain=chain, seed=1)
    assert [W.shape for W in weights] == [(4, 3), (5, 4), (2, 5)]
    assert align.is_aligned(weights)
    np.testing.assert_allclose(chain[0].T @ weights[0] @ V, align.rect_diag(
        np.diagonal(chain[0].T @ weights[0] @ V), 4, 3), atol=1e-14)


def test_balanced_factorization_through_one_hidden_unit():
    """A rank-1 P factorises through hidden = 1 (the least width Proposition 3 allows)."""
    P = np.outer([1.0, 2.0, 2.0], [3.0, 4.0])
    W1, W2 = align.balanced_factorization(P, hidden=1)
    assert W1.shape == (1, 2) and W2.shape == (3, 1)
    np.testing.assert_allclose(W2 @ W1, P, atol=1e-13)
    assert np.sum(W1 ** 2) + np.sum(W2 ** 2) == pytest.approx(2 * np.linalg.norm(P, "nuc"))
