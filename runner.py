"""Running experiments from the command line: options, devices, BLAS threads, memory, the
training helpers that keep each run's record (also of an interrupted run), output names,
and the verify, report and sweep commands.  experiments.py holds the science and hands its
table of experiments to ``main(argv, experiments)``; nothing here is about the paper.
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
IDX_NDIM = {2049: 1, 2051: 3}                    # idx magic numbers: labels, images
QUICK_STEPS, QUICK_MEASURE = 300, 50
PROGRESS_EVERY = 2.0                             # seconds between progress lines
DEVICES = ("cpu", "gpu", "auto")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment: the function that runs it, what of the paper it reproduces, and its
    defaults.  ``gpu_from_seeds``: --device auto runs it on a GPU from this many --seeds
    (the others are faster on the CPU, where small layers cost no kernel launches);
    ``options``: which of --init, --mnist, --loss-scale apply to it."""
    run: object
    paper: str
    dtype: type
    lr: float = 1e-2                    # Appendix L (None: each experiment's own per network)
    tol: float = 1e-4                   # Appendix L
    gpu_from_seeds: float = math.inf
    options: tuple = ()
    runs_per_seed: int = 1              # networks trained per seed (memory check)
    measure_every: int = 100            # Appendix L
    problems: object = None             # cfg -> Problems: what a sweep can batch
    sweeps: tuple = ()                  # the parameters a sweep may vary (Config fields)
    figure: object = None               # (title, runs) -> figure, instead of outputs.figure
    findings: object = None             # runs -> a dict for the JSON and the summary
    seeds: int = 1                      # --seeds' default
    max_steps: int = 100_000            # --max-steps' default (the authors' cap)
    quick_steps: int = QUICK_STEPS      # the step budget of --quick
    loss_every: int = 1                 # --loss-every's default


class DeviceError(RuntimeError):
    """The requested device (GPU through CuPy) cannot be used."""


def select_device(device="auto", quiet=False):
    """Array module for ``device`` in {"cpu", "gpu", "auto"}: "gpu" raises DeviceError naming
    what is missing; "auto" falls back to NumPy with a one-line notice (unless ``quiet``)."""
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


# ------------------------------------------------------------------- MNIST files --
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


def first_images(cfg, n):
    """The first n MNIST training images (n x 28 x 28) and labels, from --mnist or the subset."""
    images, labels = load_mnist(cfg.mnist)
    if images.shape[0] < n:
        raise ExperimentError(f"need {n} MNIST images, the files hold {images.shape[0]}")
    return images[:n], labels[:n]


# ----------------------------------------------------------------- configuration --
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
    experiment: str = ""                # its name, for progress lines
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
                if f.name not in ("xp", "experiment") and not (f.name in SWEEP_PARAMETERS and getattr(self, f.name) is None)} | \
            {"dtype": np.dtype(self.dtype).name, "implementation": self.lib.__name__}


SWEEP_SIZES = ("4.7 MB", "119 MB")   # the README's fig1a sweep: --loss-every 100, 1
SWEEP_PARAMETERS = {"lr": float, "depth": int, "width": int, "n": int, "init_scale": float, "eps": float}
PER_EXPERIMENT_OPTIONS = ("init", "mnist", "loss_scale")   # each experiment lists its own
COMMAND_OPTIONS = {"verify": {"device", "quick", "out", "quiet", "threads"},   # verify, report
                   "report": {"device", "run", "out", "quiet", "threads"}}


def configure(exp, name, args, xp):
    """The Config of experiment ``exp`` (``name``) from the parsed command line, on the array
    module xp (NumPy where --device auto finds the CPU faster for it)."""
    dtype, every = np.dtype(args.dtype or exp.dtype).type, args.measure_every or exp.measure_every
    count, budget = args.seeds or exp.seeds, args.max_steps or exp.max_steps
    if args.device == "auto" and xp is not np and count < exp.gpu_from_seeds:
        xp = np
        if not args.quiet:
            print(f"note: {name} runs on the CPU, where its small layers are faster "
                  "(--device gpu to insist)", file=sys.stderr)
    return Config(xp=xp, device=args.device, dtype=dtype, lr=args.lr or exp.lr, tol=args.tol or exp.tol,
                  rtol=1e-6 if dtype == np.float64 else 1e-4, seed=args.seed,
                  seeds=min(count, 2) if args.quick and not args.seeds else count,
                  max_steps=min(budget, exp.quick_steps) if args.quick else budget,
                  measure_every=min(every, QUICK_MEASURE) if args.quick else every,
                  loss_every=args.loss_every or exp.loss_every, loss_scale=args.loss_scale or "mean",
                  init=args.init or "aligned", mnist=args.mnist, out=args.out, quiet=args.quiet,
                  quick=args.quick, command=args.command, threads=blas_threads(args.threads),
                  reference=bool(args.reference), experiment=name)


def seeds(cfg):
    """The seeds of the runs: --seed, --seed + 1, ..., --seed + --seeds - 1."""
    return range(cfg.seed, cfg.seed + cfg.seeds)


def to_device(cfg, *arrays, dtype=None):
    """The arrays on the chosen device (NumPy or CuPy) in the chosen dtype."""
    return [cfg.xp.asarray(a, dtype=dtype or cfg.dtype) for a in arrays]


# ------------------------------------------------------- training, with records --
class Progress:
    """Progress on stderr every few seconds: step, loss, alignment, steps/s, ETA (from the
    rate of the loss's fall once it falls, else from the step budget)."""

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
        budget = (self.cfg.max_steps - step) / max(rate, 1e-9)
        eta = f"at most {budget:,.0f} s (the step budget)"
        if self.last_loss and 0 < loss < self.last_loss and step > self.last_step and \
                step >= 0.1 * self.cfg.max_steps:     # (early, the loss falls faster than later)
            per_step = (math.log(self.last_loss) - math.log(loss)) / (step - self.last_step)
            guess = math.log(max(loss, self.cfg.tol) / self.cfg.tol) / per_step / max(rate, 1e-9)
            eta = f"~{min(guess, budget):,.0f} s at the loss's rate, {eta}"
        al = hist.measurements.get("alignment_paired", [float("nan")])[-1]
        al = min(al) if isinstance(al, list) else al          # a batch: the least aligned
        print(f"  {self.label}: step {step:,}  loss {loss:.3e}  alignment {al:.4f}  "
              f"{rate:,.0f} steps/s  ETA {eta}", file=sys.stderr, flush=True)
        self.last, self.last_step, self.last_loss = now, step, loss


def recorded(runs, name, train, extra=None):
    """Run ``train() -> (params, History)`` and keep its record, the History with the
    ``extra`` fields, as runs[name]; returns (params, record).  This is how every experiment
    stops on Ctrl-C or SIGTERM: an interrupted run's record (up to its last whole step) is
    kept too, unless it recorded no loss, and the interrupt goes on to run_experiment."""
    try:
        out, hist = train()
    except align.Interrupted as stop:
        if stop.history.losses:
            runs[name] = stop.history.to_dict() | (extra or {})
        raise
    except align.DivergenceError as exc:
        raise ExperimentError(f"{name}: {exc}") from exc
    runs[name] = record = hist.to_dict() | (extra or {})
    return out, record



def train_dense(cfg, runs, name, weights, X, Y, kind, lr=None, measures=None, dtype=None,
                extra=None):
    """Gradient descent on a dense network (or a batch; ``lr`` one per network or one for all,
    default --lr), alignment and invariance tracked (or ``measures``): (weights, record)."""
    weights = to_device(cfg, *weights, dtype=dtype)
    X = to_device(cfg, X, dtype=dtype)[0]
    Y = cfg.xp.asarray(Y) if kind == "ce" else to_device(cfg, Y, dtype=dtype)[0]
    measures = measures or {"m": cfg.lib.tracker(weights, rtol=cfg.rtol)}
    try:
        out, record = recorded(runs, name, lambda: cfg.lib.train(
            weights, X, Y, kind=kind, lr=cfg.lr if lr is None else lr, max_steps=cfg.max_steps,
            tol=cfg.tol, measure_every=cfg.measure_every, measures=measures,
            callback=Progress(f"{cfg.experiment} {name}".strip(), cfg)), extra)
    finally:
        if name in runs and weights[0].ndim == 2:           # (a batch: thinned once split)
            runs[name] = thinned(runs[name], cfg.loss_every)
    return out, runs[name]


def train_structured(cfg, runs, name, structures, params, X, Y, kind, extra=None):
    """Gradient descent on the coefficients of a structured network, both measures tracked:
    (params, record)."""
    params = to_device(cfg, *params)
    X, Y = to_device(cfg, X, Y)
    measure = cfg.lib.tracker(st.layer_matrices(structures, params), rtol=cfg.rtol)
    return recorded(runs, name, lambda: st.train(
        structures, params, X, Y, kind=kind, lr=cfg.lr, max_steps=cfg.max_steps, tol=cfg.tol,
        measure_every=cfg.measure_every, measures={"m": measure},
        callback=Progress(f"{cfg.experiment} {name}".strip(), cfg),
        descend=cfg.lib.gradient_descent), extra)


def descend(cfg, runs, name, weights, loss_and_grads, extra=None):
    """Gradient descent on any loss of a dense network, both measures tracked: (weights,
    record)."""
    measure = cfg.lib.tracker(weights, rtol=cfg.rtol)
    return recorded(runs, name, lambda: cfg.lib.gradient_descent(
        weights, loss_and_grads, cfg.lr, cfg.max_steps, cfg.tol, measure_every=cfg.measure_every,
        measures={"m": measure}, callback=Progress(f"{cfg.experiment} {name}".strip(), cfg)), extra)


@dataclasses.dataclass
class Problem:
    """One network to train: its name in the records, start, data, learning rate, and the
    fields its record gets besides the History's."""
    name: str
    weights: list
    X: object
    Y: object
    lr: float
    kind: str = "mse"
    extra: dict = dataclasses.field(default_factory=dict)
    group: object = None            # problems batch together only within a group
    after: object = None            # after(weights, start) -> fields for the record of a run

    def batch_key(self):
        return tuple(W.shape for W in self.weights) + (self.X.shape, self.Y.shape, self.kind,
                                                        self.group)


def train_problems(cfg, runs, label, problems, always_batch=False):
    """Train the problems, keeping each network's record in ``runs``: a problem alone as one
    run, problems of the same shapes as batches (align_fast: one lr per network, each frozen
    at its own stop, so the records are the runs alone's to rounding).  ``always_batch``: a
    lone problem too, so that its record is bit for bit what it is in any batch (sweeps).
    An interrupted batch keeps every network's record up to the last whole step."""
    groups = {}
    for p in problems:
        groups.setdefault(p.batch_key(), []).append(p)
    for group in groups.values():
        if len(group) == 1 and not always_batch:
            p = group[0]
            out, record = train_dense(cfg, runs, p.name, p.weights, p.X, p.Y, p.kind, p.lr, extra=p.extra)
            if p.after:
                record.update(p.after([align.to_numpy(W) for W in out], p.weights))
            continue
        for part in batches(cfg, len(group), group[0].weights[0].size):
            chunk = group[part]
            weights = [np.stack([p.weights[i] for p in chunk]) for i in range(len(chunk[0].weights))]
            X, Y = np.stack([p.X for p in chunk]), np.stack([p.Y for p in chunk])
            rates = [p.lr for p in chunk]
            names = chunk[0].name + (f" .. {chunk[-1].name}" if len(chunk) > 1 else "")
            batch, label_, out = {}, names, None
            try:
                out, _ = train_dense(cfg, batch, label_, weights, X, Y, chunk[0].kind,
                                     rates[0] if len(set(rates)) == 1 else rates)
            finally:                                    # (also when interrupted: up to there)
                if batch:
                    split = split_batch(batch[label_], [p.name for p in chunk], cfg.tol)
                    runs.update({p.name: thinned(split[p.name], cfg.loss_every) | p.extra
                                 for p in chunk if split[p.name]["losses"]})
            for b, p in enumerate(chunk):
                if p.after:
                    runs[p.name].update(p.after([align.to_numpy(W[b]) for W in out], p.weights))


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


def split_batch(batch, names, tol):
    """Per-network records from the history of a batch trained together.

    Each network stopped updating at its first step below tol (align_fast.train freezes
    it), so its record ends there, exactly as its own run would; the measurement at that
    step is the batch's next one (the network no longer moved).  A network whose loss
    stopped being finite is recorded as diverged there, without that loss (as a run
    alone).  An interrupted batch: each network up to the batch's last whole step.
    """
    steps, table = np.asarray(batch["steps"]), np.array(batch["losses"], dtype=float)
    table = table.reshape(len(steps), len(names))
    measure_steps = batch["measure_steps"]
    runs = {}
    for b, name in enumerate(names):
        losses = table[:, b]
        below, bad = steps[losses < tol], steps[~np.isfinite(losses)]
        stop = int(min([*below[:1], *bad[:1], batch["final_step"]]))
        keep = [j for j, t in enumerate(measure_steps) if t < stop]
        diverged = bool(bad.size) and stop == bad[0]    # (its loss at stop is not finite)
        after = [] if diverged else [j for j, t in enumerate(measure_steps) if t >= stop][:1]
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


def thinned(run, every):
    """A run record keeping the loss of every ``every``-th step (and the last one)."""
    if every == 1 or "steps" not in run:
        return run
    keep = [j for j, t in enumerate(run["steps"]) if t % every == 0 or j == len(run["steps"]) - 1]
    return run | {"steps": [run["steps"][j] for j in keep], "losses": [run["losses"][j] for j in keep]}


def verdict(claim, value, holds, not_shown=None):
    """A claim's record: "holds", "does not hold", or "not shown" (with why) when the
    premise of the claim did not happen; ``holds`` is True for "holds" alone."""
    shown = not_shown is None
    return {"claim": claim, "value": value, "holds": bool(holds) and shown,
            "verdict": ("holds" if holds else "does not hold") if shown else "not shown",
            **({} if shown else {"why": not_shown})}


# ------------------------------------------------------- threads and memory --
# BLAS threads spin while they wait for work: where processes together ask for more threads
# than there are cores (seeds run as parallel jobs), every small product of a step waits
# for a scheduler slice, and four fig1b runs on 2 cores took 68 times one run's time.  The
# layers here are small (a fig1b step is 0.2 ms), so one thread is as fast alone as two
# (docs/performance.md, "Many runs at once") and never collapses beside other processes.
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
    """threadpoolctl's description of the BLAS libraries loaded (None without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]


@contextlib.contextmanager
def threads_limited(threads):
    """Run the block with ``threads`` BLAS threads (threadpoolctl), then restore them; without
    threadpoolctl, say that BLAS threads are not limited."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("note: threadpoolctl is not installed, so BLAS threads are not limited (pip "
              "install threadpoolctl; runs side by side may then slow each other down)",
              file=sys.stderr)
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


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


# ----------------------------------------------------------------------- records --
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
    pools = blas_pools()
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "device": "gpu" if cfg.xp is not np else "cpu", "usable_cores": usable_cores(),
            "blas": "not limited: threadpoolctl is not installed" if pools is None else
            [{k: pool[k] for k in ("internal_api", "num_threads", "version")} for pool in pools]}
    if cfg.xp is not np:
        import cupy
        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def run_experiment(exp, name, cfg):
    """Run one experiment, print its summary and write <out>/<stem>.json, .csv and .png
    together (output_stem).  Returns (its claim, "done" or "interrupted", the paths
    written): after Ctrl-C or SIGTERM what was computed is written, marked interrupted
    (nothing when no run was recorded)."""
    start, runs = time.perf_counter(), {}
    check_memory(cfg, exp.runs_per_seed)
    try:
        claim, stop = exp.run(cfg, runs), "done"
    except KeyboardInterrupt:                # align.Interrupted, or a signal in the set-up
        claim, stop = verdict(f"{name}'s claim", None, False,
                              f"interrupted with {len(runs)} run(s) recorded"), "interrupted"
    if not runs:
        print(f"{name}: interrupted before any run was recorded; nothing written "
              f"(earlier results in {cfg.out} left as they were)")
        return claim, stop, []
    written = []
    try:
        with outputs.signals_held():                 # (a signal now: the results are written first)
            claim, stop, written = _report(exp, name, cfg, runs, claim, stop, start)
    except KeyboardInterrupt:            # during the writes, which finished (or before them)
        raise WrittenThenInterrupted(name, stop if written else "interrupted", written) from None
    return claim, stop, written


class WrittenThenInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while an experiment's results were being written: held until they
    were complete; ``name``, ``stop`` (its status) and ``written`` (the paths) say what is there."""

    def __init__(self, name, stop, written):
        super().__init__(f"{name} written, then interrupted")
        self.name, self.stop, self.written = name, stop, written


def _report(exp, name, cfg, runs, claim, stop, start):
    """Print the summary and write the JSON, CSV and PNG of an experiment's runs:
    (claim, stop, paths)."""
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
    return claim, stop, list(writers)


def output_stem(name, cfg, stop):
    """The name of a run's files: <name>, <name>-quick for --quick runs, and with
    "-interrupted" added when an interrupted run would replace a complete one."""
    stem = name + ("-quick" if cfg.quick else "")
    if stop == "interrupted" and outputs.complete_result(os.path.join(cfg.out, stem + ".json")):
        print(f"  note: {os.path.join(cfg.out, stem)}.json holds a complete run; this "
              f"interrupted one goes to {stem}-interrupted.*")
        stem += "-interrupted"
    return stem


def title(fn):
    """The first sentence of an experiment's docstring."""
    doc = " ".join(fn.__doc__.split())
    return doc[:doc.index(". ") + 1] if ". " in doc else doc


# ------------------------------------------------------------------ command line --
def applies(table, option, name):
    """Whether the option (its argparse dest) applies to the command ``name`` (an experiment,
    verify, report, or None for the general --help, where all do)."""
    if name in COMMAND_OPTIONS:
        return option in COMMAND_OPTIONS[name]
    if name in table:
        return option != "run" and (option not in PER_EXPERIMENT_OPTIONS
                                    or option in table[name].options)
    return True


def options_not_applying(table, name, argv):
    """The options given in ``argv`` (as typed) that the command ``name`` does not take."""
    actions = parser(table)._option_string_actions
    given = [actions[a.split("=")[0]] for a in argv if a.split("=")[0] in actions]
    return [a.option_strings[-1] for a in given if a.dest != "help" and not applies(table, a.dest, name)]


COMMAND_HELP = {
    "verify": "verify: every numbered statement of Sections 3-5 checked numerically on float64 "
              "instances (three seeds); the table, <out>/verify.json; exit status 3 if one fails.",
    "report": "report: <out>/report.md and a self-contained report.html from the results in "
              "<out> (and verify.json, or verify-quick.json)."}
COMMANDS = ("list", "all", "verify", "report", "sweep")


def listing(table):
    """The commands and experiments, one line each (list, and the end of --help)."""
    rows = "\n".join(textwrap.fill(f"{n:<9} {e.paper:<25} {title(e.run)}", 100,
                                   initial_indent="  ", subsequent_indent=" " * 38)
                     for n, e in table.items())
    return ("experiments:\n" + rows + "\n  list      print this table"
            "\n  all       every experiment in turn\n  verify    every numbered statement of Sections 3-5 "
            "checked numerically\n  report    results/report.md and .html from what is in results/"
            "\n  sweep     sweep EXPERIMENT --grid NAME=V1,V2,... (" +
            ", ".join(n for n, e in table.items() if e.problems) + "): a grid of its parameters, "
            "in shards for job arrays (sweep fig1a --help)")


def parser(table, name=None, doc=None):
    """The command line (argparse); --help lists every experiment with its paper reference.
    For one experiment (``EXPERIMENT --help``): only the options that apply to it, with
    its own defaults."""
    exp = table.get(name)
    shown = lambda option: argparse.SUPPRESS if not applies(table, option, name) else None
    p = argparse.ArgumentParser(
        prog="experiments.py" + (f" {name}" if name else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{name}: {title(exp.run)} ({exp.paper})" if exp else COMMAND_HELP.get(name, doc),
        epilog=("" if name else listing(table) + "\n\n") + "exit status: 0 done, 1 error, 2 bad "
        "usage, 3 a paper claim did not hold or was not shown (full runs), 130 interrupted, "
        "143 terminated (SIGTERM)")
    default = lambda text, own: f"default {own}" if exp else text
    longer = ", ".join(f"{n}: {e.quick_steps}" for n, e in table.items() if e.quick_steps != QUICK_STEPS)
    quick_steps = exp.quick_steps if exp else f"{QUICK_STEPS}" + (f" ({longer})" if longer else "")
    p.add_argument("experiment", choices=["list", *table, "all", "verify", "report"],
                   metavar="EXPERIMENT", help=argparse.SUPPRESS if name else "one of: " +
                   ", ".join(["list", *table, "all", "verify", "report", "sweep"]) + " (see below)")
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
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help=shown("seeds") or "number of independent runs (" + default(
                       "default 1; 5 for limit, whose findings are fits over seeds",
                       exp and exp.seeds) + ")")
    p.add_argument("--lr", metavar="LR", type=_positive_float, default=None,
                   help=shown("lr") or "learning rate (" + default(
                       "default 1e-2 as in Appendix L; 1e-3 for prop1, 1e-1 for thm3, 5e-2 for stability, for limit "
                       "one per network from the loss's sharpness", exp and (
                           f"{exp.lr:g}" if exp.lr else "one per network, from the loss's sharpness")) + ")")
    p.add_argument("--tol", metavar="TOL", type=_positive_float, default=None,
                   help=shown("tol") or "stop when the loss is below this (" + default(
                       "default 1e-4 as in Appendix L; 1e-10 for thm3, whose claim is about "
                       "interpolation", exp and f"{exp.tol:g}") + ")")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help=shown("max_steps") or "step budget (" + default(
                       "default 100000, the authors' cap; 550000 for limit",
                       exp and exp.max_steps) + ")")
    p.add_argument("--measure-every", type=_positive_int, default=None,
                   help=shown("measure_every") or "steps between measurements of alignment and "
                   "invariance (" + default("100; 10 for stability; limit measures at the end only",
                                            exp and exp.measure_every) + ")")
    p.add_argument("--loss-every", type=_positive_int, default=None,
                   help=shown("loss_every") or "keep the loss of every K-th step in the JSON (" +
                   default("default 1: every step; 1000 for limit", exp and exp.loss_every) +
                   "; runs still stop at the first step below --tol)")
    p.add_argument("--loss-scale", choices=["mean", "paper"], default=None,
                   help=shown("loss_scale") or "squared loss as the mean over all kd*n entries (the "
                        "authors' code, with which the published figures were made; default) or "
                        "Eq. (2)'s 1/(2n) sum (fig1a, fig1b, fig2a, fig2b, thm1, cor1)")
    p.add_argument("--init", choices=["aligned", "random"], default=None,
                   help=shown("init") or "fig1a-fig2b: aligned start (default) or PyTorch-style "
                        "random start")
    p.add_argument("--quick", action="store_true",
                   help=shown("quick") or ("one seed instead of three; <out>/verify-quick.json"
                                           if name == "verify" else None) or f"{quick_steps} steps, measuring every {QUICK_MEASURE} (smoke test); files "
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
                   "layers and safe beside other runs; see docs/performance.md)")
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


def main(argv, table, doc=None):
    """Run the command line with the experiments ``table`` ({name: Experiment}); returns the
    exit status (0, 1 error, 2 usage, 3 claim not shown or not holding, 130 Ctrl-C, 143
    SIGTERM).  SIGTERM is handled like Ctrl-C; a closed pipe (``| head``) ends it quietly."""
    try:
        return _main(list(argv), table, doc)
    except BrokenPipeError:                     # the reader went away (e.g. | head): be quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv, table, doc):
    if argv[:1] == ["sweep"]:
        return sweep_command(argv, table, doc)
    args = parser(table, next((a for a in argv if a in table or a in COMMAND_OPTIONS), None),
                  doc).parse_args(argv)
    args.command = shlex.join(["python", "experiments.py", *argv])
    if args.experiment == "list":
        print(listing(table))
        return 0
    if args.experiment in COMMAND_OPTIONS:
        ignored = options_not_applying(table, args.experiment, argv)
        if ignored:
            parser(table, args.experiment).error(f"{', '.join(ignored)} does not apply to "
                                                 f"{args.experiment}")
        with threads_limited(blas_threads(args.threads)):
            return verify_or_report(args, table)
    names = list(table) if args.experiment == "all" else [args.experiment]
    for name in names:
        ignored = options_not_applying(table, name, argv)
        if ignored and len(names) == 1:
            parser(table, name).error(f"{', '.join(ignored)} does not apply to {name}")
        if ignored and not args.quiet:
            print(f"note: {name} ignores {', '.join(ignored)}", file=sys.stderr)
    with sigterm_as_interrupt():
        return run_experiments(args, table, names)


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


def run_experiments(args, table, names):
    """Run the named experiments in turn; the exit status."""
    done = []
    try:
        check_output_folder(args.out)
        if args.mnist is not None:
            mnist_paths(args.mnist)                     # before any experiment runs
        xp = select_device(args.device, quiet=args.quiet)
        claims = {}
        for name in names:
            cfg = configure(table[name], name, args, xp)
            with threads_limited(cfg.threads):
                claims[name], stop, written = run_experiment(table[name], name, cfg)
            if stop == "interrupted":
                return interrupted_status(done, name, written)
            done.append(name)
    except (ExperimentError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except WrittenThenInterrupted as late:
        if late.stop == "done":
            return interrupted_status(done + [f"{late.name} ({', '.join(late.written)})"], None, [])
        return interrupted_status(done, late.name, late.written)
    except KeyboardInterrupt:
        return interrupted_status(done, None, [])
    return 0 if all(c["holds"] for c in claims.values()) or args.quick else 3


def interrupted_status(done, name, written):
    """Say what an interrupted command left (the experiments that finished, what the
    interrupted one wrote); its exit status (130 Ctrl-C, 143 SIGTERM)."""
    terminated = signal.SIGTERM in outputs.SIGNALS_RECEIVED
    what = ("terminated" if terminated else "interrupted") + (f" during {name}" if name else "")
    parts = [f"{', '.join(done)} complete and written" if done else ""]
    parts.append(f"{name}'s runs so far written to {', '.join(written)}, marked \"interrupted\""
                 if written else f"nothing written for {name}" if name else "")
    print(f"{what}: " + ("; ".join(p for p in parts if p) or "nothing was written"), file=sys.stderr)
    return 143 if terminated else 130


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


# ------------------------------------------------------------- verify and report --
def verify_or_report(args, table):
    """``verify`` or ``report``; exit status 1 on errors."""
    try:
        check_output_folder(args.out)
        xp = select_device(args.device, quiet=args.quiet or args.experiment == "report")
        if args.experiment == "verify":
            return verify_command(args, xp)
        return report_command(args, table, xp)
    except (ExperimentError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def verify_command(args, xp):
    """The table of every numbered statement, <out>/verify.json (verify-quick.json with
    --quick); exit status 3 if one fails.  Progress: one line, rewritten, on a terminal."""
    start, tty, count = time.perf_counter(), sys.stderr.isatty() and not args.quiet, []

    def progress(row):
        count.append(row)
        if tty:
            print(f"\r  verify: {len(count)} rows checked", end="", file=sys.stderr, flush=True)
    rows = verify.verify(xp, quick=args.quick, progress=progress)
    if tty:
        print(file=sys.stderr)
    print(verify.table(rows))
    path = os.path.join(args.out, "verify-quick.json" if args.quick else "verify.json")
    outputs.write_text(path, json.dumps(outputs.strict_json(
        {"command": args.command, "version": project_version(), "quick": args.quick,
         "device": "gpu" if xp is not np else "cpu", "rows": verify.rows_json(rows)}), indent=1))
    print(f"{sum(r.holds for r in rows)} of {len(rows)} hold ({time.perf_counter() - start:.1f} s, "
          f"{'GPU' if xp is not np else 'CPU'}); wrote {path}")
    return 0 if all(r.holds for r in rows) else 3


def note_foreign_temporaries(folder):
    """Mention the temporary files another host's writers left in ``folder`` over a day ago
    (most likely a killed task's): they are never deleted here, since their owner's pid
    means nothing on this machine."""
    for path, host, age in outputs.foreign_temporaries(folder):
        print(f"note: {path} is a temporary file of a writer on {host}, {age / 3600:.0f} h old; "
              f"remove it if that run is over", file=sys.stderr)


def report_command(args, table, xp):
    """<out>/report.md and report.html; with --run, the missing quick runs and verify first."""
    if args.run:
        fill_in_missing(args, table, xp)
    rows, quick = read_verify_rows(args.out)
    md, page, unreadable = outputs.report(args.out, table, rows, quick)
    for path, problem in unreadable:
        print(f"warning: {path} cannot be read ({problem}); the report marks it unreadable "
              f"(rerun that experiment to replace it)", file=sys.stderr)
    found = [n for n in table if any(os.path.exists(os.path.join(args.out, f"{n}{s}.json"))
                                     for s in ("", "-quick"))]
    if not found and rows is None:
        print(f"warning: {args.out} holds no results: the report lists every experiment as "
              f"missing. Run them first (python experiments.py all --quick --out {args.out}), "
              f"or give the folder that holds them (report --out DIR), or add --run",
              file=sys.stderr)
    note_foreign_temporaries(args.out)
    paths = [os.path.join(args.out, "report.md"), os.path.join(args.out, "report.html")]
    outputs.write_files(dict(zip(paths, map(outputs.text_writer, (md, page)))))
    print(f"wrote {paths[0]} and {paths[1]}" + ("" if rows else " (no verify.json: run "
                                                 "python experiments.py verify)"))
    return 0


def fill_in_missing(args, table, xp):
    """report --run: a --quick run of each experiment, and verify --quick, whose results
    are missing from <out>."""
    for name in table:
        if not any(os.path.exists(os.path.join(args.out, f"{name}{s}.json")) for s in ("", "-quick")):
            quick = parser(table, name).parse_args([name, "--quick", "--out", args.out, "-q"])
            quick.command = shlex.join(["python", "experiments.py", name, "--quick"])
            run_experiment(table[name], name, configure(table[name], name, quick, xp))
    if not any(os.path.exists(os.path.join(args.out, f"verify{s}.json")) for s in ("", "-quick")):
        quick = parser(table, "verify").parse_args(["verify", "--quick", "--out", args.out, "-q"])
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


# ------------------------------------------------------------------------ sweeps --
SWEEP_LOSS_EVERY = 100     # a sweep keeps every 100th loss unless --loss-every says otherwise


def sweep_parser(table, name):
    """The command line of ``sweep EXPERIMENT``: the experiment's options, --grid, --shard,
    --skip-done and --merge, and --loss-every's sweep default."""
    p = parser(table, name)
    p.prog = f"experiments.py sweep {name}"
    p.set_defaults(loss_every=SWEEP_LOSS_EVERY)
    loss_every = next(a for a in p._actions if a.dest == "loss_every")
    loss_every.help = (f"keep the loss of every K-th step (and the last) in the files (default "
                       f"{SWEEP_LOSS_EVERY} for sweeps: the README's 60-run fig1a sweep then writes "
                       f"{SWEEP_SIZES[0]} of JSON instead of {SWEEP_SIZES[1]} with --loss-every 1, "
                       f"the full record)")
    p.description = (f"sweep {name}: train {name} at every combination of the --grid values "
                     f"({', '.join(table[name].sweeps)}), --seeds networks each; cells "
                     "sharing shapes train as one batch.\n\n" + sweeps.__doc__.split("\n\n")[1] +
                     "\n\nGrid parameters: lr, depth (layers), width (the hidden layers), n "
                     "(samples), init_scale (the start times this), eps (stability's distance).")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a parameter and its values (repeat for more parameters)")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N parts of the grid "
                   "(cells I-1, I-1+N, ...) into <out>/sweep-<experiment>-shard-I-of-N.json; in a "
                   "SLURM job array it is read from the array (SLURM_ARRAY_TASK_ID, _MIN and "
                   "_COUNT: arrays numbered from 0 or 1 both work)")
    p.add_argument("--shards", metavar="N", type=_positive_int,
                   help="in a job array resubmitted for some shards (sbatch --array=4,7 ... --shards "
                   "16): the sweep's number of shards N, the shard being the array task's id")
    p.add_argument("--skip-done", action="store_true",
                   help="skip a shard whose complete file of this sweep exists (a resubmitted "
                   "array redoes only what is missing)")
    p.add_argument("--merge", action="store_true",
                   help="join the N shards in <out> into <out>/sweep-<experiment>.*")
    return p


def sweep_help(table):
    """``sweep --help`` without an experiment: what a sweep is and which experiments sweep."""
    swept = [n for n, e in table.items() if e.problems]
    return (f"usage: experiments.py sweep EXPERIMENT --grid NAME=V1,V2,... [--seeds N] "
            f"[--shard I/N | --merge]\n\n{sweeps.__doc__}\nEXPERIMENT is one of: "
            f"{', '.join(swept)}; 'experiments.py sweep EXPERIMENT --help' lists its options.")


def sweep_command(argv, table, doc=None):
    """``sweep EXPERIMENT --grid ...``: run the grid (or one shard of it), or merge the
    shards; the exit status."""
    swept = [n for n, e in table.items() if e.problems]
    name = argv[1] if len(argv) > 1 else None
    if name in ("-h", "--help"):
        print(sweep_help(table))
        return 0
    if name not in swept:
        print(f"usage: experiments.py sweep EXPERIMENT --grid NAME=V1,V2,... [--seeds N] "
              f"[--shard I/N | --merge]\nerror: EXPERIMENT must be one of {', '.join(swept)}"
              f"{'' if name is None else f', not {name}'}", file=sys.stderr)
        return 2
    p = sweep_parser(table, name)
    args = p.parse_args(argv[1:])
    args.command = shlex.join(["python", "experiments.py", *argv])
    ignored = options_not_applying(table, name, argv[1:])
    if ignored:
        p.error(f"{', '.join(ignored)} does not apply to a sweep of {name}")
    if args.merge and (args.shard or args.shards):
        p.error("--merge joins the shards: give it without --shard or --shards")
    try:
        args.shard = sweeps.parse_shard(args.shard) if args.shard else \
            None if args.merge else sweeps.shard_from_array(os.environ, args.shards)
    except ValueError as exc:
        p.error(str(exc))
    with sigterm_as_interrupt():
        try:
            check_output_folder(args.out)
            xp = select_device(args.device, quiet=args.quiet)
            return sweep_or_merge(table[name], name, args, configure(table[name], name, args, xp))
        except (ExperimentError, DeviceError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return interrupted_status([], f"sweep {name}", [])


def sweep_or_merge(exp, name, args, cfg):
    """Train the sweep (or one shard), or merge its shards, and write the files; the exit
    status."""
    grid, shard = sweeps.parse_grid(args.grid, name, exp, SWEEP_PARAMETERS), args.shard
    start, status = time.perf_counter(), "done"
    if shard and args.skip_done and sweeps.done_already(name, exp, cfg, grid, shard, project_version()):
        print(f"sweep {name}: shard {shard[0]}/{shard[1]} is complete already "
              f"({sweeps.shard_path(cfg.out, name, shard, cfg.quick)}); skipped (--skip-done)")
        return 0
    with threads_limited(cfg.threads):
        if args.merge:
            note_foreign_temporaries(cfg.out)
            result = sweeps.merge(name, exp, cfg, grid, environment(cfg), project_version())
        else:
            count = len(sweeps.shard_indices(len(sweeps.cells(grid)), shard))
            check_memory(cfg, count * exp.runs_per_seed)
            runs, status = sweeps.run_sweep(name, exp, cfg, grid, shard, train_problems, thinned)
            if not runs and status == "interrupted":
                print(f"sweep {name}: interrupted before any run was recorded; nothing written")
                return interrupted_status([], f"sweep {name}", [])
            result = sweeps.result_record(name, exp, cfg, grid, shard, runs, status, start,
                                          environment(cfg), project_version())
    written = []
    try:
        with outputs.signals_held():
            print(sweeps.summary_text(name, grid, result["cells"], status))
            written = sweeps.write(result, cfg.out, name, shard)
            print(f"  wrote {', '.join(written)}")
    except KeyboardInterrupt:            # during the writes, which finished (or before them)
        if status == "done" and written:
            return interrupted_status([f"sweep {name} ({', '.join(written)})"], None, [])
        return interrupted_status([], f"sweep {name}", written)
    return interrupted_status([], f"sweep {name}", written) if status == "interrupted" else 0
