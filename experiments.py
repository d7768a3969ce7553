"""Reproduce the experiments of "On Alignment in Deep Linear Neural Networks".

    python experiments.py list            # what there is
    python experiments.py fig1a           # one experiment -> results/fig1a.{json,csv,png}
    python experiments.py all --quick     # every experiment, a few hundred steps each

Set-ups follow Appendix L of the paper and the authors' code (plain full-batch
gradient descent, lr 1e-2, until the loss is below 1e-4, measuring every 100
steps).  Alignment and invariance are reported by both rules of align.py:
"paired" (the paper's, made exact) and "matched" (the authors' code).
"""
import argparse
import configparser
import contextlib
import dataclasses
import gzip
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import struct
import sys
import textwrap
import threading
import time

import numpy as np

import align
import align_fast
import outputs
import structured as st
import sweeps
import verify
from outputs import ExperimentError

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
SUBSET_FILES = {"images": "mnist-train-images-1024-idx3-ubyte.gz",
                "labels": "mnist-train-labels-1024-idx1-ubyte.gz"}
MNIST_FILES = {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081           # of the training pixels scaled to [0, 1]
IDX_NDIM = {2049: 1, 2051: 3}                    # idx magic numbers: labels, images
QUICK_STEPS, QUICK_MEASURE = 300, 50
PROGRESS_EVERY = 2.0                             # seconds between progress lines
DEVICES = ("cpu", "gpu", "auto")


class DeviceError(RuntimeError):
    """The requested device (GPU through CuPy) cannot be used."""


def select_device(device="auto", quiet=False):
    """Array module for ``device`` in {"cpu", "gpu", "auto"}.

    "gpu" raises DeviceError naming what is missing; "auto" falls back to NumPy
    with a one-line notice on stderr (unless ``quiet``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("CuPy is installed but sees no CUDA GPU")
        cupy.zeros(1).sum()  # a kernel really runs
        return cupy
    except Exception as exc:  # ImportError, CUDA driver errors, DeviceError
        reason = ("CuPy is not installed: pip install '.[gpu]' (or cupy-cuda12x / "
                  "cupy-cuda13x matching your CUDA)") if isinstance(exc, ImportError) \
            else f"no usable GPU ({exc})"
        if device == "gpu":
            raise DeviceError(f"--device gpu needs CuPy and a CUDA GPU: {reason}") from exc
        if not quiet:
            print(f"note: running on the CPU with NumPy ({reason.split(':')[0]})",
                  file=sys.stderr)
        return np


# ----------------------------------------------------------------- MNIST --

def read_idx(path):
    """An idx file (raw or gzip) as a uint8 array; checks the magic number and the size."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ExperimentError(f"cannot read {path}: {exc.strerror}") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ExperimentError(f"{path} is a corrupt gzip file ({exc})") from exc
    magic = struct.unpack(">i", data[:4])[0] if len(data) >= 4 else None
    if magic not in IDX_NDIM:
        raise ExperimentError(f"{path} is not an MNIST idx file (magic number {magic}, "
                              f"expected 2051 for images or 2049 for labels)")
    ndim = IDX_NDIM[magic]
    if len(data) < 4 + 4 * ndim:
        raise ExperimentError(f"{path} is truncated: its header needs {4 + 4 * ndim} bytes, the "
                              f"file holds {len(data)}")
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    if len(payload) != math.prod(shape):
        raise ExperimentError(f"{path} is truncated or padded: header says {shape} "
                              f"({math.prod(shape)} bytes), file holds {len(payload)}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def idx_bytes(array):
    """The idx encoding of a uint8 array of 1 (labels) or 3 (images) dimensions."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    return struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _find(directory, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise ExperimentError(f"--mnist {directory}: no {name} or {name}.gz there; point --mnist at "
                          f"the folder holding the original MNIST training files")


def mnist_paths(directory=None):
    """{"images": path, "labels": path} in --mnist DIR, or of the shipped subset."""
    if directory is None:
        return {k: os.path.join(DATA_DIR, v) for k, v in SUBSET_FILES.items()}
    if not os.path.isdir(directory):
        raise ExperimentError(f"--mnist {directory}: no such directory")
    return {k: _find(directory, v) for k, v in MNIST_FILES.items()}


def load_mnist(directory=None):
    """(images N x 28 x 28, labels N in 0..9) from --mnist DIR, or the shipped subset."""
    paths = mnist_paths(directory)
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ExperimentError(f"MNIST images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() > 9:
        raise ExperimentError(f"{paths['labels']}: labels must be digits 0..9, found {labels.max()}")
    return images, labels


def mnist_data(cfg, n):
    """X (784 x n): the first n training images, scaled to [0, 1] and normalised; labels (n,)."""
    images, labels = load_mnist(cfg.mnist)
    if images.shape[0] < n:
        raise ExperimentError(f"need {n} MNIST images, the files hold {images.shape[0]}")
    X = (images[:n].reshape(n, -1).T / 255.0 - MNIST_MEAN) / MNIST_STD
    return X, labels[:n].astype(np.int64)


# ------------------------------------------------------------- plumbing --

class Progress:
    """Progress on stderr every few seconds: step, loss, alignment, steps/s, ETA."""

    def __init__(self, label, cfg):
        self.label, self.cfg, self.every = label, cfg, PROGRESS_EVERY
        self.start = self.last = time.perf_counter()
        self.last_step, self.last_loss = 0, None

    def __call__(self, step, loss, hist):
        now = time.perf_counter()
        if self.cfg.quiet or now - self.last < self.every or step == self.last_step:
            if self.last_loss is None:           # (no step since the last line: no rate yet)
                self.last_loss = loss
            return
        rate = (step - self.last_step) / (now - self.last)
        eta = (self.cfg.max_steps - step) / max(rate, 1e-9)
        if self.last_loss and 0 < loss < self.last_loss and step > self.last_step:
            per_step = (math.log(self.last_loss) - math.log(loss)) / (step - self.last_step)
            eta = min(eta, math.log(max(loss, self.cfg.tol) / self.cfg.tol) / per_step / max(rate, 1e-9))
        al = hist.measurements.get("alignment_paired", [float("nan")])[-1]
        al = min(al) if isinstance(al, list) else al          # a batch: the least aligned
        print(f"  {self.label}: step {step:,}  loss {loss:.3e}  alignment {al:.4f}  "
              f"{rate:,.0f} steps/s  ETA {eta:,.0f} s", file=sys.stderr, flush=True)
        self.last, self.last_step, self.last_loss = now, step, loss


def loss_kind(cfg, squared=True):
    """The loss for the --loss-scale convention: "mse_mean" (authors' code) or "mse" (Eq. (2))."""
    if not squared:
        return "ce"
    return "mse_mean" if cfg.loss_scale == "mean" else "mse"


def torch_like_init(rng, widths):
    """PyTorch's default Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return [rng.uniform(-1, 1, (widths[i + 1], widths[i])) / math.sqrt(widths[i])
            for i in range(len(widths) - 1)]


def to_device(cfg, *arrays):
    """The arrays on the chosen device (NumPy or CuPy) in the chosen dtype."""
    return [cfg.xp.asarray(a, dtype=cfg.dtype) for a in arrays]


def run_dense(label, cfg, weights, X, Y, kind, lr=None):
    """Gradient descent on a dense network (or a batch, ``lr`` one per network or one for
    all; default --lr) with both measures tracked; (weights, History)."""
    weights = to_device(cfg, *weights)
    X = to_device(cfg, X)[0]
    Y = cfg.xp.asarray(Y) if kind == "ce" else to_device(cfg, Y)[0]
    measure = cfg.lib.tracker(weights, rtol=cfg.rtol)
    try:
        out, hist = cfg.lib.train(weights, X, Y, kind=kind, lr=cfg.lr if lr is None else lr,
                                  max_steps=cfg.max_steps,
                                  tol=cfg.tol, measure_every=cfg.measure_every,
                                  measures={"m": measure}, callback=Progress(label, cfg))
    except align.DivergenceError as exc:
        raise ExperimentError(f"{label}: {exc}") from exc
    return out, hist


def run_structured(label, cfg, structures, params, X, Y, kind):
    """Gradient descent on the coefficients of a structured network, both measures tracked."""
    params = to_device(cfg, *params)
    X, Y = to_device(cfg, X, Y)
    measure = cfg.lib.tracker(st.layer_matrices(structures, params), rtol=cfg.rtol)
    try:
        return st.train(structures, params, X, Y, kind=kind, lr=cfg.lr, max_steps=cfg.max_steps,
                        tol=cfg.tol, measure_every=cfg.measure_every, measures={"m": measure},
                        callback=Progress(label, cfg), descend=cfg.lib.gradient_descent)
    except align.DivergenceError as exc:
        raise ExperimentError(f"{label}: {exc}") from exc


def record(hist, **extra):
    """A run's JSON record: its history plus experiment-specific fields."""
    out = hist.to_dict()
    out.update(extra)
    return out


def keep(runs, name, run):
    """Add a run's record to ``runs``; False when it was interrupted (Ctrl-C, SIGTERM), and
    the experiment then returns None (the runs so far are written, marked interrupted).  A
    run interrupted before its first loss was recorded (in the measurement of step 0) has
    nothing to show and is left out."""
    if run["losses"]:
        runs[name] = run
    return run["stop_reason"] != "interrupted"


def thinned(run, every):
    """A run record keeping the loss of every ``every``-th step (and the last one)."""
    if every == 1 or "steps" not in run:
        return run
    keep = [j for j, t in enumerate(run["steps"]) if t % every == 0 or j == len(run["steps"]) - 1]
    return run | {"steps": [run["steps"][j] for j in keep], "losses": [run["losses"][j] for j in keep]}


def seeds(cfg):
    """The seeds of the runs: --seed, --seed + 1, ..., --seed + --seeds - 1."""
    return range(cfg.seed, cfg.seed + cfg.seeds)


# ---------------------------------------------------------- experiments --

@dataclasses.dataclass
class Problem:
    """One network to train: its name in the records, start, data, learning rate, and the
    fields its record gets besides the History's."""
    name: str
    weights: list
    X: object
    Y: object
    lr: float
    extra: dict = dataclasses.field(default_factory=dict)
    group: object = None            # problems batch together only within a group

    def batch_key(self):
        return tuple(W.shape for W in self.weights) + (self.X.shape, self.Y.shape, self.group)


def train_problems(cfg, problems, runs, label, always_batch=False):
    """Train the problems, keeping each network's record in ``runs``: a problem alone as one
    run, problems of the same shapes as batches (one lr per network, each frozen at its
    own stop: the records are the runs alone's to rounding).  ``always_batch``: a lone
    problem too, so that its record is bit for bit what it is in any batch (sweep shards).
    False when interrupted."""
    groups = {}
    for p in problems:
        groups.setdefault(p.batch_key(), []).append(p)
    for group in groups.values():
        if len(group) == 1 and not always_batch:
            p = group[0]
            _, hist = run_dense(f"{label} {p.name}", cfg, p.weights, p.X, p.Y, loss_kind(cfg), p.lr)
            if not keep(runs, p.name, record(hist, **p.extra)):
                return False
            continue
        for part in batches(cfg, len(group), group[0].weights[0].size):
            chunk = group[part]
            weights = [np.stack([p.weights[i] for p in chunk]) for i in range(len(chunk[0].weights))]
            X, Y = np.stack([p.X for p in chunk]), np.stack([p.Y for p in chunk])
            rates = [p.lr for p in chunk]
            names = chunk[0].name + (f" .. {chunk[-1].name}" if len(chunk) > 1 else "")
            _, hist = run_dense(f"{label} {names}", cfg, weights, X, Y, loss_kind(cfg),
                                rates[0] if len(set(rates)) == 1 else rates)
            split = split_batch(vars(hist), [p.name for p in chunk], cfg.tol)
            for p in chunk:
                if not keep(runs, p.name, split[p.name] | p.extra):
                    return False
    return True


def scaled(weights, scale):
    """The weights times --init-scale (a sweep parameter; unchanged when not given)."""
    return weights if scale is None else [scale * W for W in weights]


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
        yield Problem(f"seed={seed}", scaled(weights, cfg.init_scale), X, Y, cfg.lr)


def fig1a(cfg, runs):
    """Figure 1a: 3 layers 9x9, X, Y 9x9 standard normal, aligned start; Theorem 1's
    condition fails, so alignment is not kept.  --seeds N trains the N networks as one batch."""
    if not train_problems(cfg, list(fig1a_problems(cfg)), runs, "fig1a"):
        return None
    return claim_leaves_one(runs)


def batches(cfg, count, layer_size):
    """Slices of ``count`` problems to train as one batch each: as many networks as fit in
    half the device's free memory (64 arrays of a first layer's size per network,
    generously); a notice when the JSON would hold very many losses."""
    steps = cfg.max_steps + 1
    layer = layer_size * np.dtype(cfg.dtype).itemsize
    kept = count * steps // cfg.loss_every        # losses in the JSON at most
    if kept > 10 ** 7 and not cfg.quiet:
        print(f"note: the JSON will hold up to {kept:,} losses "
              f"(~{kept * 20 / 1e9:.1f} GB); --loss-every K keeps every "
              "K-th", file=sys.stderr)
    size = max(1, min(count, int(0.5 * available_memory(cfg.xp) // (64 * layer))))
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def available_memory(xp):
    """Free bytes on the device of xp (the GPU's free memory, or the host's available RAM)."""
    if xp is not np:
        return xp.cuda.runtime.memGetInfo()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):           # not Linux: assume what sysconf says
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 2 ** 40


def split_batch(batch, names, tol):
    """Per-network records from the history of a batch trained together.

    Each network stopped updating at its first step below tol (align.train freezes it),
    so its record ends there, exactly as its own run would; the measurement at that step
    is the batch's next one (the network no longer moved).  A network whose loss stopped
    being finite is recorded as diverged there, without that loss (as a run alone).
    """
    steps, table = np.asarray(batch["steps"]), np.array(batch["losses"], dtype=float)
    measure_steps = batch["measure_steps"]
    runs = {}
    for b, name in enumerate(names):
        losses = table[:, b]
        below, bad = steps[losses < tol], steps[~np.isfinite(losses)]
        stop = int(min([*below[:1], *bad[:1], batch["final_step"]]))
        keep = [j for j, t in enumerate(measure_steps) if t < stop]
        diverged = bool(bad.size) and stop == bad[0]    # (its loss at stop is not finite)
        after = [] if diverged else [next(j for j, t in enumerate(measure_steps) if t >= stop)]
        upto = (steps < stop) | ((steps == stop) & (not diverged))
        runs[name] = {
            "steps": steps[upto].tolist(),
            "losses": losses[upto].tolist(),
            "measure_steps": [measure_steps[j] for j in keep] + [stop] * len(after),
            "measurements": {k: [v[j][b] for j in keep + after] for k, v in batch["measurements"].items()},
            "stop_reason": "diverged" if diverged else "tol" if below.size and stop == below[0]
            else batch["stop_reason"],
            "final_step": stop, "wall_time": batch["wall_time"] / len(names), "batched": len(names)}
    return runs


def _fig1_mnist(cfg, runs, name, squared):
    X, labels = mnist_data(cfg, 256)
    Y = np.eye(10)[:, labels]
    widths = [784, 1024, 64, 10]
    for seed in seeds(cfg):
        if cfg.init == "aligned":      # W1 = D1 U_X^T, W2 = D2, W3 = U_Y D3, D_i ~ U(0, 1)
            weights = align.aligned_init(np.linalg.svd(Y)[0], np.linalg.svd(X)[0], widths, seed=seed)
        else:
            weights = torch_like_init(np.random.default_rng(seed), widths)
        kind = loss_kind(cfg, squared)
        _, hist = run_dense(f"{name} seed={seed}", cfg, weights, X, Y if squared else labels, kind)
        if not keep(runs, f"seed={seed}", record(hist)):
            return None
    return claim_leaves_one(runs)


def fig1b(cfg, runs):
    """Figure 1b: 784-1024-64-10 on 256 MNIST images, squared loss, aligned start."""
    return _fig1_mnist(cfg, runs, "fig1b", squared=True)


def fig1c(cfg, runs):
    """Figure 1c: as 1b with the cross-entropy loss."""
    return _fig1_mnist(cfg, runs, "fig1c", squared=False)


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
        _, hist = run_structured(f"fig2a seed={seed}", cfg, [S] * 3, params, np.eye(4), Y, loss_kind(cfg))
        if not keep(runs, f"seed={seed}", record(hist)):
            return None
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
        _, hist = run_structured(f"fig2b seed={seed}", cfg, [S] * 3, params, X, X, loss_kind(cfg))
        if not keep(runs, f"seed={seed}", record(hist)):
            return None
    return claim_leaves_one(runs)


def _sensing_run(label, cfg, rng, k):
    """Matrix sensing with M_i = U Lambda_i V^T (Section 4.2), from an aligned start."""
    U, V = np.linalg.qr(rng.standard_normal((k, k)))[0], np.linalg.qr(rng.standard_normal((k, k)))[0]
    n = 2 * k
    Ms = np.stack([U @ np.diag(rng.standard_normal(k)) @ V.T for _ in range(n)])
    target = U @ np.diag(rng.uniform(0.5, 2.0, k)) @ V.T   # positive: no singular value crosses 0
    y = np.einsum("nij,ij->n", Ms, target)
    weights = to_device(cfg, *align.aligned_init(U, V, [k] * 4, sigmas=away_from_zero(rng, k)))
    Ms_d, y_d, eye = to_device(cfg, Ms, y, np.eye(k))
    xp = cfg.xp

    def loss_and_grads(ws):                      # L = 1/(2n) sum_i (y_i - <M_i, W_d..W_1>)^2
        P = align.forward(ws, eye)
        r = y_d - (Ms_d * P).sum((1, 2))
        return (r * r).sum() / (2 * n), align.layer_gradients(ws, eye, -xp.tensordot(r, Ms_d, 1) / n)
    measure = cfg.lib.tracker(weights, rtol=cfg.rtol)
    _, hist = cfg.lib.gradient_descent(weights, loss_and_grads, cfg.lr, cfg.max_steps, cfg.tol,
                                       measure_every=cfg.measure_every, measures={"m": measure},
                                       callback=Progress(label, cfg))
    return hist


def away_from_zero(rng, k, d=3):
    """Initial singular values from U(0.5, 1).  The aligned set is invariant (Theorem 1) but
    not attracting: near a zero singular value, rounding errors off it grow by orders of
    magnitude (seen with U(0, 1) starts), so the positive cases start away from zero."""
    return [rng.uniform(0.5, 1.0, k) for _ in range(d)]


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
            _, hist = run_dense(f"thm1 {task} seed={seed}", cfg, weights, X, Y, loss_kind(cfg))
            if not keep(runs, f"{task} seed={seed}",
                        record(hist, certificate_residual=cert.residual)):
                return None
        sensing = _sensing_run(f"thm1 sensing seed={seed}", cfg, rng, k)
        if not keep(runs, f"sensing seed={seed}", record(sensing)):
            return None
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
            _, hist = run_dense(f"prop1 {kind} seed={seed}", cfg, weights, X, y, kind)
            if not keep(runs, f"{kind} seed={seed}", record(hist)):
                return None
    return claim_stays_one(runs, cfg, what=("alignment_paired",))


def cor1(cfg, runs):
    """Corollary 1: the per-singular-value recursion against full GD from an aligned start
    on certified data (autoencoder of width 9, 3 layers)."""
    k, d = 9, 3
    worst = 0.0
    for seed in seeds(cfg):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((k, 2 * k)) / math.sqrt(2)
        cert = align.invariance_certificate(X, X, [k] * (d + 1))
        sig0 = [rng.uniform(0.2, 1.0, k) for _ in range(d)]
        weights = align.aligned_init(cert.U, cert.V, [k] * (d + 1), sigmas=sig0)
        bases = [cert.V] + [np.eye(k)] * (d - 1) + [cert.U]
        kind = loss_kind(cfg)

        def sigmas(ws, _):
            return {"sigma": [(bases[i + 1].T @ align.to_numpy(W) @ bases[i]).diagonal().tolist()
                              for i, W in enumerate(ws)]}
        cfg64 = dataclasses.replace(cfg, dtype=np.float64)
        out, hist = cfg.lib.train(to_device(cfg64, *weights), *to_device(cfg64, X, X), kind=kind,
                                  lr=cfg.lr, max_steps=cfg.max_steps, tol=cfg.tol,
                                  measure_every=cfg.measure_every, measures={"s": sigmas},
                                  callback=Progress(f"cor1 seed={seed}", cfg))
        if hist.stop_reason == "interrupted":
            if not keep(runs, f"seed={seed}", record(hist)):
                return None
        steps = hist.measure_steps
        t0 = time.perf_counter()
        traj = cfg.lib.singular_value_dynamics(np.array(sig0), cert.lam, cert.lam_prime, cfg.lr,
                                               X.shape[1], steps[-1], kind=kind, kd=k)
        reduced_time = time.perf_counter() - t0
        reduced = traj[steps]
        full = np.array(hist.measurements["sigma"])
        diff = float(np.abs(reduced - full).max() / np.abs(full).max())
        worst = max(worst, diff)
        if not keep(runs, f"seed={seed}", record(hist, reduced_sigma=reduced.tolist(),
                                             max_relative_difference=diff, reduced_wall_time=reduced_time)):
            return None
    return verdict("Corollary 1's recursion gives full GD's singular values", worst, worst < 1e-10)


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
        out, hist = run_structured(f"thm3 seed={seed}", cfg, [S, S], start, X, Y, "mse")
        test = align.is_aligned(st.layer_matrices([S, S], [align.to_numpy(p) for p in out]), tol=1e-6)
        if not keep(runs, f"seed={seed}",
                    record(hist, is_aligned=bool(test), aligned_residual=test.residual)):
            return None
    final = max(r["measurements"]["alignment_paired"][-1] for r in runs.values())
    holds = all(not r["is_aligned"] for r in runs.values()) and final < 0.99
    interpolated = all(r["stop_reason"] == "tol" for r in runs.values())
    return verdict("the interpolating structured network is not aligned (Theorem 3)", final, holds,
                   None if interpolated else f"its premise failed: training stopped above the loss "
                   f"threshold {cfg.tol:g} (raise --max-steps)")


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
                              X, Y, cfg.lr, {"depth": depth, "eps": eps, "seed": seed}, group=eps)


def departures(run):
    """1 - each measure at the end, and its largest value over training (1 - the least)."""
    m = run["measurements"]
    return {"final_departure": {k: 1 - v[-1] for k, v in m.items()},
            "largest_departure": {k: 1 - min(v) for k, v in m.items()}}


def stability(cfg, runs):
    """Beyond the paper: how fragile is alignment?  Data at distance eps from Theorem 1's
    condition, aligned start from the unperturbed data's certificate, trained to the
    threshold; 1 - alignment and 1 - invariance against eps, depths 2, 3, 4."""
    if not train_problems(cfg, list(stability_problems(cfg)), runs, "stability"):
        return None
    for run in runs.values():
        run.update(departures(run))
    exact = [r for r in runs.values() if r["eps"] == 0]
    eps = 1e-8 if cfg.dtype == np.float64 else 1e-4
    worst = max((max(r["largest_departure"].values()) for r in exact), default=None)
    return verdict(f"at eps = 0 (Theorem 1's condition met) both measures stay 1 to {eps:g} "
                   "under both rules", worst, worst is not None and worst <= eps,
                   None if exact else "no run at eps = 0")


def fitted_slope(eps, values):
    """The least-squares slope of log10(values) against log10(eps) over the points with
    0 < eps <= FIT_UP_TO and values above DEPARTURE_FLOOR; None with fewer than 2."""
    points = [(math.log10(e), math.log10(v)) for e, v in zip(eps, values)
              if 0 < e <= FIT_UP_TO and v > DEPARTURE_FLOOR]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def stability_findings(runs):
    """Per depth and measure: the exponent p of 1 - measure ~ eps^p, for the value at the end
    ("final") and the largest departure during training ("largest"), fitted per seed; the
    mean, min and max over seeds."""
    out = {}
    for depth in sorted({r["depth"] for r in runs.values()}):
        chosen = [r for r in runs.values() if r["depth"] == depth]
        out[f"depth={depth}"] = {key: {which: _slopes(chosen, f"{which}_departure", key)
                                       for which in ("final", "largest")}
                                 for key in align.MEASURE_KEYS}
    return {"exponent": out, "fitted_over": f"0 < eps <= {FIT_UP_TO:g}, departures above "
                                             f"{DEPARTURE_FLOOR:g}"}


def _slopes(chosen, field, key):
    """fitted_slope of each seed's departures (``field``, measure ``key``) against eps;
    their mean, min and max (None when no seed has two points to fit)."""
    slopes = []
    for seed in sorted({r["seed"] for r in chosen}):
        slope = fitted_slope(*zip(*sorted((r["eps"], r[field][key]) for r in chosen if r["seed"] == seed)))
        if slope is not None:
            slopes.append(slope)
    return {"mean": float(np.mean(slopes)), "min": min(slopes), "max": max(slopes),
            "seeds": len(slopes)} if slopes else None


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


def verdict(claim, value, holds, not_shown=None):
    """A claim's record: "holds", "does not hold", or "not shown" (with why) when the
    premise of the claim did not happen; ``holds`` is True for "holds" alone."""
    shown = not_shown is None
    return {"claim": claim, "value": value, "holds": bool(holds) and shown,
            "verdict": ("holds" if holds else "does not hold") if shown else "not shown",
            **({} if shown else {"why": not_shown})}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment: the function that runs it, what of the paper it reproduces, and its
    defaults.  ``gpu_from_seeds``: --device auto runs it on a GPU from this many --seeds
    (the others are faster on the CPU, where small layers cost no kernel launches);
    ``options``: which of --init, --mnist, --loss-scale apply to it."""
    run: object
    paper: str
    dtype: type
    lr: float = 1e-2                    # Appendix L
    tol: float = 1e-4                   # Appendix L
    gpu_from_seeds: float = math.inf
    options: tuple = ()
    runs_per_seed: int = 1              # networks trained per seed (memory check)
    measure_every: int = 100            # Appendix L
    problems: object = None             # cfg -> Problems: what a sweep can batch
    sweeps: tuple = ()                  # the parameters a sweep may vary (Config fields)
    figure: object = None               # (title, runs) -> figure, instead of outputs.figure
    findings: object = None             # runs -> a dict for the JSON and the summary


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
}
PER_EXPERIMENT_OPTIONS = ("init", "mnist", "loss_scale")   # each experiment lists its own
COMMAND_OPTIONS = {"verify": {"device", "quick", "out", "quiet", "threads"},   # verify, report
                   "report": {"device", "run", "out", "quiet", "threads"}}


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment's settings: the command line with the experiment's defaults filled in."""
    xp: object
    device: str
    dtype: type
    lr: float
    tol: float
    rtol: float
    seed: int
    seeds: int
    max_steps: int
    measure_every: int
    loss_every: int
    loss_scale: str
    init: str
    mnist: str
    out: str
    quiet: bool
    quick: bool
    command: str = ""
    threads: int = 1
    reference: bool = False
    depth: int = None                   # the sweep parameters (None: the experiment's own)
    width: int = None
    n: int = None
    init_scale: float = None
    eps: float = None

    @property
    def lib(self):
        """The code that trains and measures: align.py with --reference, else align_fast.py."""
        return align if self.reference else align_fast

    def to_dict(self):
        """The settings for the JSON record."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "xp" and not (f.name in SWEEP_PARAMETERS and getattr(self, f.name) is None)} | \
            {"dtype": np.dtype(self.dtype).name, "implementation": self.lib.__name__}


SWEEP_PARAMETERS = {"lr": float, "depth": int, "width": int, "n": int, "init_scale": float, "eps": float}


def configure(name, args, xp):
    """The Config of experiment ``name`` from the parsed command line, on the array module xp
    (NumPy where --device auto finds the CPU faster for it)."""
    exp = EXPERIMENTS[name]
    dtype, every = np.dtype(args.dtype or exp.dtype).type, args.measure_every or exp.measure_every
    if args.device == "auto" and xp is not np and args.seeds < exp.gpu_from_seeds:
        xp = np
        if not args.quiet:
            print(f"note: {name} runs on the CPU, where its small layers are faster "
                  "(--device gpu to insist)", file=sys.stderr)
    return Config(xp=xp, device=args.device, dtype=dtype, lr=args.lr or exp.lr, tol=args.tol or exp.tol,
                  rtol=1e-6 if dtype == np.float64 else 1e-4, seed=args.seed, seeds=args.seeds,
                  max_steps=min(args.max_steps, QUICK_STEPS) if args.quick else args.max_steps,
                  measure_every=min(every, QUICK_MEASURE) if args.quick else every,
                  loss_every=args.loss_every, loss_scale=args.loss_scale or "mean",
                  init=args.init or "aligned", mnist=args.mnist, out=args.out, quiet=args.quiet,
                  quick=args.quick, command=args.command, threads=blas_threads(args.threads),
                  reference=bool(args.reference))


COMMAND_HELP = {
    "verify": "verify: every numbered statement of Sections 3-5 checked numerically on float64 "
              "instances (three seeds); the table, <out>/verify.json; exit status 3 if one fails.",
    "report": "report: <out>/report.md and a self-contained report.html from the results in "
              "<out> (and verify.json, or verify-quick.json)."}


def applies(option, name):
    """Whether the option (its argparse dest) applies to the command ``name`` (an experiment,
    verify, report, or None for the general --help, where all do)."""
    if name in COMMAND_OPTIONS:
        return option in COMMAND_OPTIONS[name]
    if name in EXPERIMENTS:
        return option != "run" and (option not in PER_EXPERIMENT_OPTIONS
                                    or option in EXPERIMENTS[name].options)
    return True


def options_not_applying(name, argv):
    """The options given in ``argv`` (as typed) that the command ``name`` does not take."""
    actions = parser()._option_string_actions
    given = [actions[a.split("=")[0]] for a in argv if a.split("=")[0] in actions]
    return [a.option_strings[-1] for a in given if a.dest != "help" and not applies(a.dest, name)]


# -------------------------------------------------------------- threads --
# BLAS threads spin while they wait for work: where processes together ask for more threads
# than there are cores (seeds run as parallel jobs), every small product of a step waits
# for a scheduler slice, and four fig1b runs on 2 cores took 68 times one run's time.  The
# layers here are small (a fig1b step is 0.2 ms), so one thread is as fast alone as two
# (README, "Many runs at once") and never collapses beside other processes.
SMALL_LAYER_MAX = 1024 * 1024          # layers up to this many entries: one BLAS thread


def usable_cores():
    """The CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota
    (a container or a job's share of a node), not the machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def cgroup_cpu_quota(root="/sys/fs/cgroup"):
    """CPUs the cgroup allows (quota / period; cgroup v2 cpu.max or v1's cfs files), or None."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def blas_threads(requested=None, largest_layer=SMALL_LAYER_MAX):
    """BLAS threads for a run: ``requested`` (--threads) if given, else one for small layers
    and the usable cores for larger ones."""
    if requested:
        return requested
    return 1 if largest_layer <= SMALL_LAYER_MAX else usable_cores()


def blas_pools():
    """threadpoolctl's description of the BLAS libraries loaded (empty without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]


@contextlib.contextmanager
def threads_limited(threads):
    """Run the block with ``threads`` BLAS threads (threadpoolctl), then restore them."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                 # (installed with the project; a copied file may lack it)
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


# ------------------------------------------------------------- records --

def project_version():
    """This project's version: setup.cfg beside this file, else the installed metadata."""
    parser_ = configparser.ConfigParser()
    if parser_.read(os.path.join(HERE, "setup.cfg")) and parser_.has_option("metadata", "version"):
        return parser_.get("metadata", "version")
    try:
        return importlib.metadata.version("deep-linear-alignment")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def environment(cfg):
    """Library versions, machine and device (with the GPU's name) for the JSON record."""
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "device": "gpu" if cfg.xp is not np else "cpu", "usable_cores": usable_cores(),
            "blas": [{k: pool[k] for k in ("internal_api", "num_threads", "version")}
                     for pool in blas_pools()]}
    if cfg.xp is not np:
        import cupy
        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def run_experiment(name, cfg):
    """Run one experiment, print its summary and write <out>/<stem>.json, .csv and .png
    together (output_stem).  Returns (its claim, "done" or "interrupted"): after Ctrl-C
    or SIGTERM what was computed is written, marked interrupted (nothing when no run was
    recorded)."""
    exp = EXPERIMENTS[name]
    start, runs = time.perf_counter(), {}
    check_memory(cfg, exp.runs_per_seed)
    try:
        claim = exp.run(cfg, runs)           # None: a run was interrupted
    except KeyboardInterrupt:                # (a signal outside the runs: loading, set-up)
        claim = None
    stop = "done" if claim is not None else "interrupted"
    if claim is None:
        claim = verdict(f"{name}'s claim", None, False,
                        f"interrupted with {len(runs)} run(s) recorded")
    if not runs:
        print(f"{name}: interrupted before any run was recorded; nothing written "
              f"(earlier results in {cfg.out} left as they were)")
        return claim, stop
    with outputs.signals_held():                     # (a signal now: the results are written first)
        claim = _report(name, cfg, exp, runs, claim, stop, start)
    return claim, stop


def _report(name, cfg, exp, runs, claim, stop, start):
    """Print the summary and write the JSON, CSV and PNG of an experiment's runs."""
    runs = {label: thinned(r, cfg.loss_every) for label, r in runs.items()}
    print(outputs.summary(name, runs, claim, stop))
    findings = exp.findings(runs) if exp.findings and stop == "done" else None
    if findings:
        print(outputs.findings_text(findings))
    result = {"experiment": name, "paper": exp.paper, "title": title(exp.run), "status": stop,
              "claim": claim, "command": cfg.command, "version": project_version(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": cfg.to_dict(), "environment": environment(cfg),
              "wall_time": time.perf_counter() - start, "summary": outputs.spread(runs),
              **({"findings": findings} if findings else {}), "runs": runs}
    base = os.path.join(cfg.out, output_stem(name, cfg, stop))
    writers = {base + ".json": outputs.text_writer(json.dumps(outputs.strict_json(result), indent=1, allow_nan=False)),
               base + ".csv": outputs.text_writer(outputs.csv_text(runs))}
    fig = outputs.figure_or_note(result["title"], runs, exp.figure)
    if not isinstance(fig, str):
        writers[base + ".png"] = lambda tmp: fig.savefig(tmp, dpi=120, format="png")
    try:                                               # (never an old plot beside new results)
        outputs.write_files(writers, remove=[base + ".png"] if isinstance(fig, str) else [])
    finally:
        outputs.close_figure(fig)
    print(f"  wrote {', '.join(writers)}")
    if isinstance(fig, str):
        print(f"  {fig}")
    return claim


def output_stem(name, cfg, stop):
    """The name of a run's files: <name>, <name>-quick for --quick runs, and with
    "-interrupted" added when an interrupted run would replace a complete one."""
    stem = name + ("-quick" if cfg.quick else "")
    if stop == "interrupted":
        try:
            with open(os.path.join(cfg.out, stem + ".json")) as f:
                complete = json.load(f).get("status") == "done"
        except (OSError, ValueError):
            complete = False
        if complete:
            print(f"  note: {os.path.join(cfg.out, stem)}.json holds a complete run; this "
                  f"interrupted one goes to {stem}-interrupted.*")
            stem += "-interrupted"
    return stem


def check_memory(cfg, runs_per_seed=1):
    """Refuse (ExperimentError), before anything is built, a run whose per-step loss records
    would not fit in 80% of the host's available memory."""
    steps, runs = cfg.max_steps + 1, cfg.seeds * runs_per_seed
    needed, host = runs * steps * 40, available_memory(np)   # a Python float in a list per step
    if needed > 0.8 * host:
        raise ExperimentError(f"--seeds {cfg.seeds} with --max-steps {cfg.max_steps} needs about "
                              f"{needed / 2**30:.1f} GiB for the per-step loss records; a run may use "
                              f"80% of the {host / 2**30:.1f} GiB available ({0.8 * host / 2**30:.1f} "
                              "GiB): use fewer seeds or steps")


# ------------------------------------------------------------------- CLI --

def title(fn):
    """The first sentence of an experiment's docstring."""
    doc = " ".join(fn.__doc__.split())
    return doc[:doc.index(". ") + 1] if ". " in doc else doc


def parser(name=None):
    """The command line (argparse); --help lists every experiment with its paper reference.
    For one experiment (``EXPERIMENT --help``): only the options that apply to it, with
    its own defaults."""
    exp = EXPERIMENTS.get(name)
    shown = lambda option: argparse.SUPPRESS if not applies(option, name) else None
    listing = "\n".join(textwrap.fill(f"{n:<9} {e.paper:<25} {title(e.run)}", 100,
                                       initial_indent="  ", subsequent_indent=" " * 38)
                         for n, e in EXPERIMENTS.items())
    p = argparse.ArgumentParser(
        prog="experiments.py" + (f" {name}" if name else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{name}: {title(exp.run)} ({exp.paper})" if exp else COMMAND_HELP.get(name, __doc__),
        epilog=("" if name else "experiments:\n" + listing + "\n  list      print this table"
                "\n  all       every experiment in turn\n  verify    every numbered statement of Sections 3-5 "
                "checked numerically\n  report    results/report.md and .html from what is in results/"
                "\n  sweep     sweep EXPERIMENT --grid NAME=V1,V2,... (fig1a, stability): a grid of its "
                "parameters, in shards for job arrays (sweep fig1a --help)"
                "\n\n") + "exit status: 0 done, 1 error, 2 bad "
        "usage, 3 a paper claim did not hold or was not shown (full runs), 130 interrupted, "
        "143 terminated (SIGTERM)")
    default = lambda text, own: f"default {own}" if exp else text
    p.add_argument("experiment", choices=["list", *EXPERIMENTS, "all", "verify", "report"],
                   metavar="EXPERIMENT", help=argparse.SUPPRESS if name else "one of: list, " +
                   ", ".join(EXPERIMENTS) + ", all, verify (every numbered statement checked; "
                   "--quick: one seed), report (results/report.md and .html from the results folder)")
    p.add_argument("--run", action="store_true", default=None,
                   help=shown("run") or "report: first run the experiments (--quick) and verify "
                   "whose results are missing")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="cpu (NumPy), gpu (CuPy; error if unusable) or auto (default: the GPU if "
                        "usable and faster for the experiment: fig1b, fig1c, fig2b, and fig1a "
                        "from 100 --seeds)")
    p.add_argument("--dtype", metavar="{float32,float64}", choices=["float32", "float64"], default=None,
                   help=shown("dtype") or default("default per experiment: float32 for the MNIST "
                                                  "figures, float64 otherwise",
                                                  exp and np.dtype(exp.dtype).name))
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help=shown("seed") or "first random seed (default 0)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help=shown("seeds") or "number of independent runs (default 1)")
    p.add_argument("--lr", metavar="LR", type=_positive_float, default=None,
                   help=shown("lr") or "learning rate (" + default(
                       "default 1e-2 as in Appendix L; 1e-3 for prop1, 1e-1 for thm3",
                       exp and f"{exp.lr:g}") + ")")
    p.add_argument("--tol", metavar="TOL", type=_positive_float, default=None,
                   help=shown("tol") or "stop when the loss is below this (" + default(
                       "default 1e-4 as in Appendix L; 1e-10 for thm3, whose claim is about "
                       "interpolation", exp and f"{exp.tol:g}") + ")")
    p.add_argument("--max-steps", type=_positive_int, default=100_000,
                   help=shown("max_steps") or "step budget (default 100000, the authors' cap)")
    p.add_argument("--measure-every", type=_positive_int, default=None,
                   help=shown("measure_every") or "steps between measurements of alignment and "
                   "invariance (" + default("100; 10 for stability", exp and exp.measure_every) + ")")
    p.add_argument("--loss-every", type=_positive_int, default=1,
                   help=shown("loss_every") or "keep the loss of every K-th step in the JSON "
                   "(default 1: every step; runs still stop at the first step below --tol)")
    p.add_argument("--loss-scale", choices=["mean", "paper"], default=None,
                   help=shown("loss_scale") or "squared loss as the mean over all kd*n entries (the "
                        "authors' code, with which the published figures were made; default) or "
                        "Eq. (2)'s 1/(2n) sum (fig1a, fig1b, fig2a, fig2b, thm1, cor1)")
    p.add_argument("--init", choices=["aligned", "random"], default=None,
                   help=shown("init") or "fig1a-fig2b: aligned start (default) or PyTorch-style "
                        "random start")
    p.add_argument("--quick", action="store_true",
                   help=shown("quick") or ("one seed instead of three; <out>/verify-quick.json"
                                           if name == "verify" else None) or f"{QUICK_STEPS} steps, measuring every {QUICK_MEASURE} (smoke test); files "
                        "<out>/<experiment>-quick.*, apart from full runs' files")
    p.add_argument("--mnist", default=None, metavar="DIR",
                   help=shown("mnist") or "folder with the full MNIST idx files (raw or .gz); "
                        "default: the shipped subset of the first 1024 training images (fig1b, "
                        "fig1c, fig2b, prop1)")
    p.add_argument("--reference", action="store_true", default=None,
                   help=shown("reference") or "train and measure with align.py's reference code "
                   "(slower; the same claims) instead of align_fast.py; recorded in the JSON")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=shown("threads") or "BLAS threads (default: 1, as fast for these small "
                   "layers and safe beside other runs; see README, 'Many runs at once')")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def verify_or_report(args):
    """``verify`` (verify_command) or ``report`` (report_command); exit status 1 on errors."""
    try:
        check_output_folder(args.out)
        xp = select_device(args.device, quiet=args.quiet)
        return (verify_command if args.experiment == "verify" else report_command)(args, xp)
    except (ExperimentError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def verify_command(args, xp):
    """The table of every numbered statement, <out>/verify.json (verify-quick.json with
    --quick); exit status 3 if one fails."""
    start = time.perf_counter()
    rows = verify.verify(xp, quick=args.quick, progress=None if args.quiet else lambda row: print(
        f"  {row.statement}: {'holds' if row.holds else 'FAILS'}", file=sys.stderr))
    print(verify.table(rows))
    print(f"{sum(r.holds for r in rows)} of {len(rows)} hold ({time.perf_counter() - start:.1f} s, "
          f"{'GPU' if xp is not np else 'CPU'})")
    outputs.write_text(os.path.join(args.out, "verify-quick.json" if args.quick else "verify.json"),
               json.dumps(outputs.strict_json(
                   {"command": args.command, "version": project_version(), "quick": args.quick,
                    "device": "gpu" if xp is not np else "cpu", "rows": verify.rows_json(rows)}),
                   indent=1))
    return 0 if all(r.holds for r in rows) else 3


def report_command(args, xp):
    """<out>/report.md and report.html; with --run, the missing quick runs and verify first."""
    if args.run:
        fill_in_missing(args, xp)
    rows, quick = read_verify_rows(args.out)
    md, page, unreadable = outputs.report(args.out, EXPERIMENTS, rows, quick)
    for path, problem in unreadable:
        print(f"warning: {path} cannot be read ({problem}); the report marks it unreadable "
              f"(rerun that experiment to replace it)", file=sys.stderr)
    paths = [os.path.join(args.out, "report.md"), os.path.join(args.out, "report.html")]
    outputs.write_files(dict(zip(paths, map(outputs.text_writer, (md, page)))))
    print(f"wrote {paths[0]} and {paths[1]}" + ("" if rows else " (no verify.json: run "
                                                 "python experiments.py verify)"))
    return 0


def fill_in_missing(args, xp):
    """report --run: a --quick run of each experiment, and verify --quick, whose results
    are missing from <out>."""
    for name in EXPERIMENTS:
        if not any(os.path.exists(os.path.join(args.out, f"{name}{s}.json")) for s in ("", "-quick")):
            quick = parser(name).parse_args([name, "--quick", "--out", args.out, "-q"])
            quick.command = shlex.join(["python", "experiments.py", name, "--quick"])
            run_experiment(name, configure(name, quick, xp))
    if not any(os.path.exists(os.path.join(args.out, f"verify{s}.json")) for s in ("", "-quick")):
        quick = parser("verify").parse_args(["verify", "--quick", "--out", args.out, "-q"])
        quick.command = "python experiments.py verify --quick"
        verify_command(quick, xp)


def read_verify_rows(out):
    """verify's rows from <out>/verify.json, else verify-quick.json: (rows, quick); (None,
    False) when neither can be read."""
    for name, quick in (("verify.json", False), ("verify-quick.json", True)):
        try:
            with open(os.path.join(out, name)) as f:
                return verify.rows_from_json(json.load(f)["rows"]), quick
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None, False


def check_output_folder(path):
    """Create --out before any run, so that a folder that cannot hold the results fails at
    once instead of after the run."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExperimentError(f"--out {path}: that is a file, not a folder; give a folder "
                              "(it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ExperimentError(f"--out {path}: cannot create the folder ({exc.strerror}); "
                              "give another with --out DIR") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExperimentError(f"--out {path}: the folder is not writable; give another with --out DIR")


def interrupted_status():
    """Say what an interrupted command left; its exit status (130 Ctrl-C, 143 SIGTERM)."""
    terminated = signal.SIGTERM in outputs.SIGNALS_RECEIVED
    print(f"{'terminated' if terminated else 'interrupted'}: " + (
        "what was computed was written, marked \"interrupted\"" if outputs.FILES_WRITTEN else
        "nothing was written"), file=sys.stderr)
    return 143 if terminated else 130


def main(argv=None):
    """Run the command line; returns the exit status (0, 1 error, 2 usage, 3 claim not shown
    or not holding, 130 Ctrl-C, 143 SIGTERM).  SIGTERM is handled like Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        return sweep_command(argv)
    args = parser(next((a for a in argv if a in EXPERIMENTS or a in COMMAND_OPTIONS),
                       None)).parse_args(argv)
    args.command = shlex.join(["python", "experiments.py", *argv])
    if args.experiment == "list":
        print(parser().epilog)
        return 0
    if args.experiment in COMMAND_OPTIONS:
        ignored = options_not_applying(args.experiment, argv)
        if ignored:
            parser(args.experiment).error(f"{', '.join(ignored)} does not apply to "
                                          f"{args.experiment}")
        with threads_limited(blas_threads(args.threads)):
            return verify_or_report(args)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        ignored = options_not_applying(name, argv)
        if ignored and len(names) == 1:
            parser(name).error(f"{', '.join(ignored)} does not apply to {name}")
        if ignored and not args.quiet:
            print(f"note: {name} ignores {', '.join(ignored)}", file=sys.stderr)
    with sigterm_as_interrupt():
        return run_experiments(args, names)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM handled like Ctrl-C while a command runs (in the main thread)."""
    previous = signal.signal(signal.SIGTERM, outputs.on_signal) \
        if threading.current_thread() is threading.main_thread() else None
    del outputs.SIGNALS_RECEIVED[:], outputs.FILES_WRITTEN[:]
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_experiments(args, names):
    """Run the named experiments in turn; the exit status."""
    try:
        check_output_folder(args.out)
        if args.mnist is not None:
            mnist_paths(args.mnist)                     # before any experiment runs
        xp = select_device(args.device, quiet=args.quiet)
        claims = {}
        for name in names:
            cfg = configure(name, args, xp)
            with threads_limited(cfg.threads):
                claims[name], stop = run_experiment(name, cfg)
            if stop == "interrupted":
                return interrupted_status()
    except (ExperimentError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return interrupted_status()
    return 0 if all(c["holds"] for c in claims.values()) or args.quick else 3


def sweep_parser(name):
    """The command line of ``sweep EXPERIMENT``: the experiment's options, --grid, --shard
    and --merge."""
    p = parser(name)
    p.prog = f"experiments.py sweep {name}"
    p.description = (f"sweep {name}: train {name} at every combination of the --grid values "
                     f"({', '.join(EXPERIMENTS[name].sweeps)}), --seeds networks each; cells "
                     "sharing shapes train as one batch.\n\n" + sweeps.__doc__.split("\n\n")[1] +
                     "\n\nGrid parameters: lr, depth (layers), width (the hidden layers), n "
                     "(samples), init_scale (the start times this), eps (stability's distance).")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a parameter and its values (repeat for more parameters)")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N parts of the grid "
                   "(cells I-1, I-1+N, ...) into <out>/sweep-<experiment>-shard-I-of-N.json")
    p.add_argument("--merge", action="store_true",
                   help="join the N shards in <out> into <out>/sweep-<experiment>.*")
    return p


def sweep_command(argv):
    """``sweep EXPERIMENT --grid ...``: run the grid (or one shard of it), or merge the
    shards; the exit status."""
    swept = [n for n, e in EXPERIMENTS.items() if e.problems]
    name = argv[1] if len(argv) > 1 else None
    if name not in swept:
        print(f"usage: experiments.py sweep EXPERIMENT --grid NAME=V1,V2,... [--seeds N] "
              f"[--shard I/N | --merge]\nerror: EXPERIMENT must be one of {', '.join(swept)}"
              f"{'' if name is None else f', not {name}'}", file=sys.stderr)
        return 2
    p = sweep_parser(name)
    args = p.parse_args(argv[1:])
    args.command = shlex.join(["python", "experiments.py", *argv])
    ignored = options_not_applying(name, argv[1:])
    if ignored:
        p.error(f"{', '.join(ignored)} does not apply to a sweep of {name}")
    if args.merge and args.shard:
        p.error("--merge joins the shards: give it without --shard")
    with sigterm_as_interrupt():
        try:
            check_output_folder(args.out)
            xp = select_device(args.device, quiet=args.quiet)
            return sweep_or_merge(name, args, configure(name, args, xp))
        except (ExperimentError, DeviceError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return interrupted_status()


def sweep_or_merge(name, args, cfg):
    """Train the sweep (or one shard), or merge its shards, and write the files; the exit
    status."""
    exp = EXPERIMENTS[name]
    grid = sweeps.parse_grid(args.grid, name, exp, SWEEP_PARAMETERS)
    shard = sweeps.parse_shard(args.shard) if args.shard else None
    start, status = time.perf_counter(), "done"
    with threads_limited(cfg.threads):
        if args.merge:
            result = sweeps.merge(name, exp, cfg, grid, environment(cfg), project_version())
        else:
            count = len(sweeps.shard_indices(len(sweeps.cells(grid)), shard))
            check_memory(cfg, count * exp.runs_per_seed)
            runs, status = sweeps.run_sweep(name, exp, cfg, grid, shard, train_problems)
            if not runs:
                print(f"sweep {name}: interrupted before any run was recorded; nothing written")
                return interrupted_status()
            result = sweeps.result_record(name, exp, cfg, grid, shard, runs, status, start,
                                          environment(cfg), project_version())
    with outputs.signals_held():
        print(sweeps.summary_text(name, grid, result["cells"], status))
        print(f"  wrote {', '.join(sweeps.write(result, cfg.out, name, shard))}")
    return interrupted_status() if status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
