"""Reproduce the experiments of "On Alignment in Deep Linear Neural Networks".

    python experiments.py list            # what there is
    python experiments.py fig1a           # one experiment -> results/fig1a.{json,csv,png}
    python experiments.py all --quick     # every experiment, a few hundred steps each

Set-ups follow Appendix L of the paper and the authors' code (plain full-batch
gradient descent, lr 1e-2, until the loss is below 1e-4, measuring every 100
steps).  Alignment and invariance are reported by both rules of align.py:
"paired" (the paper's, made exact) and "matched" (the authors' code).  Each
experiment is a function of its settings ``cfg`` that trains its runs into
``runs`` (runner.py keeps their records, also of an interrupted run) and returns
the paper's claim with its verdict; runner.py runs the command line.
"""
import math
import sys
import time

import numpy as np

import align
import outputs
import runner
import structured as st
import verify
from runner import Experiment, Problem, descend, seeds, train_dense, train_problems, \
    train_structured, verdict

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081           # of the training pixels scaled to [0, 1]


def mnist_data(cfg, n):
    """X (784 x n): the first n training images scaled to [0, 1] and normalised (Appendix
    L, the authors' code), one per column; their labels (n,)."""
    images, labels = runner.first_images(cfg, n)
    X = (images.reshape(n, -1).T / 255.0 - MNIST_MEAN) / MNIST_STD
    return X, labels.astype(np.int64)


def loss_kind(cfg, squared=True):
    """The loss for --loss-scale: "mse_mean" (the authors' code) or "mse" (Eq. (2))."""
    if not squared:
        return "ce"
    return "mse_mean" if cfg.loss_scale == "mean" else "mse"


def torch_like_init(rng, widths):
    """PyTorch's default Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return [rng.uniform(-1, 1, (widths[i + 1], widths[i])) / math.sqrt(widths[i])
            for i in range(len(widths) - 1)]


def scaled(weights, scale):
    """The weights times --init-scale (a sweep parameter; unchanged when not given)."""
    return weights if scale is None else [scale * W for W in weights]


# ---------------------------------------------------- Figure 1: fully connected --
def fig1a_problems(cfg):
    """Fig. 1a's networks: depth 3 (sweeps: depth, width of the hidden layers, n, init_scale,
    lr), X and Y 9 x n standard normal, aligned start from their singular vectors."""
    depth, width, n = cfg.depth or 3, cfg.width or 9, cfg.n or 9
    widths = [9] + [width] * (depth - 1) + [9]
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        X, Y = rng.standard_normal((9, n)), rng.standard_normal((9, n))
        if cfg.init == "aligned":
            weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=seed)
        else:
            weights = torch_like_init(rng, widths)
        yield Problem(f"seed={seed}", scaled(weights, cfg.init_scale), X, Y, cfg.lr, loss_kind(cfg))


def fig1a(cfg, runs):
    """Figure 1a: 3 layers 9x9, X, Y 9x9 standard normal, aligned start; Theorem 1's
    condition fails, so alignment is not kept.  --seeds N trains the N networks as one batch."""
    train_problems(cfg, runs, "fig1a", fig1a_problems(cfg))
    return claim_leaves_one(runs)


def _fig1_mnist(cfg, runs, name, squared):
    X, labels = mnist_data(cfg, 256)
    Y = np.eye(10)[:, labels]
    widths = [784, 1024, 64, 10]
    for seed in seeds(cfg):
        if cfg.init == "aligned":      # W1 = D1 U_X^T, W2 = D2, W3 = U_Y D3, D_i ~ U(0, 1)
            weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=seed)
        else:
            weights = torch_like_init(np.random.default_rng(seed), widths)
        train_dense(cfg, runs, f"seed={seed}", weights, X, Y if squared else labels,
                    loss_kind(cfg, squared))
    return claim_leaves_one(runs)


def fig1b(cfg, runs):
    """Figure 1b: 784-1024-64-10 on 256 MNIST images, squared loss, aligned start."""
    return _fig1_mnist(cfg, runs, "fig1b", squared=True)


def fig1c(cfg, runs):
    """Figure 1c: as 1b with the cross-entropy loss."""
    return _fig1_mnist(cfg, runs, "fig1c", squared=False)


# ------------------------------------------------- Figure 2: structured layers --
def symmetric_toeplitz_coefficients(rng, k):
    """Coefficients (offsets -(k-1)..k-1) of a random symmetric Toeplitz matrix."""
    half = rng.uniform(0, 1, k)
    return np.concatenate([half[:0:-1], half])


def fig2a(cfg, runs):
    """Figure 2a: three 4x4 Toeplitz layers (r = 7) factorising a 4x4 Gaussian matrix (X = I).
    Aligned start: every layer the same symmetric Toeplitz matrix."""
    S = st.toeplitz(4)
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        Y = rng.standard_normal((4, 4))
        if cfg.init == "aligned":
            params = [symmetric_toeplitz_coefficients(rng, 4)] * 3
        else:
            params = [rng.uniform(-0.5, 0.5, S.r) for _ in range(3)]
        train_structured(cfg, runs, f"seed={seed}", [S] * 3, params, np.eye(4), Y, loss_kind(cfg))
    return claim_leaves_one(runs)


def symmetric_filter(rng, s):
    """A random s x s filter equal to its 180-degree rotation: a symmetric conv matrix."""
    c = rng.uniform(-1, 1, (s, s)) / s
    return ((c + c[::-1, ::-1]) / 2).ravel()


def fig2b(cfg, runs):
    """Figure 2b: three 3x3 convolutional layers (28x28, stride 1, padding 1) autoencoding
    one MNIST image.  Aligned start: every layer the same symmetric filter."""
    X, _ = mnist_data(cfg, 1)
    S = st.conv2d(28, 3)
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        if cfg.init == "aligned":
            params = [symmetric_filter(rng, 3)] * 3
        else:                          # PyTorch's Conv2d default: U(-1/3, 1/3)
            params = [rng.uniform(-1, 1, 9) / 3 for _ in range(3)]
        train_structured(cfg, runs, f"seed={seed}", [S] * 3, params, X, X, loss_kind(cfg))
    return claim_leaves_one(runs)


# -------------------------------------------- Section 4: the positive cases --
def away_from_zero(rng, k, d=3):
    """Initial singular values from U(0.5, 1).  The aligned set is invariant (Theorem 1) but
    not attracting: near a zero singular value, rounding errors off it grow by orders of
    magnitude (seen with U(0, 1) starts), so the positive cases start away from zero."""
    return [rng.uniform(0.5, 1.0, k) for _ in range(d)]


def sensing(cfg, runs, name, rng, k):
    """Matrix sensing with M_i = U Lambda_i V^T (Section 4.2) from an aligned start:
    L = 1/(2n) sum_i (y_i - <M_i, W_d ... W_1>)^2 with n = 2k measurements."""
    U, V = np.linalg.qr(rng.standard_normal((k, k)))[0], np.linalg.qr(rng.standard_normal((k, k)))[0]
    n = 2 * k
    Ms = np.stack([U @ np.diag(rng.standard_normal(k)) @ V.T for _ in range(n)])
    target = U @ np.diag(rng.uniform(0.5, 2.0, k)) @ V.T   # positive: no singular value crosses 0
    y = np.einsum("nij,ij->n", Ms, target)
    weights = runner.to_device(cfg, *align.aligned_init(U, V, [k] * 4, sigmas=away_from_zero(rng, k)))
    Ms_d, y_d, eye = runner.to_device(cfg, Ms, y, np.eye(k))

    def loss_and_grads(ws):
        r = y_d - (Ms_d * align.forward(ws, eye)).sum((1, 2))
        return (r * r).sum() / (2 * n), align.layer_gradients(ws, eye, -cfg.xp.tensordot(r, Ms_d, 1) / n)
    descend(cfg, runs, name, weights, loss_and_grads)


def thm1(cfg, runs):
    """Theorem 1's positive cases: autoencoding, matrix factorisation and matrix sensing
    (9x9, 3 layers) from an aligned start on certified data: alignment and invariance stay 1."""
    k = 9
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        data = {"autoencoding": (lambda X: (X, X))(rng.standard_normal((k, 2 * k)) / math.sqrt(2)),
                "factorisation": (np.eye(k), rng.standard_normal((k, k)))}
        for task, (X, Y) in data.items():
            cert = align.invariance_certificate(X, Y, [k] * 4)
            weights = align.aligned_init(cert.U, cert.V, [k] * 4, sigmas=away_from_zero(rng, k))
            train_dense(cfg, runs, f"{task} seed={seed}", weights, X, Y, loss_kind(cfg),
                        extra={"certificate_residual": cert.residual})
        sensing(cfg, runs, f"sensing seed={seed}", rng, k)
    return claim_stays_one(runs, cfg)


def prop1(cfg, runs):
    """Proposition 1: binary MNIST (digit < 5 -> +1, else -1), widths 784-4-1, rank-1 aligned
    start; squared and logistic loss keep the network aligned."""
    X, labels = mnist_data(cfg, 256)
    y = np.where(labels < 5, 1.0, -1.0)[None, :]
    v = np.linalg.svd(X)[0][:, 0]
    for seed in seeds(cfg):
        sigma = np.random.default_rng(seed).uniform(0.5, 1.0)
        weights = [sigma * np.outer(np.eye(4)[0], v), sigma * np.eye(4)[:1]]
        for kind in ("mse", "logistic"):
            train_dense(cfg, runs, f"{kind} seed={seed}", weights, X, y, kind)
    return claim_stays_one(runs, cfg, what=("alignment_paired",))


def cor1(cfg, runs):
    """Corollary 1: the per-singular-value recursion against full GD from an aligned start
    on certified data (autoencoder of width 9, 3 layers, float64)."""
    k, d, worst = 9, 3, 0.0
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((k, 2 * k)) / math.sqrt(2)
        cert = align.invariance_certificate(X, X, [k] * (d + 1))
        sig0 = [rng.uniform(0.2, 1.0, k) for _ in range(d)]
        weights = align.aligned_init(cert.U, cert.V, [k] * (d + 1), sigmas=sig0)
        bases = [cert.V] + [np.eye(k)] * (d - 1) + [cert.U]

        def sigmas(ws, _):
            return {"sigma": [(bases[i + 1].T @ align.to_numpy(W) @ bases[i]).diagonal().tolist()
                              for i, W in enumerate(ws)]}
        _, record = train_dense(cfg, runs, f"seed={seed}", weights, X, X, loss_kind(cfg),
                                measures={"s": sigmas}, dtype=np.float64)
        steps = record["measure_steps"]
        t0 = time.perf_counter()
        traj = cfg.lib.singular_value_dynamics(np.array(sig0), cert.lam, cert.lam_prime, cfg.lr,
                                               X.shape[1], steps[-1], kind=loss_kind(cfg), kd=k)
        reduced = traj[steps]
        diff = float(np.abs(reduced - np.array(record["measurements"]["sigma"])).max()
                     / np.abs(np.array(record["measurements"]["sigma"])).max())
        worst = max(worst, diff)
        record.update(reduced_sigma=reduced.tolist(), max_relative_difference=diff,
                      reduced_wall_time=time.perf_counter() - t0)
    return verdict("Corollary 1's recursion gives full GD's singular values", worst, worst < 1e-10)


# ------------------------------------------------ Section 5: Theorem 3's claim --
def thm3(cfg, runs):
    """Theorem 3: a 3x3-convolutional network on 6x6 images (k = 36, r = 9 < k - 1) trained to
    near-zero loss on realisable generic data (n = 40 >= k) ends not aligned."""
    S = st.conv2d(6, 3)
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        teacher = [symmetric_filter(rng, 3) + rng.standard_normal(9) * 0.3 + np.eye(9)[4] for _ in range(2)]
        X = rng.standard_normal((36, 40)) / 6
        mats = st.layer_matrices([S, S], teacher)
        Y = mats[1] @ mats[0] @ X
        start = [t + 0.1 * rng.standard_normal(9) for t in teacher]
        out, record = train_structured(cfg, runs, f"seed={seed}", [S, S], start, X, Y, "mse")
        test = align.is_aligned(st.layer_matrices([S, S], [align.to_numpy(p) for p in out]), tol=1e-6)
        record.update(is_aligned=bool(test), aligned_residual=test.residual)
    final = max(r["measurements"]["alignment_paired"][-1] for r in runs.values())
    holds = all(not r["is_aligned"] for r in runs.values()) and final < 0.99
    interpolated = all(r["stop_reason"] == "tol" for r in runs.values())
    return verdict("the interpolating structured network is not aligned (Theorem 3)", final, holds,
                   None if interpolated else f"its premise failed: training stopped above the loss "
                   f"threshold {cfg.tol:g} (raise --max-steps)")


# ------------------------------------------- beyond the paper: stability --
STABILITY_EPS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
STABILITY_DEPTHS = (2, 3, 4)
FIT_UP_TO = 1e-4            # exponents are fitted over 0 < eps <= this (before saturation)
DEPARTURE_FLOOR = 1e-13     # departures below this are rounding, left out of the fits


def certified_data(seed, widths, n):
    """(start, X_0, Y_0, G_1, G_2): data meeting Theorem 1's condition, X_0 = sqrt(n) V D_x Q^T
    and Y_0 = sqrt(n) U D_y Q^T (D from U(1, 2)), the aligned start (Lemma 2) from their
    certificate with singular values from U(0.5, 1), and the directions G (standard normal)
    in which :func:`perturbed` moves the data."""
    rng = np.random.default_rng(seed)
    k0, kd = widths[0], widths[-1]
    V, U, Q = verify.orthogonal(rng, k0), verify.orthogonal(rng, kd), verify.orthogonal(rng, n)
    X0 = math.sqrt(n) * V @ align.rect_diag(rng.uniform(1, 2, min(k0, n)), k0, n) @ Q.T
    Y0 = math.sqrt(n) * U @ align.rect_diag(rng.uniform(1, 2, min(kd, n)), kd, n) @ Q.T
    G1, G2 = rng.standard_normal(X0.shape), rng.standard_normal(Y0.shape)
    cert = align.invariance_certificate(X0, Y0, widths)
    sigmas = [rng.uniform(0.5, 1.0, min(a, b)) for a, b in zip(widths, widths[1:])]
    return align.aligned_init(cert.U, cert.V, widths, sigmas=sigmas), X0, Y0, G1, G2


def perturbed(data, eps):
    """(start, X, Y) at distance eps: X_0 + eps ||X_0|| G_1 / ||G_1||, Y_0 likewise."""
    start, X0, Y0, G1, G2 = data
    return (start, X0 + eps * np.linalg.norm(X0) / np.linalg.norm(G1) * G1,
            Y0 + eps * np.linalg.norm(Y0) / np.linalg.norm(G2) * G2)


def near_certified(seed, widths, n, eps):
    """(start, X, Y): :func:`certified_data` of the seed moved by eps (:func:`perturbed`)."""
    return perturbed(certified_data(seed, widths, n), eps)


def stability_problems(cfg):
    """The stability networks: depths 2, 3, 4 (widths 9, hidden --width), 9 x n data (n = 9)
    at each eps of STABILITY_EPS, each seed; a sweep may fix depth and eps.  Each eps is a
    batch of its own: small eps converge in ~100 steps, eps = 1 may take 50,000."""
    width, n = cfg.width or 9, cfg.n or 9
    for depth in (cfg.depth,) if cfg.depth else STABILITY_DEPTHS:
        widths = [9] + [width] * (depth - 1) + [9]
        data = {seed: certified_data(seed, widths, n) for seed in seeds(cfg)}     # once per seed
        for eps in (cfg.eps,) if cfg.eps is not None else STABILITY_EPS:
            for seed in seeds(cfg):
                start, X, Y = perturbed(data[seed], eps)
                yield Problem(f"depth={depth} eps={eps:g} seed={seed}", scaled(start, cfg.init_scale),
                              X, Y, cfg.lr, loss_kind(cfg), {"depth": depth, "eps": eps, "seed": seed},
                              group=eps)


def departures(run):
    """1 - each measure at the end, and its largest value over training (1 - the least)."""
    m = run["measurements"]
    return {"final_departure": {k: 1 - v[-1] for k, v in m.items()},
            "largest_departure": {k: 1 - min(v) for k, v in m.items()}}


def stability(cfg, runs):
    """Beyond the paper: how fragile is alignment?  Data at distance eps from Theorem 1's
    condition, aligned start from the unperturbed data's certificate, trained to the
    threshold; 1 - alignment and 1 - invariance against eps, depths 2, 3, 4."""
    train_problems(cfg, runs, "stability", stability_problems(cfg))
    for run in runs.values():
        run.update(departures(run))
    exact = [r for r in runs.values() if r["eps"] == 0]
    eps = 1e-8 if cfg.dtype == np.float64 else 1e-4
    worst = max((max(r["largest_departure"].values()) for r in exact), default=None)
    return verdict(f"at eps = 0 (Theorem 1's condition met) both measures stay 1 to {eps:g} "
                   "under both rules", worst, worst is not None and worst <= eps,
                   None if exact else "no run at eps = 0")


def fitted_slope(eps, values, up_to=FIT_UP_TO, floor=DEPARTURE_FLOOR):
    """The least-squares slope of log10(values) against log10(eps) over the points with
    0 < eps <= up_to and values above floor; None with fewer than 2."""
    points = [(math.log10(e), math.log10(v)) for e, v in zip(eps, values)
              if 0 < e <= up_to and v > floor]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def spread_of_slopes(chosen, x, field, key, **fit):
    """fitted_slope of each seed's ``field`` (a measure ``key``, or None for the field itself)
    against the run field ``x``: the mean, min and max over seeds (None when no seed has two
    points to fit)."""
    slopes = []
    for seed in sorted({r["seed"] for r in chosen}):
        mine = sorted((r[x], r[field] if key is None else r[field][key]) for r in chosen
                      if r["seed"] == seed)
        slope = fitted_slope(*zip(*mine), **fit)
        if slope is not None:
            slopes.append(slope)
    return {"mean": float(np.mean(slopes)), "min": min(slopes), "max": max(slopes),
            "seeds": len(slopes)} if slopes else None


def stability_findings(runs):
    """Per depth and measure: the exponent p of 1 - measure ~ eps^p, for the value at the end
    ("final") and the largest departure during training ("largest"), fitted per seed; the
    mean, min and max over seeds."""
    out = {}
    for depth in sorted({r["depth"] for r in runs.values()}):
        chosen = [r for r in runs.values() if r["depth"] == depth]
        out[f"depth={depth}"] = {key: {which: spread_of_slopes(chosen, "eps", f"{which}_departure", key)
                                       for which in ("final", "largest")}
                                 for key in align.MEASURE_KEYS}
    return {"exponent": out, "fitted_over": f"0 < eps <= {FIT_UP_TO:g}, departures above "
                                             f"{DEPARTURE_FLOOR:g}"}


# ------------------------------- beyond the paper: the limit of small starts (Section 4.4) --
LIMIT_N = {"determined": 9, "underdetermined": 5}          # samples n (9 x n data)
LIMIT_SCALES = {                     # the scales s of the start, as small as the budget converges
    ("determined", 2): (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4),
    ("determined", 3): (1.0, 0.3, 0.1, 0.03),
    ("determined", 4): (1.0, 0.5, 0.3, 0.2),
    ("underdetermined", 2): (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4),
    ("underdetermined", 3): (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3),
    ("underdetermined", 4): (1.0, 0.5, 0.3, 0.1, 0.05)}
LIMIT_QUICK_SCALES = {2: (1.0, 0.3, 0.1), 3: (1.0, 0.3, 0.1), 4: (1.0, 0.7, 0.5)}
LIMIT_STEP = {2: 0.1, 3: 1.0, 4: 1.0}  # lr = this / (sharpness at the limit); twice for n < k0,
LIMIT_UNDER = 2.0                      # where the bound exceeds the sharpness 2-4 times (measured)
LIMIT_FLOW = 2.0            # fits use runs whose balance defect ended within this factor of its start


def limit_data(seed, regime):
    """(rng, X, Y) of a seed: 9 x n standard normal, n = 9 (determined: X whitened to
    X X^T = 9 I, so that every seed converges at depths 3 and 4) or n = 5 (underdetermined)."""
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((9, LIMIT_N[regime])), rng.standard_normal((9, LIMIT_N[regime]))
    if regime == "determined":
        q, r = np.linalg.qr(X)
        X = 3.0 * q * np.sign(np.diagonal(r))
    return rng, X, Y


def sharpness(X, Y, depth):
    """The Gauss-Newton bound on the sharpness of Eq. (2)'s loss at the balanced factorisation
    of P = Y X^+: lambda_max(X X^T) / n * d * sigma_max(P)^(2(d-1)/d); Proposition 2's rate at
    the limit is ln 2 over it."""
    P = Y @ np.linalg.pinv(X)
    return np.linalg.eigvalsh(X @ X.T)[-1] / X.shape[1] * depth * \
        np.linalg.norm(P, 2) ** (2 * (depth - 1) / depth)


def limit_problems(cfg):
    """The limit networks: both regimes, depths 2-4 (widths 9, hidden --width), the torch-like
    start of each seed scaled by each s (a sweep may fix depth and init_scale); each (regime,
    depth, s) is a batch of the seeds, one rate each."""
    width = cfg.width or 9
    for regime in LIMIT_N:
        for depth in (cfg.depth,) if cfg.depth else (2, 3, 4):
            widths = [9] + [width] * (depth - 1) + [9]
            scales = (cfg.init_scale,) if cfg.init_scale else \
                LIMIT_QUICK_SCALES[depth] if cfg.quick else LIMIT_SCALES[regime, depth]
            for seed in seeds(cfg):
                rng, X, Y = limit_data(seed, regime)
                start, r = torch_like_init(rng, widths), int(np.linalg.matrix_rank(Y @ np.linalg.pinv(X)))
                lr = cfg.lr or LIMIT_STEP[depth] * (LIMIT_UNDER if regime == "underdetermined" else 1) \
                    / sharpness(X, Y, depth)
                for s in scales:
                    yield Problem(f"{regime} depth={depth} s={s:g} seed={seed}", [s * W for W in start],
                                  X, Y, lr, "mse", {"regime": regime, "depth": depth,
                                                    "init_scale": s, "seed": seed, "rank": r},
                                  group=(regime, depth, s), after=lambda ws, w0, r=r: limit_end(ws, w0, r))


def limit_end(weights, start, r):
    """What a run of limit records at its end besides the measures: Section 6's measures
    restricted to the r directions of the data's product, the norm excess, the balance
    defect at the start and the end, is_aligned's answer and the smallest tol it accepts,
    and (depth 2) the distance to Proposition 3's factorisations."""
    out = {"restricted": restricted_measures(weights, start, r), "norm_excess": norm_excess(weights),
           "balance_start": balance_defect(start), "balance_end": balance_defect(weights),
           "is_aligned": bool(align.is_aligned(weights)), "smallest_tol": smallest_tol(weights)}
    return out | ({"prop3_distance": prop3_distance(*weights)} if len(weights) == 2 else {})


def product(weights):
    P = weights[0]
    for W in weights[1:]:
        P = W @ P
    return P


def norm_excess(weights):
    """sum_i ||W_i||_F^2 / (d sum_k sigma_k(P)^(2/d)) - 1 for P = W_d ... W_1: the least
    sum over factorisations of P is d sum_k sigma_k(P)^(2/d) (AM-GM for each k with Horn's
    inequality; Proposition 3's 2 ||P||_* for d = 2), taken by the balanced aligned ones, so
    the excess is 0 exactly there.  Singular values at rounding level count as zero."""
    s = np.linalg.svd(product(weights), compute_uv=False)
    s = np.where(s > s[0] * max(product(weights).shape) * np.finfo(float).eps, s, 0.0)
    return sum(float(np.vdot(W, W)) for W in weights) / (len(weights) * float(np.sum(s ** (2 / len(weights))))) - 1


def balance_defect(weights):
    """max_i ||W_{i+1}^T W_{i+1} - W_i W_i^T||_F, conserved by gradient flow (Section 4.4)."""
    return max(float(np.linalg.norm(B.T @ B - A @ A.T)) for A, B in zip(weights, weights[1:]))


def restricted_measures(weights, start, r):
    """Alignment and invariance (both rules) of the network restricted to the r directions
    that carry its product: B_0 = V_r and B_d = U_r of P = U S V^T, hidden B_i the range of
    W_i ... W_1 V_r; the r x r network B_i^T W_i B_{i-1} (and the start with the same bases)
    measured.  Definition 2 leaves singular vectors of zero singular values free: these
    measures do not see them; with r the full width they are the full measures."""
    U, _, Vt = np.linalg.svd(product(weights))
    bases, image = [Vt[:r].T], Vt[:r].T
    for W in weights[:-1]:
        image = W @ image
        bases.append(np.linalg.svd(image, full_matrices=False)[0][:, :r])
    bases.append(U[:, :r])
    inner = lambda ws: [bases[i + 1].T @ W @ bases[i] for i, W in enumerate(ws)]
    return {f"{what}_{how}": float(align.alignment(inner(weights), how) if what == "alignment" else
                                   align.invariance(inner(weights), inner(start), how))
            for what in ("alignment", "invariance") for how in ("paired", "matched")}


def smallest_tol(weights, low=-14.0, steps=12):
    """The smallest tol at which is_aligned accepts (bisection in log10 tol over [1e-14, 1), to
    0.004 of a decade);
    None when it rejects at 1 (acceptance grows with tol: checked on the trained networks)."""
    high = math.log10(1 - 1e-12)
    if not align.is_aligned(weights, 10 ** high):
        return None
    if align.is_aligned(weights, 10 ** low):
        return 10 ** low
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if align.is_aligned(weights, 10 ** middle) else (middle, high)
    return 10 ** high


def prop3_distance(W1, W2):
    """The distance of (W_1, W_2) to the nearest balanced minimum-norm factorisation of its
    product, relative to its norm: Proposition 3's (W S V^T, U S' W^T) over orthogonal W
    (align.balanced_factorization), the best W by Procrustes: W = B A^T for
    S V^T W_1^T + S'^T U^T W_2 = A G B^T."""
    P, hidden = W2 @ W1, W1.shape[0]
    C1, C2 = align.balanced_factorization(P, hidden)                 # W = I: S V^T and U S'
    A, _, Bt = np.linalg.svd(C1 @ W1.T + C2.T @ W2)
    D1, D2 = align.balanced_factorization(P, hidden, Bt.T @ A.T)
    return math.sqrt((np.vdot(W1 - D1, W1 - D1) + np.vdot(W2 - D2, W2 - D2)) /
                     (np.vdot(W1, W1) + np.vdot(W2, W2)))


def limit_quantities(run):
    """The quantities fitted against s: 1 - each measure (full and restricted), the norm
    excess, the balance defect at the end, the smallest tol, the distance to Proposition 3."""
    final = {f"1 - {k}": 1 - v[-1] for k, v in run["measurements"].items()}
    return final | {f"1 - restricted {k}": 1 - v for k, v in run["restricted"].items()} | {
        k: run[k] for k in ("norm_excess", "balance_end", "smallest_tol", "prop3_distance") if k in run}


def limit(cfg, runs):
    """Beyond the paper: does training from near zero end aligned?  Section 4.4 expects a
    small start to end close to the minimum-norm solution and so to an aligned one: random
    starts scaled by s, depths 2-4, determined and underdetermined data, trained to a loss of
    1e-10; how close to aligned at the end, against s."""
    train_problems(cfg, runs, "limit", limit_problems(cfg))
    for run in runs.values():
        run["quantities"] = limit_quantities(run)
    findings = limit_findings(runs)
    exponents = [f["1 - restricted alignment_paired"]["mean"] for regime in findings["exponent"].values()
                 for f in regime.values() if f.get("1 - restricted alignment_paired")]
    return verdict("the smaller the start, the closer to aligned (1 - restricted alignment ~ s^p, p > 0 "
                   "at every depth and regime)", min(exponents, default=None),
                   bool(exponents) and min(exponents) > 0,
                   None if exponents else "no depth had converged runs at two scales below 1")


def limit_findings(runs):
    """Per regime and depth: the exponent p of each quantity ~ s^p, fitted per seed over the
    converged runs with s < 1 whose balance defect ended within LIMIT_FLOW of its start (the
    gradient-flow range; below it gradient descent's own drift sets a floor), with its mean,
    min and max over seeds; and every run that did not converge."""
    converged = [r for r in runs.values() if r["stop_reason"] == "tol"]
    flow = [r | r["quantities"] for r in converged if r["balance_end"] <= LIMIT_FLOW * r["balance_start"]]
    out = {}
    for regime in sorted({r["regime"] for r in converged}):
        for depth in sorted({r["depth"] for r in converged if r["regime"] == regime}):
            chosen = [r for r in flow if r["regime"] == regime and r["depth"] == depth]
            keys = sorted({k for r in chosen for k in r["quantities"]})
            out.setdefault(regime, {})[f"depth={depth}"] = {
                k: spread_of_slopes([r for r in chosen if r.get(k) is not None], "init_scale", k, None,
                                    up_to=0.99, floor=1e-15) for k in keys}
    return {"exponent": out, "not_converged": sorted(n for n, r in runs.items() if r["stop_reason"] != "tol"),
            "fitted_over": f"s < 1, converged runs whose balance defect ended within {LIMIT_FLOW:g}x "
                           "its start, values above 1e-15"}


# ------------------------------------------------------------------------ claims --
def claim_leaves_one(runs):
    """Definition 3 fails: in every run the paired alignment or invariance leaves 1."""
    lowest = max(min(r["measurements"]["alignment_paired"] + r["measurements"]["invariance_paired"])
                 for r in runs.values())
    return verdict("alignment is not an invariant: paired alignment or invariance falls below 0.99",
                   lowest, lowest < 0.99)


def claim_stays_one(runs, cfg, what=("alignment_paired", "invariance_paired")):
    """Theorem 1 / Proposition 1: the measures stay at 1 to rounding (1e-8 in float64)."""
    eps = 1e-8 if cfg.dtype == np.float64 else 1e-4
    lowest = min(min(r["measurements"][m]) for r in runs.values() for m in what)
    return verdict(f"{' and '.join(what)} stay above 1 - {eps:g}", lowest, lowest > 1 - eps)


EXPERIMENTS = {
    "fig1a": Experiment(fig1a, "Fig. 1a, Theorem 1", np.float64, gpu_from_seeds=100,
                        options=("init", "loss_scale"), problems=fig1a_problems,
                        sweeps=("lr", "depth", "width", "n", "init_scale")),
    "fig1b": Experiment(fig1b, "Fig. 1b, Theorem 4", np.float32, gpu_from_seeds=1,
                        options=("init", "mnist", "loss_scale")),
    "fig1c": Experiment(fig1c, "Fig. 1c, cross-entropy", np.float32, gpu_from_seeds=1,
                        options=("init", "mnist")),
    "fig2a": Experiment(fig2a, "Fig. 2a, Theorem 2-3", np.float64, options=("init", "loss_scale")),
    "fig2b": Experiment(fig2b, "Fig. 2b, Theorem 3", np.float32, gpu_from_seeds=1,
                        options=("init", "mnist", "loss_scale")),
    "thm1": Experiment(thm1, "Theorem 1, Section 4.2", np.float64, options=("loss_scale",),
                       runs_per_seed=3),
    "prop1": Experiment(prop1, "Proposition 1", np.float64, lr=1e-3, options=("mnist",),
                        runs_per_seed=2),
    "cor1": Experiment(cor1, "Corollary 1", np.float64, options=("loss_scale",)),
    "thm3": Experiment(thm3, "Theorem 3, Proposition 5", np.float64, lr=1e-1, tol=1e-10),
    "stability": Experiment(stability, "beyond the paper", np.float64, lr=5e-2, options=("loss_scale",),
                            runs_per_seed=len(STABILITY_EPS) * len(STABILITY_DEPTHS), measure_every=10,
                            problems=stability_problems, figure=outputs.stability_figure,
                            findings=stability_findings,
                            sweeps=("lr", "depth", "width", "n", "init_scale", "eps")),
    "limit": Experiment(limit, "beyond the paper", np.float64, lr=None, tol=1e-10, seeds=5,
                        max_steps=550_000, quick_steps=60_000, measure_every=10 ** 6, loss_every=1000,
                        problems=limit_problems, figure=outputs.limit_figure,
                        findings=limit_findings, sweeps=("depth", "width", "init_scale"),
                        runs_per_seed=sum(map(len, LIMIT_SCALES.values()))),
}


def main(argv=None):
    """The command line (runner.main with this table); the exit status."""
    return runner.main(sys.argv[1:] if argv is None else argv, EXPERIMENTS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
