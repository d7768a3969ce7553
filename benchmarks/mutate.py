"""Mutation testing: plant one small bug at a time in the library and see whether the tests
(or ``verify --quick``) notice.

    python benchmarks/mutate.py                      # align.py, structured.py, align_fast.py
    python benchmarks/mutate.py align.py --verify    # also: does verify --quick alone catch them?
    python benchmarks/mutate.py --list align.py      # the mutants, nothing run

How it works:
1. **Map.** The suite runs once under coverage, one context per test, so each line of the
   library knows the tests that execute it and how long they take (cached in
   results/mutation/map.json until a source or test file changes; needs ``pip install coverage``).
2. **Mutants.** Each site below gives one mutant, a copy of the module with one change:
   ``+``<->``-``, ``*``<->``/``, ``@``->``*``, a comparison's strictness or sense, ``and``<->``or``,
   a dropped unary minus or ``not``, a dropped ``.T``, ``max``<->``min``, ``argmax``<->``argmin``,
   a dropped ``abs``, ``True``<->``False``, an integer ``n`` -> ``n + 1``.  Docstrings,
   ``raise`` statements and messages are left alone.
3. **Run.** Each mutant runs the tests that cover its line, fastest first, stopping at the first
   failure (``pytest -x``), in a private copy of the tree, one copy per worker.  A failure, an
   error or a time-out (three times the tests' own time plus 30 s) kills it.  A mutant whose
   line no in-process test covers runs the whole suite (subprocess tests may reach it).
4. **Verdict.** Survivors listed in EQUIVALENT (a change that cannot alter behaviour, with the
   reason) are left out of the score: score = killed / (mutants - equivalent).  In align_fast
   these include "path choices": a mutated condition that only picks another of its exact
   paths (each tested equal to the reference) changes no result beyond rounding.

Results go to results/mutation/<module>.json and a table on stdout.  A full run of the three
modules takes about an hour on 2 cores; ``--sample N`` runs a fixed random N per module.
"""
import argparse
import ast
import concurrent.futures as futures
import hashlib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "mutation"
MODULES = ["align.py", "structured.py", "align_fast.py"]
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
        ast.MatMult: ast.Mult, ast.Pow: ast.Mult, ast.FloorDiv: ast.Mult,
        ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
        ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}
NAMES = {"max": "min", "min": "max", "argmax": "argmin", "argmin": "argmax",
         "maximum": "minimum", "minimum": "maximum", "amax": "amin", "amin": "amax"}
DROPPED_CALLS = {"abs"}

# Survivors that cannot change behaviour: (module, function, line, column, before, after) -> why.
RESHAPE = "NumPy reads any negative size in reshape as 'the rest': -2 is -1"
# align_fast chooses between exact paths that tests hold equal to the reference: a mutant
# that only changes the choice gives the same results (to rounding) by another path; a few
# more of its mutants change nothing at all.
PATH = {
    'grouping': "which grouping of Eq. (8)'s products (both exact, tested equal)",
    'one_module': 'every layer is on one array module',
    'rotate_back': 'whether the row-space path rotates the samples back (both exact, tested equal)',
    'hidden_basis': "whether layer 1's hidden basis is split off (both exact, tested equal)",
    'reduced_v': 'for n < k0 the reduced and the full V of X are the same n x n matrix',
    'split_threshold': 'the threshold for measuring from the split (else the direct measures, tested equal)',
    'to_numpy': 'to_numpy of a NumPy array is that array',
    'residuals_buffered': "whether a run's residuals are buffered (both tested equal, RESIDUALS_BYTES 0 and default)",
    'stacked': 'the stacked path needs every layer of one shape: W[0] and W[1] have it',
    'host_svd': 'host or device SVD (the same decomposition)',
    'svd_dispatch': 'how reduced_svds dispatches (one call, threads or the host: the same decompositions)',
    'square_gram': 'for a square A both Gram matrices give its SVD',
    'completion': "the completion threshold's boundary: a direction exactly at COMPLETION_MIN is kept either way to rounding",
    'greedy_rounds': 'where the greedy rounds finish one by one (both give the sequential greedy, tested)',
    'gpu_batch': 'whether a GPU batch stays on the GPU (CuPy only; the same measures)',
    'gpu_batch_min': 'the GPU batch size from which measures stay on the GPU (CuPy only)',
    'to_host': 'the host copy of arrays already on the host: the same arrays',
}

EQUIVALENT = {
    ('align.py', 'as_ussvd',
     'if s.ndim != 1 or s.shape[0] > min(U.shape[0], V.shape[0]):', 43,
     '0', '(1)'):
        'U is square (checked just above): U.shape[1] is U.shape[0]',
    ('align.py', 'ussvd_reorder',
     'U[:, :r], V[:, :r] = U[:, perm] * signs, V[:, perm]', 21,
     'U[:, perm] * signs', '(U[:, perm] / signs)'):
        'signs are +-1 (checked): dividing by them is multiplying',
    ('align.py', 'aligned_network',
     'm, n = bases[i].shape[0], bases[i - 1].shape[0]', 45,
     '0', '(1)'):
        'the bases are square (checked above): shape[1] is shape[0]',
    ('align.py', 'gram_commutators',
     'bound = 12 * (e[0] + e[1]) + 10 * np.finfo(float).eps * A.shape[0] ** 2', 64,
     '0', '(1)'):
        'A = W_i W_i^T is square: A.shape[1] is A.shape[0]',
    ('align.py', '_positions_from_plan',
     'free = [j for j in range(widths[i]) if held.get(j, -1) < i]', 52,
     '1', '(2)'):
        'i >= 0, so a missing j is free with the default -1 or -2 alike',
    ('align.py', '_joint_eigenvectors',
     '_, s, Vt = np.linalg.svd(outside, full_matrices=True)', 48,
     'True', '(False)'):
        'outside is k0 x dim(K) with k0 >= dim(K): its Vt is dim(K) x dim(K) with or without full_matrices',
    ('align.py', '_joint_eigenvectors',
     'return np.array(found).reshape(-1, S.shape[0]).T', 32,
     '1', '(2)'):
        RESHAPE,
    ('align.py', 'proposition4',
     'if X.shape[1] < X.shape[0] or np.linalg.matrix_rank(X) < X.shape[0]:', 24,
     '0', '(1)'):
        'n < k0 implies rank(X) <= n < k0: the rank test refuses the same X',
    ('align.py', '_adapt_clusters',
     'for size in np.unique(sizes[sizes > 1]):          # clusters of one size in one batched eigh', 28,
     'sizes > 1', '(sizes >= 1)'):
        'a cluster of one: the eigenvector of a 1 x 1 compression is [1], the row stays as it is',
    ('align.py', 'paired_costs',
     'in_b = np.add.reduceat(sq, starts, axis=1) if q else np.zeros((p, 0))', 66,
     '0', '(1)'):
        'never taken: after the swap p <= q, and q = 0 means p = 0, returned as None above',
    ("align.py", "_orthonormal_by_size",
     "return (Q * np.where(np.diagonal(R) < 0, -1.0, 1.0))[:, np.argsort(order)]", 41, "-1.0",
     "(1.0)"):
        "the sign of a witness column is free (usSVD values are signed): |off-diagonal| and "
        "the answer do not change",
    ("align.py", "_pairings.take",
     "elif o < len(fits) and sum(left[b] for b in fits[o:]) >= need:", 5, "o < len(fits)",
     "(o <= len(fits))"):
        "need > 0 in this branch, and at o == len(fits) the sum over no fits is 0 < need",
    ("align.py", "_assign_positions",
     "starting = [collections.Counter(b for a, b in intervals if a == i) for i in range(d + 1)]",
     86, "1", "(2)"):
        "one more empty Counter after the last space, never read",
    ("align_fast.py", "_greedy_by_maxima", "took = top >= 0", 7, "top >= 0", "(top > 0)"):
        "an open entry of 0 is a matrix's largest only when all its open entries are 0: taking "
        "it or not leaves every value of that matrix 0 (value starts at 0)",
    ("align_fast.py", "_greedy_one_by_one", "left = min(sum(free), sum(cap))", 7, "min", "(max)"):
        "left only ends the loop early: after min(free rows, capacity) takes no row or no "
        "column is left, so no later entry is taken",
    ("align.py", "_orthonormal_by_size",
     "return (Q * np.where(np.diagonal(R) < 0, -1.0, 1.0))[:, np.argsort(order)]", 8,
     "Q * np.where(np.diagonal(R) < 0, -1.0, 1.0)", "(Q / np.where(np.diagonal(R) < 0, -1.0, 1.0))"):
        "+-1 again: the same columns",
    ("align.py", "_adapt_clusters",
     "weights = np.repeat(1.0 + np.sqrt(2.0) * np.arange(1, b_sizes.size + 1) % 1.0, b_sizes)", 26,
     "np.sqrt(2.0) * np.arange(1, b_sizes.size + 1)", "(np.sqrt(2.0) / np.arange(1, b_sizes.size + 1))"):
        "any distinct weights in [1, 2) tell the B-clusters apart (the comment): sqrt(2)/k mod 1 "
        "are distinct too",
    ("align.py", "_joint_eigenvectors", "if np.linalg.norm(outside, 2) <= tol * scale_g:", 3,
     "np.linalg.norm(outside, 2) <= tol * scale_g", "(np.linalg.norm(outside, 2) < tol * scale_g)"):
        "at equality every singular value of outside is <= tol scale_g, so the null space taken "
        "next is all of K and the loop ends with the same K",
    ("align.py", "_joint_eigenvectors", "return np.array(found).reshape(-1, S.shape[0]).T", 43,
     "0", "(1)"):
        "S = X X^T is square",
    ("align_fast.py", "train",
     "not _cheaper_at_outputs(tuple(W.shape[-2:] for W in weights), X.shape[-1]):", 70, "-1", "(1)"):
        PATH['grouping'] + "; for a batch, whether it steps in place (bit for bit the same, tested)",
    ("align_fast.py", "_BatchSquaredLossSteps._arrays",
     "ps, m, dtype = self.ps, idx.size, self.ps[0].dtype", 42, "0", "(1)"):
        "train steps in place only when every layer has X's dtype",
    ("align_fast.py", "_reduced_svd",
     "if min(W.shape[-2:]) <= HOST_SVD_MAX:   # small: LAPACK on the host beats GPU solvers", 3,
     "min(W.shape[-2:]) <= HOST_SVD_MAX", "(min(W.shape[-2:]) < HOST_SVD_MAX)"):
        PATH['host_svd'],
    ("align_fast.py", "_reduced_svd",
     "if min(W.shape[-2:]) <= HOST_SVD_MAX:   # small: LAPACK on the host beats GPU solvers", 16,
     "2", "(3)"):
        PATH['host_svd'] + " (a batch's size joins the minimum)",
    ("align_fast.py", "reduced_svds",
     "(min(weights[0].shape[-2:]) <= HOST_SVD_MAX or keep and batched and xp is not np):", 23,
     "2", "(3)"):
        PATH['svd_dispatch'],
    ("align_fast.py", "reduced_svds",
     "svd = _reduced_svd(stacked.reshape((-1,) + stacked.shape[-2:]), keep)", 37, "1", "(2)"):
        RESHAPE,
    ("align_fast.py", "_complete",
     'rows = np.argsort((kept * kept).sum(axis=1), kind="stable")[:t]      # farthest from span',
     19, "kept * kept", "(kept / kept)"):
        "another choice of starting rows: any completion is an orthonormal basis of the zero "
        "singular values' space (the SVD leaves it free), else the complete QR takes over",
    ("align_fast.py", "_complete", "for _ in range(2):", 15, "2", "(3)"):
        "a third projection changes the completion by rounding only (two are orthogonal to it)",
    ("align_fast.py", "_complete",
     "U[:, missing] = Q if independent else _orth_complement(kept, U.shape[0])[:, :t]", 69, "0",
     "(1)"):
        "the complete QR runs only when some column is kept (with none, the coordinate vectors "
        "are independent), and then _orth_complement does not read k",
    ("align_fast.py", "_greedy_one_by_one", "flat = C.reshape(nb, -1)", 22, "1", "(2)"):
        RESHAPE,
    ("align_fast.py", "_greedy_rounds",
     "if Cs.size <= GREEDY_ONE_BY_ONE_MAX and xp is np:                   # small: finish", 3,
     "Cs.size <= GREEDY_ONE_BY_ONE_MAX", "(Cs.size < GREEDY_ONE_BY_ONE_MAX)"):
        PATH['greedy_rounds'],
    ("align.py", "_eigenspaces", "scale = max(abs(w).max(), np.finfo(float).tiny)", 12, "abs(w)", "(w)"):
        "S = X X^T is positive semi-definite (both callers): its largest |eigenvalue| is its "
        "largest eigenvalue",
    ("structured.py", "Structure.gram", "flat = self.rows * self.shape[1] + self.cols", 7,
     "self.rows * self.shape[1] + self.cols", "(self.rows * self.shape[1] - self.cols)"):
        "rows n - cols is another one-to-one numbering of the entries (cols < n): the same "
        "uniqueness test and the same B B^T",
    ("structured.py", "from_basis",
     "Q = np.linalg.qr(B[kept].T)[0] if kept else np.zeros((B.shape[1], 0))", 66, "0", "(1)"):
        "a zero column in Q projects nothing out",
    ("align_fast.py", "_descend",
     "del run.hist.steps[marks[0]:], run.hist.losses[marks[1]:]", 25, "0", "(1)"):
        "marks holds the two lengths, always equal: a step's number and loss are appended together",
    ("align_fast.py", "_advance",
     "worst = np.where(np.isfinite(losses), losses, -np.inf).max(axis=-1)", 64, "-1", "(1)"):
        "losses are 2-D here (steps x networks): axis 1 is axis -1",
    ("align_fast.py", "_advance", "worst[worst == -np.inf] = np.nan", 15, "-np.inf", "(np.inf)"):
        "a row without a finite loss stays -inf instead of NaN: non-finite either way for the "
        "stop, and such rows never reach the callback (it sees rows before the stop only)",
    ("align_fast.py", "_advance", "if j < end:", 3, "j < end", "(j <= end)"):
        "at j == end every record belongs to a step before the interrupt: the count covers "
        "them all and nothing is deleted",
    ("align_fast.py", "_StepRuns.launch", "def launch(self, n, keep=False):", 25, "False", "(True)"):
        "every caller passes keep; the default would only add a copy",
    ("align_fast.py", "_StepRuns.cancel", "self.open = False", 12, "False", "(True)"):
        "cancel is the runs' last use: Ctrl-C ends the loop",
    ("structured.py", 'Structure._coefficient_gradient',
     'return _sum_into(which, vals * G.reshape(-1)[flat], self.r, G.dtype)', 42, '1', '(2)'):
        RESHAPE,
    ("structured.py", 'Conv2d._patches',
     'with_zero = xp.concatenate([A, xp.zeros((1, A.shape[1]), dtype=A.dtype)])   # row p^2: 0', 41, '1', '(2)'):
        'index p^2 still points at a zero row; a second zero row is never indexed',
    ("align_fast.py", '_train_in_row_space',
     'xp, W10 = array_module(weights[0]), weights[0]', 31, '0', '(1)'):
        PATH['one_module'],
    ("align_fast.py", '_train_in_row_space',
     'rotated = squared or hidden >= ROTATE_BACK_MIN * Y.shape[-2]', 10, 'squared or hidden >= ROTATE_BACK_MIN * Y.shape[-2]', '(squared and hidden >= ROTATE_BACK_MIN * Y.shape[-2])'):
        PATH['rotate_back'],
    ("align_fast.py", '_train_in_row_space',
     'rotated = squared or hidden >= ROTATE_BACK_MIN * Y.shape[-2]', 21, 'hidden >= ROTATE_BACK_MIN * Y.shape[-2]', '(hidden > ROTATE_BACK_MIN * Y.shape[-2])'):
        PATH['rotate_back'],
    ("align_fast.py", '_train_in_row_space',
     'rotated = squared or hidden >= ROTATE_BACK_MIN * Y.shape[-2]', 31, 'ROTATE_BACK_MIN * Y.shape[-2]', '(ROTATE_BACK_MIN / Y.shape[-2])'):
        PATH['rotate_back'],
    ("align_fast.py", '_first_hidden_basis',
     'if len(weights) < 2 or W10.ndim != 2 or X.ndim != 2 or \\', 18, '2', '(3)'):
        PATH['hidden_basis'],
    ("align_fast.py", '_first_hidden_basis',
     'X.shape[1] + weights[1].shape[0] >= W10.shape[0]:', 0, 'X.shape[1] + weights[1].shape[0] >= W10.shape[0]', '(X.shape[1] + weights[1].shape[0] > W10.shape[0])'):
        PATH['hidden_basis'],
    ("align_fast.py", '_first_hidden_basis',
     'X.shape[1] + weights[1].shape[0] >= W10.shape[0]:', 0, 'X.shape[1] + weights[1].shape[0]', '(X.shape[1] - weights[1].shape[0])'):
        PATH['hidden_basis'],
    ("align_fast.py", '_rotated_samples',
     'R = _T(xp.linalg.svd(X, full_matrices=False)[2])             # n x n orthogonal', 38, 'False', '(True)'):
        PATH['reduced_v'],
    ("align_fast.py", '_split_first_layers',
     'tol = 1e3 * np.finfo(W10.dtype).eps * np.linalg.norm(W0, 2) ** 2', 38, 'np.linalg.norm(W0, 2) ** 2', '(np.linalg.norm(W0, 2) * 2)'):
        PATH['split_threshold'],
    ("align_fast.py", '_split_first_layers',
     'tol = 1e3 * np.finfo(W10.dtype).eps * np.linalg.norm(W0, 2) ** 2', 63, '2', '(3)'):
        PATH['split_threshold'],
    ("align_fast.py", '_split_first_layers',
     'if np.linalg.norm(G0Q - Qh @ (Qh.T @ G0Q), 2) > tol:', 3, 'np.linalg.norm(G0Q - Qh @ (Qh.T @ G0Q), 2) > tol', '(np.linalg.norm(G0Q - Qh @ (Qh.T @ G0Q), 2) >= tol)'):
        PATH['split_threshold'],
    ("align_fast.py", '_split_first_layers.split',
     'C = (to_numpy(ps[0]) if xp is np else ps[0]).astype(np.float64)   # A = Q^T W_1 = QtW0 + C Xh', 24, 'xp is np', '(xp is not np)'):
        PATH['to_numpy'],
    ("align_fast.py", '_split_first_layers.split',
     'if s[order[-1]] <= 1e-7 * s[order[0]]:', 3, 's[order[-1]] <= 1e-7 * s[order[0]]', '(s[order[-1]] < 1e-07 * s[order[0]])'):
        PATH['split_threshold'],
    ("align_fast.py", '_SquaredLossSteps.__init__',
     'small = self.longest * Y.size * Y.itemsize <= RESIDUALS_BYTES', 8, 'self.longest * Y.size', '(self.longest / Y.size)'):
        PATH['residuals_buffered'],
    ("align_fast.py", '_SquaredLossSteps._run',
     'grads = [(deltas, self.stack[:-1].swapaxes(1, 2), self.grad.reshape(len(W), *W[0].shape))]', 79, '0', '(1)'):
        PATH['stacked'],
    ("align_fast.py", '_reduced_svd',
     'if min(W.shape[-2:]) <= HOST_SVD_MAX:   # small: LAPACK on the host beats GPU solvers', 3, 'min', '(max)'):
        PATH['host_svd'],
    ("align_fast.py", 'reduced_svds',
     'batched = weights[0].ndim == 3', 29, '3', '(4)'):
        PATH['svd_dispatch'],
    ("align_fast.py", 'reduced_svds',
     'if same and (len(weights) > 1 or batched) and \\', 13, 'len(weights) > 1', '(len(weights) >= 1)'):
        PATH['svd_dispatch'],
    ("align_fast.py", 'reduced_svds',
     '(min(weights[0].shape[-2:]) <= HOST_SVD_MAX or keep and batched and xp is not np):', 47, 'keep and batched and xp is not np', '(keep or batched or xp is not np)'):
        PATH['svd_dispatch'],
    ("align_fast.py", '_svd_by_gram',
     'wide = A.shape[-2] < A.shape[-1]', 7, 'A.shape[-2] < A.shape[-1]', '(A.shape[-2] <= A.shape[-1])'):
        PATH['square_gram'],
    ("align_fast.py", '_complete',
     'independent = t and np.abs(np.diagonal(R)).min() > COMPLETION_MIN', 20, 'np.abs(np.diagonal(R)).min() > COMPLETION_MIN', '(np.abs(np.diagonal(R)).min() >= COMPLETION_MIN)'):
        PATH['completion'],
    ("align_fast.py", '_greedy_rounds',
     'if Cs.size <= GREEDY_ONE_BY_ONE_MAX and xp is np:                   # small: finish', 3, 'Cs.size <= GREEDY_ONE_BY_ONE_MAX and xp is np', '(Cs.size <= GREEDY_ONE_BY_ONE_MAX or xp is np)'):
        PATH['greedy_rounds'],
    ("align_fast.py", 'Tracker.__init__',
     'self.keep = weights_0[0].ndim == 3 and weights_0[0].shape[0] >= GPU_BATCH_MIN  # GPU: stays', 33, '3', '(4)'):
        PATH['gpu_batch'],
    ("align_fast.py", 'Tracker.__init__',
     'self.keep = weights_0[0].ndim == 3 and weights_0[0].shape[0] >= GPU_BATCH_MIN  # GPU: stays', 39, 'weights_0[0].shape[0] >= GPU_BATCH_MIN', '(weights_0[0].shape[0] > GPU_BATCH_MIN)'):
        PATH['gpu_batch'],
    ("align_fast.py", '',
     'GPU_BATCH_MIN = 64', 16, '64', '(65)'):
        PATH['gpu_batch_min'],
    ("align_fast.py", '_to_host',
     'if xp is np:', 3, 'xp is np', '(xp is not np)'):
        PATH['to_host'],
    ('align_fast.py', '',
     'GRAPH_STEPS = 100', 14, '100', '(101)'):
        "steps per CUDA graph launch (CuPy only): a run is the same steps however many one launch holds",
    ('align_fast.py', '_check',
     'align.check_schedule(lr if np.ndim(lr) == 0 else float(lr.max()), max_steps, record_every,', 55, 'lr.max', '(lr.min)'):
        "train passes network_rates' array, each rate already checked positive and finite (gradient_descent takes one number)",
    ('align_fast.py', '',
     'AT_OUTPUTS_GAIN = 2', 18, '2', '(3)'):
        PATH['grouping'],
    ('align_fast.py', '',
     'HOST_EIGH_MAX = 128', 16, '128', '(129)'):
        "host or device eigh for layer 1's split (CuPy only; the same decomposition)",
    ('align_fast.py', '_linalg',
     'threads = min(_CORES, A.shape[0] // THREADED_BATCH_MIN) if small else 1', 30, '0', '(1)'):
        PATH['svd_dispatch'] + " (how many threads share a batch; each matrix's result is the same, tested)",
    ('align_fast.py', '_linalg',
     'if threads < 2:', 3, 'threads < 2', '(threads <= 2)'):
        PATH['svd_dispatch'] + " (how many threads share a batch; each matrix's result is the same, tested)",
    ('align_fast.py', '_linalg',
     'if threads < 2:', 13, '2', '(3)'):
        PATH['svd_dispatch'] + " (how many threads share a batch; each matrix's result is the same, tested)",
    ('align_fast.py', '_reduced_svd',
     'if max(W.shape[-2:]) <= SMALL_SVD_KERNEL_MAX:', 3, 'max', '(min)'):
        "which GPU SVD of a batch kept there (align_cuda's kernel or CuPy's batched svd; CuPy only, the same decomposition)",
    ('align_fast.py', '_reduced_svd',
     'if W.dtype == xp.float32 and min(W.shape[-2:]) > 1:', 29, 'min', '(max)'):
        "a float32 layer with one row or column (a vector): LAPACK's SVD or the Gram matrix, both its norm and direction to float32 rounding",
    ('align_fast.py', '_reduced_svd',
     'if W.dtype == xp.float32 and min(W.shape[-2:]) > 1:', 29, 'min(W.shape[-2:]) > 1', '(min(W.shape[-2:]) >= 1)'):
        "a float32 layer with one row or column (a vector): LAPACK's SVD or the Gram matrix, both its norm and direction to float32 rounding",
    ('align_fast.py', 'reduced_svds',
     'if same and (len(weights) > 1 or batched) and \\', 13, 'len(weights) > 1 or batched', '(len(weights) > 1 and batched)'):
        PATH['svd_dispatch'],
    ('align_fast.py', 'Tracker.__init__',
     'self.keep = weights_0[0].ndim == 3 and weights_0[0].shape[0] >= GPU_BATCH_MIN', 12, 'weights_0[0].ndim == 3', '(weights_0[0].ndim != 3)'):
        PATH['gpu_batch'],
    ('align_fast.py', 'singular_value_dynamics',
     'align.singular_value_dynamics(sig, lam, lam_prime, lr, n, 0, kind, kd, record_every)', 58, '0', '(1)'):
        "a call that only checks the inputs (its result is discarded): 0 or 1 steps (CuPy only)",
}


@dataclass
class Mutant:
    module: str
    function: str
    line: int
    before: str
    after: str
    start: tuple
    end: tuple
    text: str = ""              # the line, stripped, and the mutant's column in it
    column: int = 0
    status: str = ""
    verify: str = ""
    seconds: float = 0.0

    @property
    def key(self):
        return key_of(asdict(self))


def key_of(record):
    """(module, function, the line's code, the column in it, before, after): the same
    mutant when lines move or their comments change."""
    return (record["module"], record["function"], _code(record["text"]), record["column"],
            record["before"], record["after"])


def _code(text):
    """A line without its trailing comment."""
    return text.split("  #")[0].rstrip()


# ------------------------------------------------------------------ mutants --

def _skipped(tree):
    """ids of nodes never mutated: docstrings, raise statements, f-strings, annotations."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            skip.update(id(n) for n in ast.walk(node))
        for name in ("returns", "annotation"):
            if getattr(node, name, None) is not None:
                skip.update(id(n) for n in ast.walk(getattr(node, name)))
    return skip


def _changes(node):
    """(the node that is replaced, its replacement) for each mutation of ``node``."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP:
        yield node, _with(node, op=SWAP[type(node.op)]())
    elif isinstance(node, ast.BoolOp):
        yield node, _with(node, op=SWAP[type(node.op)]())
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAP:
                ops = list(node.ops)
                ops[i] = SWAP[type(op)]()
                yield node, _with(node, ops=ops)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        yield node, node.operand
    elif isinstance(node, ast.Attribute) and node.attr == "T":
        yield node, node.value
    elif isinstance(node, ast.Attribute) and node.attr in NAMES:
        yield node, _with(node, attr=NAMES[node.attr])
    elif isinstance(node, ast.Name) and node.id in NAMES and isinstance(node.ctx, ast.Load):
        yield node, ast.Name(NAMES[node.id], ast.Load())
    elif isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords and \
            getattr(node.func, "id", getattr(node.func, "attr", None)) in DROPPED_CALLS:
        yield node, node.args[0]
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield node, ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield node, ast.Constant(node.value + 1)


def _with(node, **fields):
    new = type(node)(**{f: getattr(node, f) for f in node._fields})
    for name, value in fields.items():
        setattr(new, name, value)
    return new


def _functions(tree):
    """Each node's enclosing function, as a dotted name."""
    owner = {}

    def visit(node, name):
        for child in ast.iter_child_nodes(node):
            inner = name
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{name}.{child.name}" if name else child.name
            owner[id(child)] = inner
            visit(child, inner)
    visit(tree, "")
    return owner


SOURCES = {}         # module -> its text when its mutants were made (edits after do not count)


def mutants(module):
    """Every mutant of one module, in source order."""
    source = SOURCES.setdefault(module, (ROOT / module).read_text())
    tree = ast.parse(source)
    skip, owner = _skipped(tree), _functions(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        for old, new in _changes(node):
            before = ast.get_source_segment(source, old)
            after = ast.unparse(new)
            if isinstance(old, ast.expr):
                after = f"({after})"
            line = source.splitlines()[old.lineno - 1]
            found.append(Mutant(module, owner.get(id(node), ""), old.lineno, before, after,
                                (old.lineno, old.col_offset), (old.end_lineno, old.end_col_offset),
                                line.strip(), old.col_offset - (len(line) - len(line.lstrip()))))
    return sorted(found, key=lambda m: (m.start, m.after))


def mutated_source(mutant):
    lines = SOURCES[mutant.module].splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutant.start, mutant.end
    head = "".join(lines[:l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + "".join(lines[l1:])
    return head + mutant.after + tail


# ---------------------------------------------------------------------- map --

class ContextPerTest:
    """pytest plugin: one coverage context per test, and each test's duration."""

    def __init__(self):
        import coverage
        self.cov = coverage.Coverage.current()
        self.seconds = {}

    def pytest_runtest_setup(self, item):
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_teardown(self, item):
        self.cov.switch_context("")

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration


def _fingerprint():
    files = sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/**/*.py")])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def coverage_map():
    """{"seconds": {test: s}, "lines": {module: {line: [tests]}}} from one traced run."""
    path = OUT / "map.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["fingerprint"] == _fingerprint():
            return cached
    OUT.mkdir(parents=True, exist_ok=True)
    print("mapping lines to tests (one traced run of the suite)...", flush=True)
    data_file = OUT / ".coverage"
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
                    f"--include={','.join(str(ROOT / m) for m in MODULES)}",
                    str(Path(__file__)), "--trace-suite"], cwd=ROOT)   # (timing tests may fail traced)
    import coverage
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    lines = {}
    for module in MODULES:
        by_line = data.contexts_by_lineno(str(ROOT / module))
        lines[module] = {str(k): sorted(c for c in v if c) for k, v in by_line.items()}
    result = {"fingerprint": _fingerprint(), "lines": lines,
              "seconds": json.loads((OUT / "seconds.json").read_text())}
    path.write_text(json.dumps(result))
    return result


def trace_suite():
    sys.path.insert(0, str(ROOT))
    plugin = ContextPerTest()
    code = pytest.main(["-q", "-p", "no:cacheprovider"], plugins=[plugin])
    (OUT / "seconds.json").write_text(json.dumps(plugin.seconds))
    sys.exit(int(code))


# ---------------------------------------------------------------------- run --

def _copy_tree(dest):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def _tests_for(mutant, cmap, longest):
    """The tests that run the mutant's lines and take at most ``longest`` seconds, fastest
    first (``cmap["only"]``: those given by --tests instead)."""
    if "only" in cmap:
        return cmap["only"]
    (l0, _), (l1, _) = mutant.start, mutant.end
    tests = set()
    for line in range(l0, l1 + 1):
        tests.update(cmap["lines"][mutant.module].get(str(line), []))
    seconds = cmap["seconds"]
    return sorted((t for t in tests if seconds.get(t, 0.0) <= longest), key=lambda t: seconds.get(t, 0.0))


def _run(command, cwd, timeout):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        done = subprocess.run(command, cwd=cwd, env=env, timeout=timeout,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return "survived" if done.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "killed"          # (a time-out: an endless loop or a far slower program)


def run_mutant(mutant, tree, cmap, with_verify, longest):
    start = time.perf_counter()
    path = tree / mutant.module
    original = SOURCES[mutant.module]
    path.write_text(mutated_source(mutant))
    try:
        tests = _tests_for(mutant, cmap, longest)
        budget = 30 + 3 * sum(cmap["seconds"].get(t, 1.0) for t in tests) if tests else 900
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   *(tests or ["tests"])]
        mutant.status = _run(command, tree, budget)
        if with_verify:
            mutant.verify = _run([sys.executable, "experiments.py", "verify", "--quick"], tree, 120)
    finally:
        path.write_text(original)
    if mutant.status == "survived" and mutant.key in _equivalent():
        mutant.status = "equivalent"
    mutant.seconds = time.perf_counter() - start
    return mutant


def run_all(found, cmap, workers, with_verify, longest):
    trees = queue.Queue()
    base = Path(tempfile.mkdtemp(prefix="mutate-"))
    for i in range(workers):
        _copy_tree(base / str(i))
        trees.put(base / str(i))

    def one(mutant):
        tree = trees.get()
        try:
            return run_mutant(mutant, tree, cmap, with_verify, longest)
        finally:
            trees.put(tree)
    record = "only" not in cmap                    # (a --tests check keeps no record)
    for module in {m.module for m in found} if record else ():
        (OUT / f"{module[:-3]}.partial.jsonl").unlink(missing_ok=True)
    try:
        with futures.ThreadPoolExecutor(workers) as pool:
            for done, mutant in enumerate(pool.map(one, found), 1):
                print(f"[{done}/{len(found)}] {mutant.status:10} {mutant.verify:8} "
                      f"{mutant.seconds:5.1f}s {mutant.module}:{mutant.line} {mutant.before!r} -> "
                      f"{mutant.after!r}", flush=True)
                if record:
                    with open(OUT / f"{mutant.module[:-3]}.partial.jsonl", "a") as f:
                        f.write(json.dumps(asdict(mutant)) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def score(found):
    counted = [m for m in found if m.status != "equivalent"]
    killed = sum(m.status == "killed" for m in counted)
    return killed, len(counted)


def report(found, module, with_verify):
    killed, counted = score(found)
    line = f"{module}: {len(found)} mutants, {len(found) - counted} equivalent, " \
           f"killed {killed} of {counted} ({100 * killed / max(counted, 1):.1f}%)"
    if with_verify:
        by_verify = sum(m.verify == "killed" for m in found if m.status != "equivalent")
        line += f"; verify --quick alone kills {by_verify} ({100 * by_verify / max(counted, 1):.1f}%)"
    print(line)
    for m in found:
        if m.status == "survived":
            print(f"  survived {m.module}:{m.line} in {m.function}: {m.before!r} -> {m.after!r}")
    return line


def _equivalent():
    """EQUIVALENT's keys as key_of makes them (comments dropped)."""
    return {(m, f, _code(t), c, b, a) for m, f, t, c, b, a in EQUIVALENT}


def print_scores(modules):
    """The last run of each module, scored with EQUIVALENT as it is now."""
    lines = []
    for module in modules:
        path = OUT / f"{module[:-3]}.json"
        if not path.exists():
            continue
        found = [Mutant(**r) for r in json.loads(path.read_text())]
        for m in found:
            if m.status == "survived" and m.key in _equivalent():
                m.status = "equivalent"
        lines.append(report(found, module, any(m.verify for m in found)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=MODULES, help="modules to mutate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--verify", action="store_true", help="also run verify --quick per mutant")
    parser.add_argument("--sample", type=int, help="a fixed random N mutants per module")
    parser.add_argument("--lines", help="only mutants on lines A-B (e.g. 120-180)")
    parser.add_argument("--rerun", action="store_true",
                        help="only the mutants that survived the last run of each module")
    parser.add_argument("--max-test-seconds", type=float, default=3.0,
                        help="leave out tests slower than this (the end-to-end fault sweeps); "
                             "a mutant killed only by them counts as surviving (default 3)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="run these tests (pytest ids) on every mutant instead of the mapped "
                             "ones: a quick check that a new test kills given mutants")
    parser.add_argument("--score", action="store_true",
                        help="print the scores of the last runs (EQUIVALENT as it is now); run nothing")
    parser.add_argument("--trace-suite", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace_suite:
        return trace_suite()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {MODULES}")
    if args.score:
        return print_scores(args.modules)
    cmap = None if args.list else {"only": args.tests, "seconds": {}} if args.tests else coverage_map()
    summary = []
    for module in args.modules:
        found = mutants(module)
        if args.lines:
            lo, hi = map(int, args.lines.split("-"))
            found = [m for m in found if lo <= m.line <= hi]
        if args.rerun:
            last = {key_of(m): m["status"]
                    for m in json.loads((OUT / f"{module[:-3]}.json").read_text())}
            found = [m for m in found if last.get(m.key) == "survived"]
        elif args.sample and args.sample < len(found):
            found = sorted(random.Random(0).sample(found, args.sample), key=lambda m: m.start)
        if args.list:
            for m in found:
                print(f"{module}:{m.line} {m.function}: {m.before!r} -> {m.after!r}")
            print(f"{module}: {len(found)} mutants")
            continue
        if args.rerun:
            previous = json.loads((OUT / f"{module[:-3]}.json").read_text())
            rerun = {m.key: m for m in found}
            run_all(found, cmap, args.workers, args.verify, args.max_test_seconds)
            found = [rerun.get(key_of(p)) or Mutant(**p)
                     for p in previous]
            (OUT / f"{module[:-3]}.json").write_text(json.dumps([asdict(m) for m in found], indent=1))
            summary.append(report(found, module, args.verify))
            continue
        run_all(found, cmap, args.workers, args.verify, args.max_test_seconds)
        if not args.tests:
            (OUT / f"{module[:-3]}.json").write_text(json.dumps([asdict(m) for m in found], indent=1))
        summary.append(report(found, module, args.verify))
    print("\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())
