"""What needs CUDA (through CuPy), for align_fast.py: CUDA graphs of training steps, cuBLAS
called directly, and CUDA kernels (with their sources) for small SVDs, the greedy matching,
tiny products and Corollary 1's recursion.

align_fast.py imports it when CuPy arrays arrive and hands it what it needs (the CuPy module,
the step to record); it imports no module of the project.  Every function here computes what
a function of align.py or align_fast.py computes (tests/test_cuda.py and tests/test_kernels.py
hold them equal, on a GPU or on tests/cupy_standin).  Copy it with align_fast.py and align.py.
"""
import contextlib
import gc
import operator
import sys

import numpy as np

__all__ = ["GraphSteps", "DirectCublas", "gemm_plan", "small_svd", "greedy_match",
           "sv_dynamics", "SV_KERNEL_MAX_DEPTH"]


class GraphSteps:
    """Runs of GD steps replayed from CUDA graphs (CuPy stream capture), n steps per launch,
    captured once per n: align_fast's protocol of runs (``launch(n, keep)``, ``wait()``,
    ``rewind(j)``, ``cancel()``, ``kept``, ``open``, ``longest``).

    ``step(ps, matmul)`` takes one GD step of the parameters ``ps`` in place, its matrix
    products by ``matmul``, and returns the loss before it.  A step of a large network is ~20
    kernels of a few microseconds each, so launching them from Python costs more than running
    them.  The graph saves the parameters, then does n steps, writing each loss into a buffer;
    its products call cuBLAS directly (DirectCublas: CuPy refuses cuBLAS during a capture),
    checked first against CuPy's.  Its temporaries come from a private memory pool that
    nothing else allocates from, so their addresses stay valid between replays.  Replays run
    on their own stream, after the work queued before them, so a measurement of ``kept`` (on
    the current stream) overlaps them.  If the capture fails, ``launch`` returns False (and
    says so once) and the caller steps kernel by kernel.
    """
    warned = False                                       # say so once per process

    def __init__(self, ps, step, longest):
        import cupy
        self.cupy, self.ps, self.step, self.longest = cupy, ps, step, longest
        self.saved = [p.copy() for p in ps]
        self.kept = self.pending = None
        self.open, self.graphs, self.failed = False, {}, False

    def _save(self):
        for s, p in zip(self.saved, self.ps):
            s[...] = p

    def _run(self, n):
        """n steps kernel by kernel, with CuPy's products."""
        for _ in range(n):
            self.step(self.ps)

    def _capture(self, n):
        cp = self.cupy
        if not self.graphs:
            self.pool, self.stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()
        with self.stream:
            start = [p.copy() for p in self.ps]
            reference = [p.copy() for p in self.ps]
            L_ref = self.step(reference)                               # CuPy's products
        with cp.cuda.using_allocator(self.pool.malloc), self.stream, gc_paused():
            cublas = DirectCublas(cp, self.stream)
            scratch = [p.copy() for p in self.ps]   # warm-up: kernels compiled, pool filled
            L = self.step(scratch, cublas.matmul)
            for got, want in zip([L] + [a - b for a, b in zip(scratch, start)],
                                 [L_ref] + [a - b for a, b in zip(reference, start)]):
                if float(cp.linalg.norm(got - want)) > 1e-3 * float(cp.linalg.norm(want)) + 1e-30:
                    raise RuntimeError("cuBLAS called directly disagrees with CuPy's products")
            losses = cp.empty((n,) + L.shape, dtype=L.dtype)
            self.stream.synchronize()
            mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
            self.stream.begin_capture(*(() if mode is None else (mode,)))
            try:
                self._save()
                for j in range(n):
                    losses[j] = self.step(self.ps, cublas.matmul)
            finally:
                graph = self.stream.end_capture()
        return graph, losses, cublas                     # the graph's cuBLAS workspace lives on

    def launch(self, n, keep=False):
        """Start n steps; False when they cannot be launched (nothing changed then)."""
        if self.failed:
            return False
        try:
            if n not in self.graphs:
                self.graphs[n] = self._capture(n)
        except Exception as exc:                         # noqa: BLE001 - fall back, say why
            self.failed = True
            if not GraphSteps.warned:
                GraphSteps.warned = True
                print(f"note: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                      "stepping kernel by kernel", file=sys.stderr)
            return False
        graph, self.pending, _ = self.graphs[n]
        self.kept = [p.copy() for p in self.ps] if keep else None
        queued = self.cupy.cuda.Event()                  # after everything queued so far
        queued.record()
        self.stream.wait_event(queued)
        self.open = True
        graph.launch(stream=self.stream)
        return True

    def wait(self):
        """The launched run's losses (a NumPy array, one row per step)."""
        self.stream.synchronize()
        losses, self.pending = self.pending, None
        return losses.get()

    def rewind(self, j):
        """Back to the start of the last run, then its first j steps again."""
        for s, p in zip(self.saved, self.ps):
            p[...] = s
        self._run(j)

    def cancel(self):
        """Back to the start of a run that was launched and not taken (Ctrl-C)."""
        if self.open:
            self.stream.synchronize()
            self.rewind(0)
        self.pending, self.open = None, False


@contextlib.contextmanager
def gc_paused():
    """Collect garbage now and not again until the block ends.  A cycle collected during
    a CUDA graph capture could free an earlier run's memory pool or cuBLAS handle
    (cudaFree, cublasDestroy), which synchronize and so invalidate the capture: seen on
    a GPU as cudaErrorStreamCaptureInvalidated in a second run of one process."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _module(a):
    """CuPy for a CuPy array, else NumPy."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def _gemm_operand(M):
    """How cuBLAS (column-major) reads the transpose of a row-major operand M (.., r, c):
    (op, ld, batch stride) in elements, or None when M needs a contiguous copy first.
    A row-major M is the column-major M^T with ld = row stride (op N); a transposed
    view (unit row stride) is the column-major M itself, so op T gives M^T."""
    r, c = M.shape[-2:]
    s0, s1 = (st // M.itemsize for st in M.strides[-2:])
    batch = M.strides[0] // M.itemsize if M.ndim == 3 else 0
    if (s1 == 1 or c == 1) and s0 >= max(c, 1):
        return 0, s0, batch
    if (s0 == 1 or r == 1) and s1 >= max(r, 1):
        return 1, s1, batch
    return None


def gemm_plan(A, B):
    """cuBLAS arguments for C = A @ B (row-major, 2-D or batched, batch broadcast):
    C^T = B^T A^T in column-major terms.  Returns (A, B, out shape, (opB, opA, n, m, k,
    ldB, strideB, ldA, strideA, ldC, strideC, batch)); A or B become contiguous
    copies when their layout cannot be described by a leading dimension."""
    xp = _module(A)
    plans = []
    for M in (A, B):
        plan = _gemm_operand(M)
        if plan is None:
            M = xp.ascontiguousarray(M)
            plan = _gemm_operand(M)
        plans.append((M, plan))
    (A, (opA, ldA, sA)), (B, (opB, ldB, sB)) = plans
    m, k, n = A.shape[-2], A.shape[-1], B.shape[-1]
    batch = max(A.shape[0] if A.ndim == 3 else 1, B.shape[0] if B.ndim == 3 else 1)
    shape = ((batch,) if max(A.ndim, B.ndim) == 3 else ()) + (m, n)
    return A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, n, m * n, batch)


CUBLAS_WORKSPACE = 32 << 20     # bytes; NVIDIA's advice for cuBLAS in CUDA graphs on Hopper


class DirectCublas:
    """cuBLAS gemm through ctypes, for products inside a capture.  Its own handle and
    workspace: CuPy's products on other streams (measurements during replays) must
    not share the workspace that the captured products use."""

    def __init__(self, cupy, stream):
        import ctypes
        self.ct, self.cupy, self.handle = ctypes, cupy, None
        names = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")
        self.lib = next((lib for lib in map(self._load, names) if lib), None)
        if self.lib is None:
            raise RuntimeError(f"no cuBLAS library to call directly (tried {', '.join(names)})")
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)))
        self.handle = handle
        self.workspace = cupy.empty(CUBLAS_WORKSPACE, dtype=cupy.uint8)   # set one for graphs
        self._check(self.lib.cublasSetPointerMode_v2(self.handle, 0))  # alpha, beta on the host
        self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)))
        self._check(self.lib.cublasSetWorkspace_v2(self.handle,
                                                   ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(self.workspace.nbytes)))

    def _load(self, name):
        try:
            return self.ct.CDLL(name)
        except OSError:
            return None

    def __del__(self):
        try:
            if self.handle is not None:
                self.lib.cublasDestroy_v2(self.handle)
        except Exception:                                # noqa: BLE001 - at interpreter exit
            pass

    @staticmethod
    def _check(status):
        if status != 0:
            raise RuntimeError(f"cuBLAS status {status}")

    def matmul(self, A, B):
        if A.dtype != B.dtype or A.dtype.char not in "fd" or max(A.ndim, B.ndim) > 3:
            raise TypeError(f"direct cuBLAS product of {A.dtype}{A.shape} and {B.dtype}{B.shape}")
        if max(A.shape[-2:] + B.shape[-1:]) <= SMALL_GEMM_MAX:
            return self._small(A, B)
        A, B, shape, (opB, opA, n, m, k, ldB, sB, ldA, sA, ldC, sC, batch) = gemm_plan(A, B)
        C = self.cupy.empty(shape, dtype=A.dtype)
        ct, f32 = self.ct, A.dtype.char == "f"
        scalar = ct.c_float if f32 else ct.c_double
        one, zero = scalar(1.0), scalar(0.0)
        ptr = lambda M: ct.c_void_p(M.data.ptr)
        args = (self.handle, opB, opA, n, m, k, ct.byref(one), ptr(B), ldB)
        if batch == 1 and len(shape) == 2:
            gemm = self.lib.cublasSgemm_v2 if f32 else self.lib.cublasDgemm_v2
            self._check(gemm(*args, ptr(A), ldA, ct.byref(zero), ptr(C), ldC))
        else:
            gemm = self.lib.cublasSgemmStridedBatched if f32 else self.lib.cublasDgemmStridedBatched
            self._check(gemm(*args, ct.c_longlong(sB), ptr(A), ldA, ct.c_longlong(sA),
                             ct.byref(zero), ptr(C), ldC, ct.c_longlong(sC), batch))
        return C

    def _small(self, A, B):
        """A @ B for tiny (batches of) matrices: one thread per entry of the product,
        reading the operands through their strides (transposed and broadcast views)."""
        cp = self.cupy
        batch = max(A.shape[0] if A.ndim == 3 else 1, B.shape[0] if B.ndim == 3 else 1)
        (m, k), n = A.shape[-2:], B.shape[-1]
        C = cp.empty(((batch,) if max(A.ndim, B.ndim) == 3 else ()) + (m, n), dtype=A.dtype)
        steps = lambda M: [0 if M.ndim == 2 else M.strides[0] // M.itemsize] + \
            [st // M.itemsize for st in M.strides[-2:]]
        real = {"f": "float", "d": "double"}[A.dtype.char]
        kernel = _raw_kernel(cp, _SMALL_GEMM_SOURCE.replace("REAL", real), "small_gemm")
        args = (A, B, C, np.int64(C.size), np.int32(m), np.int32(n), np.int32(k),
                *map(np.int64, steps(A) + steps(B)))
        _launch_per_item(kernel, C.size, args)
        return C


# Products whose sides are all at most this use _DirectCublas._small inside a capture:
# cuBLAS's batched kernels cost several times more for thousands of 9 x 9 products.
SMALL_GEMM_MAX = 32
_SMALL_GEMM_SOURCE = r"""
extern "C" __global__ void small_gemm(const REAL* A, const REAL* B, REAL* C, const long long size,
                                      const int m, const int n, const int k,
                                      const long long a0, const long long a1, const long long a2,
                                      const long long b0, const long long b1, const long long b2) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= size) return;
    const long long b = t / ((long long)m * n);
    const int row = (int)((t / n) % m), col = (int)(t % n);
    const REAL* a = A + b * a0 + row * a1;
    const REAL* x = B + b * b0 + col * b2;
    REAL sum = 0;
    for (int p = 0; p < k; p++) sum += a[p * a2] * x[p * b1];
    C[t] = sum;
}
"""
_raw_kernels = {}


def _raw_kernel(cp, source, name, options=()):
    """A compiled CUDA kernel, built once per source text and options."""
    key = (cp, source, name, options)
    if key not in _raw_kernels:
        _raw_kernels[key] = cp.RawKernel(source, name, options=options)
    return _raw_kernels[key]


def _launch_per_item(kernel, count, args, threads=128):
    """Launch ``kernel`` with one CUDA thread per item (none for no item: CUDA refuses an
    empty grid)."""
    if count:
        kernel(((count + threads - 1) // threads,), (threads,), args)



def small_svd(cp, W):
    """Reduced SVDs (U, s, V) of a batch of small matrices on the GPU, float64, s
    descending: one CUDA thread per matrix runs one-sided Jacobi (Hestenes) to
    convergence, in one launch, in place of CuPy's batched svd (align_fast.SMALL_SVD_KERNEL_MAX
    chooses it).  One-sided Jacobi rotates the columns of A until every pair is orthogonal to
    rounding relative to their norms, so U is orthonormal and the singular values have
    small relative errors (Demmel and Veselic 1992); exactly zero columns are completed
    with coordinate vectors, as _complete does on the host."""
    wide = W.shape[-2] < W.shape[-1]
    A = cp.ascontiguousarray(W.swapaxes(-1, -2) if wide else W, dtype=np.float64)   # m x n, m >= n
    nb, m, n = A.shape
    U, s, V = A.copy(), cp.empty((nb, n), dtype=np.float64), cp.empty((nb, n, n), dtype=np.float64)
    kernel = _raw_kernel(cp, _SMALL_SVD_SOURCE, "small_svd")
    _launch_per_item(kernel, nb if n else 0, (U, s, V, np.int32(nb), np.int32(m), np.int32(n)))
    return (V, s, U) if wide else (U, s, V)


SMALL_SVD_MAX_SWEEPS = 40     # quadratic convergence: 16 x 16 matrices take ~10, graded ones ~15
_SMALL_SVD_SOURCE = r"""
extern "C" __global__ void small_svd(double* U, double* s, double* V,
                                     const int nb, const int m, const int n) {
    // Matrix b (m x n, m >= n, in U on entry): rotate pairs of its columns, and of V
    // (from the identity), until each pair p, q has |u_p . u_q| <= m eps |u_p| |u_q|;
    // then s_j = |u_j|, sorted descending with the columns, and u_j / s_j.  A column
    // that is exactly zero becomes the coordinate vector farthest from the columns
    // before it, made orthogonal to them.  (After MAX_SWEEPS, never reached in the tests,
    // A V = U diag(s) still holds: the rotations are orthogonal.)
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nb) return;
    double* u = U + (long long)b * m * n;
    double* v = V + (long long)b * n * n;
    double* sv = s + (long long)b * n;
    const double tol = m * 2.220446049250313e-16;
    double scale = 0.0;                          // entries scaled to at most 1: no under-
    for (int i = 0; i < m * n; i++)              // or overflow in the sums of squares
        scale = fabs(u[i]) > scale ? fabs(u[i]) : scale;
    for (int i = 0; i < m * n && scale > 0.0; i++) u[i] /= scale;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[i * n + j] = i == j ? 1.0 : 0.0;
    bool rotated = true;
    for (int sweep = 0; rotated && sweep < MAX_SWEEPS; sweep++) {
        rotated = false;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double alpha = 0.0, beta = 0.0, gamma = 0.0;
                for (int i = 0; i < m; i++) {
                    const double x = u[i * n + p], y = u[i * n + q];
                    alpha += x * x; beta += y * y; gamma += x * y;
                }
                if (fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) continue;
                rotated = true;
                const double zeta = (beta - alpha) / (2.0 * gamma);
                const double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                const double c = 1.0 / sqrt(1.0 + t * t), sn = c * t;
                for (int i = 0; i < m; i++) {
                    const double x = u[i * n + p], y = u[i * n + q];
                    u[i * n + p] = c * x - sn * y; u[i * n + q] = sn * x + c * y;
                }
                for (int i = 0; i < n; i++) {
                    const double x = v[i * n + p], y = v[i * n + q];
                    v[i * n + p] = c * x - sn * y; v[i * n + q] = sn * x + c * y;
                }
            }
    }
    for (int j = 0; j < n; j++) {
        double norm = 0.0;
        for (int i = 0; i < m; i++) norm += u[i * n + j] * u[i * n + j];
        sv[j] = sqrt(norm);
    }
    for (int j = 0; j < n; j++) {                         // selection sort, descending
        int top = j;
        for (int k = j + 1; k < n; k++) if (sv[k] > sv[top]) top = k;
        if (top == j) continue;
        const double x = sv[j]; sv[j] = sv[top]; sv[top] = x;
        for (int i = 0; i < m; i++) { const double y = u[i * n + j]; u[i * n + j] = u[i * n + top]; u[i * n + top] = y; }
        for (int i = 0; i < n; i++) { const double y = v[i * n + j]; v[i * n + j] = v[i * n + top]; v[i * n + top] = y; }
    }
    for (int j = 0; j < n; j++) {
        if (sv[j] > 0.0) {
            for (int i = 0; i < m; i++) u[i * n + j] /= sv[j];
            continue;
        }
        int best = 0;                                     // zero: complete (columns < j are
        double far = -1.0;                                // orthonormal; zero ones follow)
        for (int e = 0; e < m; e++) {                     // |e_e - P e_e|^2 = 1 - sum_k u_ek^2
            double near = 0.0;
            for (int k = 0; k < j; k++) near += u[e * n + k] * u[e * n + k];
            if (1.0 - near > far) { far = 1.0 - near; best = e; }
        }
        for (int i = 0; i < m; i++) u[i * n + j] = i == best ? 1.0 : 0.0;
        for (int pass = 0; pass < 2; pass++)              // twice: orthogonal to rounding
            for (int k = 0; k < j; k++) {
                double dot = 0.0;
                for (int i = 0; i < m; i++) dot += u[i * n + k] * u[i * n + j];
                for (int i = 0; i < m; i++) u[i * n + j] -= dot * u[i * n + k];
            }
        double norm = 0.0;
        for (int i = 0; i < m; i++) norm += u[i * n + j] * u[i * n + j];
        for (int i = 0; i < m; i++) u[i * n + j] /= sqrt(norm);
    }
    for (int j = 0; j < n; j++) sv[j] *= scale;
}
""".replace("MAX_SWEEPS", str(SMALL_SVD_MAX_SWEEPS))


def greedy_match(cp, C, room):
    """align_fast.greedy_match on the GPU: one CUDA thread per matrix, in one launch (the rounds
    take ~30 array operations and a wait for the GPU each)."""
    nb, p, m = C.shape
    C, value = cp.ascontiguousarray(C, dtype=np.float64), cp.empty((nb, p), dtype=np.float64)
    kernel = _raw_kernel(cp, _GREEDY_SOURCE, "greedy_match")
    _launch_per_item(kernel, nb if p else 0, (C, cp.ascontiguousarray(room, dtype=np.int64), value,
                                              np.int32(nb), np.int32(p), np.int32(m)))
    return value


_GREEDY_SOURCE = r"""
extern "C" __global__ void greedy_match(const double* C, long long* room, double* value,
                                        const int nb, const int p, const int m) {
    // Matrix b: as long as a row is free and a column has room, take the largest entry
    // of a free row and a column with room, the first in row-major order among equal
    // ones (NaN last): the entry the one-by-one greedy takes next.  value[r] == -1
    // marks a free row (entries are >= 0 or NaN); room is written.
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nb) return;
    const double* c = C + (long long)b * p * m;
    long long* cap = room + (long long)b * m;
    double* v = value + (long long)b * p;
    long long open = 0;
    for (int j = 0; j < m; j++) open += cap[j] > 0 ? cap[j] : 0;
    for (int r = 0; r < p; r++) v[r] = -1.0;
    for (long long left = open < p ? open : p; left > 0; left--) {
        int best = -1;
        double top = 0.0;
        for (int r = 0; r < p; r++) {
            if (v[r] != -1.0) continue;
            for (int j = 0; j < m; j++) {
                const double x = c[r * m + j];
                if (cap[j] > 0 && (best < 0 || x > top || (top != top && x == x))) {
                    best = r * m + j;
                    top = x;
                }
            }
        }
        v[best / m] = top;
        cap[best % m] -= 1;
    }
    for (int r = 0; r < p; r++)
        if (v[r] == -1.0) v[r] = 0.0;
}
"""



SV_KERNEL_MAX_DEPTH = 16
_SV_KERNEL_SOURCE = r"""
extern "C" __global__ void sv_dynamics(const double* sig0, const double* lam, const double* lamp,
                                       const double coef, const int d, const long long r,
                                       const long long cols, const long long steps,
                                       const long long every, double* out) {
    // One thread per direction (b, i): the d values sigma_j of column i of network b.
    // The operations of the NumPy loop in its order (compiled without fused
    // multiply-adds), so both give the same numbers.
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long base = (c / r) * d * r + c % r, record = cols * d;
    const double l = lam[c], lp = lamp[c];
    double s[MAX_DEPTH], others[MAX_DEPTH];
    for (int j = 0; j < d; j++) out[base + j * r] = s[j] = sig0[base + j * r];
    for (long long t = 1; t <= steps; t++) {
        double p = 1.0;
        for (int j = 0; j < d; j++) { others[j] = p; p = p * s[j]; }       // prefix products
        p = 1.0;
        for (int j = d - 1; j >= 0; j--) { others[j] = others[j] * p; p = p * s[j]; }
        const double g = lp - l * (others[0] * s[0]);
        for (int j = 0; j < d; j++) s[j] = s[j] + coef * others[j] * g;
        if (t % every == 0)
            for (int j = 0; j < d; j++) out[(t / every) * record + base + j * r] = s[j];
    }
}
""".replace("MAX_DEPTH", str(SV_KERNEL_MAX_DEPTH))


def sv_dynamics(cp, sig, lam, lam_prime, coef, steps, record_every):
    """singular_value_dynamics on the GPU: one CUDA thread runs all the steps of one
    direction.  A step is O(d) flops per direction, so launching its ~10 array
    operations step by step would cost microseconds each for nanoseconds of work."""
    batch, (d, r) = sig.shape[:-2], sig.shape[-2:]
    sig = cp.ascontiguousarray(sig)
    lam, lam_prime = (cp.ascontiguousarray(cp.broadcast_to(a, batch + (1, r))) for a in (lam, lam_prime))
    cols = sig.size // d
    out = cp.empty((steps // record_every + 1,) + sig.shape, dtype=sig.dtype)
    kernel = _raw_kernel(cp, _SV_KERNEL_SOURCE, "sv_dynamics", ("--fmad=false",))
    _launch_per_item(kernel, cols, (sig, lam, lam_prime, np.float64(coef), np.int32(d), np.int64(r),
                                    np.int64(cols), np.int64(steps), np.int64(record_every), out))
    return out

