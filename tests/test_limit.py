"""The limit experiment (beyond the paper, Section 4.4): its formulas against numerical
instances, and a quick run's record."""
import json
import math

import numpy as np
import pytest

import align
import experiments
from conftest import random_orthogonal


def balanced(P, depth, rng):
    """The balanced aligned factorisation of P (k x k): W_i = Q_i S^(1/d) Q_{i-1}^T with
    Q_0 = V, Q_d = U and random orthogonal hidden bases."""
    U, s, Vt = np.linalg.svd(P)
    bases = [Vt.T] + [random_orthogonal(rng, P.shape[0]) for _ in range(depth - 1)] + [U]
    return align.aligned_network(bases, [s ** (1 / depth)] * depth)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_the_norm_excess_is_zero_on_the_balanced_factorisation_and_positive_off_it(depth):
    """sum ||W_i||^2 = d sum sigma_k(P)^(2/d) exactly on the balanced aligned factorisation
    (align.balanced_factorization at depth 2, Proposition 3), and above it on an unbalanced
    factorisation of the same product (one layer scaled by 2, the next by 1/2) and on a
    random one."""
    rng = np.random.default_rng(depth)
    P = rng.standard_normal((5, 5))
    weights = list(align.balanced_factorization(P)) if depth == 2 else balanced(P, depth, rng)
    np.testing.assert_allclose(experiments.product(weights), P, atol=1e-12)
    assert abs(experiments.norm_excess(weights)) < 1e-14
    unbalanced = [2 * weights[0], weights[1] / 2] + weights[2:]
    assert experiments.norm_excess(unbalanced) > 0.1
    G = rng.standard_normal((5, 5))
    other = [G @ weights[0], weights[1] @ np.linalg.inv(G)] + weights[2:]
    np.testing.assert_allclose(experiments.product(other), P, atol=1e-10)
    assert experiments.norm_excess(other) > 0.1
    s = np.linalg.svd(P, compute_uv=False)          # the formula: sum of squares over d sum s^(2/d)
    assert sum(np.vdot(W, W) for W in weights) == pytest.approx(depth * np.sum(s ** (2 / depth)), rel=1e-13)


def test_restricted_measures_equal_the_full_ones_on_a_full_rank_network():
    rng = np.random.default_rng(10)
    start = [rng.standard_normal((5, 5)) for _ in range(3)]
    now = [W + 0.3 * rng.standard_normal((5, 5)) for W in start]
    got = experiments.restricted_measures(now, start, 5)
    for what in ("alignment", "invariance"):
        for how in ("paired", "matched"):
            want = align.alignment(now, how) if what == "alignment" else align.invariance(now, start, how)
            assert got[f"{what}_{how}"] == pytest.approx(want, abs=1e-12)


def test_restricted_measures_ignore_the_directions_the_product_does_not_use():
    """A 4-4-4-4 network of rank 2: aligned on the plane that carries its product; in the
    other plane W_1 = e_1 e_1^T, W_2 generic (distinct singular values, vectors turned) and
    W_3 = u v^T with v orthogonal to W_2 e_1, so that the product is 0 there.  The network is
    not aligned (W_2's vectors there are not e_1, e_2) and its full alignment is below 1;
    restricted to the product's two directions both rules give 1."""
    rng = np.random.default_rng(11)
    Q = [random_orthogonal(rng, 4) for _ in range(4)]
    turn = lambda t: np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    junk = [np.diag([1.0, 0.0]), turn(0.4) @ np.diag([2.0, 1.0]) @ turn(1.1).T]
    v = turn(np.pi / 2) @ junk[1] @ np.array([1.0, 0.0])
    junk.append(np.outer([0.6, 0.8], v / np.linalg.norm(v)))
    weights = []
    for i, (live, other) in enumerate(zip([np.diag([2.0, 1.0]), np.diag([1.5, 0.5]), np.diag([1.2, 0.7])], junk)):
        block = np.zeros((4, 4))
        block[:2, :2], block[2:, 2:] = live, other
        weights.append(Q[i + 1] @ block @ Q[i].T)
    assert np.linalg.matrix_rank(experiments.product(weights), tol=1e-10) == 2
    assert align.alignment(weights) < 0.99 and not align.is_aligned(weights)
    restricted = experiments.restricted_measures(weights, weights, 2)
    assert restricted["alignment_paired"] == pytest.approx(1.0, abs=1e-12)
    assert restricted["alignment_matched"] == pytest.approx(1.0, abs=1e-12)


def test_the_balance_defect_is_conserved_to_order_lr():
    """Gradient flow conserves W_{i+1}^T W_{i+1} - W_i W_i^T; gradient descent moves it by
    O(lr) over a fixed time: lr and lr/2 over the same time (N and 2N steps) move it by amounts
    in the ratio 2, and the change is small against the defect itself."""
    rng, X, Y = experiments.limit_data(0, "determined")
    start = experiments.torch_like_init(rng, [9, 9, 9, 9])
    before = experiments.balance_defect(start)
    changes = []
    for lr, steps in ((0.02, 200), (0.01, 400)):
        out, _ = align.train(start, X, Y, lr=lr, max_steps=steps, tol=0.0)
        changes.append(abs(experiments.balance_defect(out) - before))
    assert 1.7 < changes[0] / changes[1] < 2.3 and changes[0] < 0.05 * before


def test_the_smallest_tolerance_and_the_distance_to_proposition_3():
    """On the balanced factorisation of P: accepted at 1e-14 and at distance 0 from
    Proposition 3's set; turned by a rotation in the hidden space (still balanced, still of
    least norm: in the set, distance 0); perturbed: rejected below its off-diagonal size and
    at a positive distance."""
    rng = np.random.default_rng(12)
    P = rng.standard_normal((4, 4))
    W1, W2 = align.balanced_factorization(P)
    assert experiments.smallest_tol([W1, W2]) == 1e-14
    R = random_orthogonal(rng, 4)
    assert experiments.prop3_distance(R @ W1, W2 @ R.T) < 1e-14
    E = 1e-3 * rng.standard_normal((4, 4))
    tol = experiments.smallest_tol([W1 + E, W2])
    assert 1e-5 < tol < 1e-1 and align.is_aligned([W1 + E, W2], tol) and not align.is_aligned([W1 + E, W2], tol / 2)
    assert 1e-5 < experiments.prop3_distance(W1 + E, W2) < 1e-2


def test_a_quick_run_records_every_quantity_and_finite_exponents(tmp_path):
    """limit --quick with one seed: every run converged, its record has the measures, the
    restricted measures, the norm excess, the balance defect at the start and the end,
    is_aligned's answer, the smallest accepted tol and (depth 2) the distance to Proposition
    3; the findings' exponents are finite where two scales could be fitted."""
    assert experiments.main(["limit", "--quick", "--seeds", "1", "--out", str(tmp_path), "-q"]) == 0
    result = json.loads((tmp_path / "limit-quick.json").read_text())
    assert result["runs"] and not result["findings"]["not_converged"]
    for name, run in result["runs"].items():
        assert run["stop_reason"] == "tol" and run["final_step"] > 0
        assert set(run["measurements"]) == set(align.MEASURE_KEYS)
        assert set(run["restricted"]) == set(align.MEASURE_KEYS)
        for key in ("norm_excess", "balance_start", "balance_end", "smallest_tol", "is_aligned"):
            assert key in run, (name, key)
        assert ("prop3_distance" in run) == (run["depth"] == 2)
    fitted = [v for regime in result["findings"]["exponent"].values() for depth in regime.values()
              for v in depth.values() if v]
    assert fitted and all(math.isfinite(v[k]) for v in fitted for k in ("mean", "min", "max"))
    determined = result["findings"]["exponent"]["determined"]["depth=2"]
    assert determined["1 - alignment_paired"]["mean"] > 3                # s^4 (README)
    assert (tmp_path / "limit-quick.png").exists() and (tmp_path / "limit-quick.csv").exists()
