"""Layers constrained to a subspace of matrices (Section 5, Appendices H-K).

A layer structure S (Definition 4) is a subspace of R^{m x n} with a basis
{A_1, ..., A_r}; a structured layer is W = sum_j c_j A_j and gradient descent
runs on the coefficients c.  Bases are stored as index patterns (the nonzero
entries of every A_j), never as r dense matrices, so a 28 x 28 convolution's
784 x 784 matrix exists only when asked for.

A structured network is a list ``structures`` (a Structure, or None for a dense
layer) with a list ``params`` (coefficient vectors, or dense matrices), in the
notation of align.py: X is k0 x n, Y is kd x n.
"""
import math
import operator

import numpy as np

import align

__all__ = ["Structure", "Conv2d", "conv2d", "toeplitz", "circulant", "diagonal", "banded", "mask",
           "from_basis", "layer_matrices", "check_structured", "loss_and_gradients", "train",
           "alignment_impossible"]

def _sum_into(index, values, size, dtype):
    """out[i] = sum of values[index == i] for i < size (a scatter-add), in dtype."""
    return align.array_module(values).bincount(index, weights=values, minlength=size).astype(dtype)


class Structure:
    """A layer structure S subset R^{m x n} (Definition 4) with basis A_j given by index patterns.

    Entry e of the pattern says A_{which[e]}[rows[e], cols[e]] = vals[e]."""

    def __init__(self, shape, rows, cols, vals, which, r, name):
        self.shape, self.r, self.name = tuple(shape), int(r), name
        self.rows, self.cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        self.vals, self.which = np.asarray(vals, np.float64), np.asarray(which, np.int64)
        self._gram = None
        self._on = {}

    def __repr__(self):
        return f"{self.name}: {self.shape[0]}x{self.shape[1]} matrices, r = {self.r}"

    def _pattern(self, xp):
        """The index pattern as arrays of module xp (cached)."""
        if xp.__name__ not in self._on:
            flat = self.rows * self.shape[1] + self.cols
            self._on[xp.__name__] = tuple(xp.asarray(a) for a in (flat, self.vals, self.which))
        return self._on[xp.__name__]

    def _check_coefficients(self, c, what="c"):
        """c converted (align.as_array) and checked: r finite coefficients."""
        c = align.as_array(what, c)
        if c.ndim != 1 or c.shape[0] != self.r:
            raise ValueError(f"{what} must be the {self.r} coefficients of {self.name}, got shape "
                             f"{'x'.join(map(str, c.shape))}")
        align.check_finite(what, c)
        return c

    def _check_matrix(self, G, what="G"):
        """G converted and checked: an m x n matrix."""
        G = align.as_array(what, G)
        if G.shape != self.shape:
            raise ValueError(f"{what} must be {self.shape[0]} x {self.shape[1]} for {self.name}, "
                             f"got {'x'.join(map(str, G.shape))}")
        return G

    def to_matrix(self, c):
        """W = sum_j c_j A_j (m x n)."""
        return self._to_matrix(self._check_coefficients(c))

    def _to_matrix(self, c):
        flat, vals, which = self._pattern(align.array_module(c))
        return _sum_into(flat, vals * c[which], self.shape[0] * self.shape[1], c.dtype).reshape(self.shape)

    def coefficient_gradient(self, G):
        """(<G, A_j>)_j: dL/dc from dL/dW (the chain rule of Appendix H)."""
        return self._coefficient_gradient(self._check_matrix(G))

    def _coefficient_gradient(self, G):
        flat, vals, which = self._pattern(align.array_module(G))
        return _sum_into(which, vals * G.reshape(-1)[flat], self.r, G.dtype)

    def gram(self):
        """<A_j, A_k> (r x r, NumPy)."""
        if self._gram is None:
            flat = self.rows * self.shape[1] + self.cols
            if np.unique(flat).size == flat.size:      # disjoint supports: orthogonal basis
                self._gram = np.diag(np.bincount(self.which, self.vals ** 2, self.r))
            else:
                B = np.zeros((self.r, self.shape[0] * self.shape[1]))
                np.add.at(B, (self.which, flat), self.vals)
                self._gram = B @ B.T
        return self._gram

    def pi(self, G):
        """pi_S(G) = sum_j <G, A_j> A_j (Theorem 2): the projection onto S followed by
        a scaling of each basis direction when the A_j are not orthonormal (footnote 3)."""
        return self._to_matrix(self.coefficient_gradient(G))

    def coefficients(self, W, tol=1e-8):
        """c with W = sum_j c_j A_j; ValueError if W is not in S (relative tolerance)."""
        W = self._check_matrix(W, "W")
        xp = align.array_module(W)
        c = xp.asarray(np.linalg.solve(self.gram(), align.to_numpy(self._coefficient_gradient(W))))
        c = c.astype(W.dtype)
        gap = float(xp.linalg.norm(W - self._to_matrix(c)))
        if gap > tol * max(float(xp.linalg.norm(W)), 1e-300):
            raise ValueError(f"W is not in {self.name}: its distance to S is {gap:.3g}")
        return c

    def project(self, G):
        """The orthogonal projection of G onto S."""
        G = self._check_matrix(G)
        xp = align.array_module(G)
        a = np.linalg.solve(self.gram(), align.to_numpy(self._coefficient_gradient(G)))
        return self._to_matrix(xp.asarray(a, dtype=G.dtype))

    # the products of a network's passes (``product``: the matrix product, A @ B); subclasses
    # may avoid forming the matrix
    def matmul(self, c, A, product=operator.matmul):
        """W A for W = sum_j c_j A_j."""
        return product(self._to_matrix(c), A)

    def rmatmul(self, c, D, product=operator.matmul):
        """W^T D."""
        return product(self._to_matrix(c).T, D)

    def outer_gradient(self, delta, act, product=operator.matmul):
        """(<delta act^T, A_j>)_j: the coefficient gradient of a layer with input act."""
        return self._coefficient_gradient(product(delta, act.T))


class Conv2d(Structure):
    """One s x s filter on p x p images (Fig. 2b), row-major, stride 1, zero padding (s-1)/2.

    Coefficient c[a*s + b] multiplies input pixel (y + a - h, x + b - h) for output
    pixel (y, x), h = (s-1)/2: cross-correlation, as deep-learning frameworks compute.
    Appendix I writes the true convolution (flipped filter); both span the same
    s^2-dimensional subspace, with coefficients reversed.  Products with images
    gather the s^2 shifted images (im2col) and never form the p^2 x p^2 matrix."""

    def __init__(self, p, s):
        for name, value in (("image size p", p), ("filter size s", s)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"conv2d needs an {name} that is an integer >= 1, got {value!r}")
        if s % 2 == 0:
            raise ValueError(f"conv2d needs an odd filter size s (padding (s-1)/2), got s = {s}")
        if s > 2 * p - 1:
            raise ValueError(f"conv2d({p}, {s}): a filter wider than 2p - 1 = {2 * p - 1} has taps "
                             f"that never meet a {p} x {p} image; use s <= {2 * p - 1}")
        self.p, self.s, self.h = p, s, (s - 1) // 2
        rows, cols, which = [], [], []
        y, x = np.divmod(np.arange(p * p), p)
        for a in range(s):
            for b in range(s):
                yy, xx = y + a - self.h, x + b - self.h
                ok = (yy >= 0) & (yy < p) & (xx >= 0) & (xx < p)
                rows.append(np.flatnonzero(ok))
                cols.append(yy[ok] * p + xx[ok])
                which.append(np.full(ok.sum(), a * s + b))
        rows, cols, which = map(np.concatenate, (rows, cols, which))
        super().__init__((p * p, p * p), rows, cols, np.ones(rows.size), which, s * s,
                         f"conv2d(p={p}, s={s})")

    def _patches(self, A):
        """im2col: the s^2 shifted copies of the zero-padded images A (p^2 x n), s^2 x p^2 x n."""
        xp = align.array_module(A)
        if A.ndim != 2 or A.shape[0] != self.p * self.p:
            raise ValueError(f"{self.name} acts on {self.p * self.p} x n arrays of images, got "
                             f"{'x'.join(map(str, A.shape))}")
        with_zero = xp.concatenate([A, xp.zeros((1, A.shape[1]), dtype=A.dtype)])   # row p^2: 0
        return with_zero[self._taps(xp)]

    def _taps(self, xp):
        """For tap (a, b) and output pixel (y, x): the input pixel (y + a - h, x + b - h),
        or p^2 (a zero row) where that falls in the padding (cached)."""
        key = xp.__name__ + " taps"
        if key not in self._on:
            y, x = np.divmod(np.arange(self.p * self.p), self.p)
            a, b = np.divmod(np.arange(self.s * self.s), self.s)
            yy, xx = y[None] + a[:, None] - self.h, x[None] + b[:, None] - self.h
            inside = (yy >= 0) & (yy < self.p) & (xx >= 0) & (xx < self.p)
            self._on[key] = xp.asarray(np.where(inside, yy * self.p + xx, self.p * self.p))
        return self._on[key]

    def matmul(self, c, A, product=operator.matmul):
        """W A = sum over taps of c_tap times the shifted images (never forms W)."""
        return product(c[None], self._patches(A).reshape(self.r, -1)).reshape(A.shape)

    def rmatmul(self, c, D, product=operator.matmul):
        """W^T D: the transpose of a correlation is the correlation with the filter rotated
        by 180 degrees, i.e. the coefficients reversed."""
        return self.matmul(c[::-1], D, product)

    def outer_gradient(self, delta, act, product=operator.matmul):
        """(<delta act^T, A_j>)_j: each tap's shifted images against delta (Appendix H)."""
        return product(self._patches(act).reshape(self.r, -1), delta.reshape(-1, 1))[:, 0]


def conv2d(p, s):
    """The s^2-dimensional subspace of p^2 x p^2 matrices of one s x s filter (Appendix I).

    Parameters
    ----------
    p : int
        The image side (the layer is p^2 x p^2).
    s : int
        The filter side (odd, at most 2p - 1).

    Returns
    -------
    Conv2d
        The structure of 2-D convolutions with zero padding.

    Raises
    ------
    ValueError
        Sizes that are not integers or too large.
    """
    return Conv2d(p, s)


def _diagonals(k, offsets, name):
    """Structure whose j-th basis matrix is the all-ones diagonal at offsets[j] (col - row)."""
    rows, cols, which = [], [], []
    for j, off in enumerate(offsets):
        i = np.arange(max(0, -off), min(k, k - off))
        rows.append(i)
        cols.append(i + off)
        which.append(np.full(i.size, j))
    rows, cols, which = map(np.concatenate, (rows, cols, which))
    return Structure((k, k), rows, cols, np.ones(rows.size), which, len(offsets), name)


def _check_size(name, k):
    """ValueError unless k (the side of the k x k matrices of structure ``name``) is >= 1."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} needs a matrix size k >= 1 (an integer), got {k!r}")


def toeplitz(k):
    """k x k Toeplitz matrices (constant along diagonals), r = 2k - 1 (Fig. 2a).

    Parameters
    ----------
    k : int
        The side (ValueError unless a positive integer).
    """
    _check_size("toeplitz", k)
    return _diagonals(k, list(range(-(k - 1), k)), f"toeplitz({k})")


def diagonal(k):
    """k x k diagonal matrices, r = k (a sparse connection pattern, Definition 4).

    Parameters
    ----------
    k : int
        The side (ValueError unless a positive integer).
    """
    _check_size("diagonal", k)
    return mask(np.eye(k, dtype=bool), f"diagonal({k})")


def circulant(k):
    """k x k circulant matrices, r = k: A_j[i, (i + j) mod k] = 1 (a layer structure,
    Definition 4; circular convolutions).

    Parameters
    ----------
    k : int
        The side (ValueError unless a positive integer).
    """
    _check_size("circulant", k)
    i = np.arange(k)
    rows = np.tile(i, k)
    which = np.repeat(i, k)
    return Structure((k, k), rows, (rows + which) % k, np.ones(k * k), which, k, f"circulant({k})")


def banded(k, width):
    """k x k matrices with free entries where |i - j| <= width (a sparse connection
    pattern, Definition 4).

    Parameters
    ----------
    k : int
        The side.
    width : int
        Diagonals on each side of the main one.

    Returns
    -------
    Structure
        k x k banded matrices.

    Raises
    ------
    ValueError
        Sizes out of range.
    """
    _check_size("banded", k)
    if width < 0:
        raise ValueError(f"banded needs width >= 0, got {width}")
    i, j = np.indices((k, k))
    return mask(np.abs(i - j) <= width, f"banded({k}, width={width})")


def mask(pattern, name=None):
    """Matrices with free entries where ``pattern`` is True, zero elsewhere (Section 5.1).

    Parameters
    ----------
    pattern : array of bool
        The allowed entries (sparse connections).
    name : str, optional

    Returns
    -------
    Structure
        Matrices supported on the pattern.

    Raises
    ------
    ValueError
        Not a 2-D boolean pattern.
    """
    pattern = np.asarray(pattern)
    if pattern.ndim != 2 or pattern.dtype != bool:
        raise ValueError(f"mask needs a 2-D boolean pattern, got dtype {pattern.dtype}, "
                         f"shape {pattern.shape}")
    rows, cols = np.nonzero(pattern)
    return Structure(pattern.shape, rows, cols, np.ones(rows.size), np.arange(rows.size),
                     rows.size, name or f"mask({pattern.shape[0]}x{pattern.shape[1]}, r={rows.size})")


def from_basis(matrices, tol=1e-10):
    """Structure spanned by any list of linearly independent m x n matrices.  Definition 4
    takes an orthogonal basis; with any other, coefficient GD still moves W by
    -lr pi(G) (Structure.pi), which is then no longer a scaled projection (Theorem 2).

    Linearly dependent matrices raise ValueError naming them (remove them and retry).

    Parameters
    ----------
    matrices : list of arrays
        A basis {A_j} of the subspace (linearly independent, one shape).
    tol : float
        Entries below tol are zero.

    Returns
    -------
    Structure
        The subspace they span.

    Raises
    ------
    ValueError
        Matrices of different shapes or linearly dependent.
    """
    mats = [align.to_numpy(align.as_array(f"matrices[{j}]", A)).astype(np.float64)
            for j, A in enumerate(matrices)]
    if not mats or any(A.shape != mats[0].shape or A.ndim != 2 for A in mats):
        raise ValueError("from_basis needs a non-empty list of matrices of one shape m x n")
    B = np.stack([A.ravel() for A in mats])
    dependent, kept = [], []
    for j in range(len(mats)):
        Q = np.linalg.qr(B[kept].T)[0] if kept else np.zeros((B.shape[1], 0))
        rest = B[j] - Q @ (Q.T @ B[j])
        if np.linalg.norm(rest) <= tol * max(np.linalg.norm(B[j]), 1e-300):
            dependent.append(j)
        else:
            kept.append(j)
    if dependent:
        raise ValueError(f"basis matrices {dependent} are linear combinations of the others; "
                         f"drop them (r would be {len(kept)})")
    which, flat = np.nonzero(B)
    m, n = mats[0].shape
    return Structure((m, n), flat // n, flat % n, B[which, flat], which, len(mats),
                     f"span of {len(mats)} matrices")


# --------------------------------------------------------- structured nets --

def layer_matrices(structures, params):
    """The dense layer matrices [W_1, ..., W_d], W_i = sum_j c_j^i A_j (Definition 4):
    ``structures`` a Structure per layer (None: a dense layer), ``params`` the coefficient
    vectors (r,) of structured layers and the matrices of dense ones."""
    return [S._to_matrix(S._check_coefficients(p, f"params[{i}]")) if S is not None
            else align.as_array(f"params[{i}]", p) for i, (S, p) in enumerate(zip(structures, params))]


def check_structured(structures, params, X):
    """A structured network (Definition 4) converted (align.as_array) and checked: one
    parameter array per layer of the right size (r coefficients, or a dense matrix where the
    structure is None), finite, and X (k0 x n) that fits.  Returns (params, X, kd)."""
    if len(structures) != len(params) or not params:
        raise ValueError(f"need one parameter array per layer: {len(structures)} structures, "
                         f"{len(params)} params")
    X = align.as_array("X", X)
    if X.ndim != 2:
        raise ValueError(f"X must be k0 x n (one example per column), got shape {X.shape}")
    align.check_finite("X", X)
    k, out = X.shape[0], []
    for i, (S, p) in enumerate(zip(structures, params), 1):
        name = f"params[{i - 1}]"
        if S is None:
            p = align.as_array(name, p)
            if p.ndim != 2 or p.shape[1] != k:
                raise ValueError(f"dense layer W_{i} must have {k} columns, got shape "
                                 f"{'x'.join(map(str, p.shape))}")
            align.check_finite(name, p)
            k = p.shape[0]
        else:
            p = S._check_coefficients(p, name)
            if S.shape[1] != k:
                raise ValueError(f"layer {i} ({S.name}) takes {S.shape[1]} inputs but gets {k}")
            k = S.shape[0]
        out.append(p)
    return out, X, k


def loss_and_gradients(structures, params, X, Y, kind="mse"):
    """The loss and [dL/dc_1, ..., dL/dc_d] (dense layers: dL/dW_i), written by hand: Eq. (8)'s
    backward pass, each structured layer contracting its dense gradient delta_i a_{i-1}^T
    with its basis (Appendix H) without forming it; by Theorem 2 the coefficient step is
    W_i <- W_i - lr pi_S(dL/dW_i).  Arguments as in :func:`check_structured` and align.loss."""
    params, X, kd = check_structured(structures, params, X)
    return _loss_and_gradients(structures, params, X, align.as_targets(Y, kind, kd, X.shape[1]), kind)


def _loss_and_gradients(structures, params, X, Y, kind, matmul=operator.matmul):
    """loss_and_gradients for checked inputs and prepared targets; ``matmul``: the matrix
    product (align_fast's CUDA graphs pass cuBLAS called directly)."""
    acts = [X]
    for S, p in zip(structures, params):
        acts.append(matmul(p, acts[-1]) if S is None else S.matmul(p, acts[-1], matmul))
    L, delta = align.loss_and_output_gradient(acts[-1], Y, kind)
    grads = [None] * len(params)
    for i in range(len(params) - 1, -1, -1):
        S, p = structures[i], params[i]
        grads[i] = matmul(delta, acts[i].T) if S is None else S.outer_gradient(delta, acts[i], matmul)
        if i:
            delta = matmul(p.T, delta) if S is None else S.rmatmul(p, delta, matmul)
    return L, grads


def train(structures, params, X, Y, kind="mse", lr=1e-2, max_steps=10_000, tol=1e-4,
          record_every=1, measure_every=100, measures=None, callback=None,
          descend=align.gradient_descent):
    """Gradient descent on the coefficients (Definition 4); by Theorem 2 this is
    W_i <- W_i - lr pi_S(dL/dW_i).

    Parameters
    ----------
    structures, params, X
        As in :func:`check_structured`; ``params`` are the start (not changed).
    Y, kind, lr, max_steps, tol, record_every, measure_every, callback
        As in align.train.
    measures : dict or callable, optional
        As in align.train, given the dense matrices (layer_matrices).
    descend : callable
        align.gradient_descent, or align_fast.gradient_descent (the same iterates, faster).

    Returns
    -------
    params, History
        The trained coefficients, and what the run recorded.

    Raises
    ------
    align.DivergenceError, align.Interrupted
        As align.gradient_descent (``.weights``: the coefficients).
    """
    params, X, kd = check_structured(structures, params, X)
    Y = align.as_targets(Y, kind, kd, X.shape[1]).astype(params[0].dtype)
    wrapped = {name: (lambda ps, p0, fn=fn: fn(layer_matrices(structures, ps),
                                               layer_matrices(structures, p0)))
               for name, fn in align.as_measures(measures).items()}

    def loss_and_grads(ps, matmul=operator.matmul):
        return _loss_and_gradients(structures, ps, X, Y, kind, matmul)
    return descend(params, loss_and_grads, lr, max_steps, tol, record_every, measure_every,
                   wrapped, callback)


# ------------------------------------------------ Proposition 5, Theorem 3 --

def alignment_impossible(r, k, n):
    """Proposition 5's bound r < k - 1 - C(k - n, 2), with C(m, 2) = 0 for m < 2.

    True when matrices (k x n) that align with an element of an r-dimensional
    subspace of k x k matrices form a null set, so a structured network that
    interpolates generic data with n >= k cannot be aligned (Theorem 3).

    Parameters
    ----------
    r : int
        The dimension of the layer structure.
    k : int
        The width (k x k layers).
    n : int
        The number of examples.

    Returns
    -------
    bool
        r < k - 1 - C(k - n, 2).

    Raises
    ------
    ValueError
        Arguments that are not integers >= 0.
    """
    for name, value in (("r", r), ("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"alignment_impossible needs {name} as an integer >= 0, got {value!r}")
    m = k - n
    return r < k - 1 - (math.comb(m, 2) if m >= 2 else 0)
