"""The library's boundary as users meet it: the arrays they have (lists, integer arrays,
objects with __array__ such as tensors) give the numbers of float64 arrays; the kinds that
cannot be numbers (float16, complex, object, strings, ragged lists) are refused naming the
argument; and a fuzz of the public API with random shapes and values allows only a result,
ValueError, TypeError or DivergenceError."""
import math

import numpy as np
import pytest

import align
import align_fast
import structured as st


class Tensor:
    """Stands in for a PyTorch CPU tensor or a pandas frame: an object with __array__ only."""

    def __init__(self, a):
        self.a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


AS_GIVEN = {"list": lambda a: a.tolist(), "int": lambda a: a.astype(np.int64), "tensor": Tensor}

# Integer-valued float64 data, so that an integer array holds the same numbers.
W = [np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]), np.array([[1.0, 0.0, 2.0]])]
W2 = [np.array([[2.0, 1.0], [0.0, 1.0], [1.0, -1.0]]), np.array([[1.0, 1.0, 2.0]])]
X = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, -1.0, 1.0]])
Y = np.array([[1.0, -1.0, 1.0, 1.0]])
SQ = [np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[1.0, -1.0], [2.0, 1.0]])]
I2, P2 = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])
SIG = np.array([[1.0, 2.0], [2.0, 1.0]])
LAM = np.array([2.0, 1.0])
COEF = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
G3 = np.arange(9.0).reshape(3, 3)
MS = np.stack([np.diag([1.0, 2.0]), np.diag([3.0, -1.0])])
S3 = st.toeplitz(3)

# (name, function, {argument: array or list of arrays}, other keyword arguments)
CASES = [
    ("forward", align.forward, {"weights": W, "X": X}, {}),
    ("loss", align.loss, {"weights": W, "X": X, "Y": Y}, {"kind": "logistic"}),
    ("gradients", align.gradients, {"weights": W, "X": X, "Y": Y}, {}),
    ("layer_gradients", align.layer_gradients, {"weights": W, "X": X, "dF": Y}, {}),
    ("train", align.train, {"weights": W, "X": X, "Y": Y}, {"lr": 0.01, "max_steps": 20}),
    ("gradient_descent", align.gradient_descent, {"params": W},
     {"loss_and_grads": lambda ps: align.loss_and_gradients(ps, X, Y, "mse"), "max_steps": 5}),
    ("ussvd", align.ussvd, {"A": G3}, {}),
    ("ussvd_matrix", align.ussvd_matrix, {"U": I2, "s": LAM, "V": P2}, {}),
    ("ussvd_reorder", align.ussvd_reorder, {"U": I2, "s": LAM, "V": P2}, {"perm": [1, 0], "signs": [1, -1]}),
    ("rect_diag", align.rect_diag, {"s": LAM}, {"m": 3, "n": 2}),
    ("aligned_network", align.aligned_network, {"bases": [I2, P2, I2], "sigmas": [LAM, LAM]}, {}),
    ("is_aligned", align.is_aligned, {"weights": SQ}, {}),
    ("invariance_certificate", align.invariance_certificate, {"X": X, "Y": X}, {"widths": [2, 2, 2]}),
    ("sensing_certificate", align.sensing_certificate, {"Ms": MS}, {}),
    ("aligned_init", align.aligned_init, {"U": P2, "V": I2, "sigmas": [LAM, LAM]}, {"widths": [2, 2, 2]}),
    ("singular_value_dynamics", align.singular_value_dynamics,
     {"sigmas0": SIG, "lam": LAM, "lam_prime": LAM}, {"lr": 0.01, "n": 4, "steps": 5}),
    ("prop2_learning_rate", align.prop2_learning_rate, {"sigmas0": SIG, "lam": LAM, "lam_prime": LAM},
     {"n": 4}),
    ("balanced_factorization", align.balanced_factorization, {"P": SQ[0]}, {}),
    ("proposition4", align.proposition4, {"weights": SQ, "X": X, "Y": SQ[1] @ SQ[0] @ X}, {}),
    ("alignment", align.alignment, {"weights": W}, {"how": "matched"}),
    ("invariance", align.invariance, {"weights_t": W2, "weights_0": W}, {}),
    ("tracker", lambda weights_0, now: align.tracker(weights_0)(now), {"weights_0": W, "now": W2}, {}),
    ("fast train", align_fast.train, {"weights": W, "X": X, "Y": Y}, {"lr": 0.01, "max_steps": 20}),
    ("fast gradient_descent", align_fast.gradient_descent, {"params": W},
     {"loss_and_grads": lambda ps: align.loss_and_gradients(ps, X, Y, "mse"), "max_steps": 5}),
    ("fast alignment", align_fast.alignment, {"weights": W}, {}),
    ("fast invariance", align_fast.invariance, {"weights_t": W2, "weights_0": W}, {"how": "matched"}),
    ("fast tracker", lambda weights_0, now: align_fast.tracker(weights_0)(now), {"weights_0": W, "now": W2}, {}),
    ("fast singular_value_dynamics", align_fast.singular_value_dynamics,
     {"sigmas0": SIG, "lam": LAM, "lam_prime": LAM}, {"lr": 0.01, "n": 4, "steps": 5}),
    ("to_matrix", S3.to_matrix, {"c": COEF}, {}),
    ("coefficient_gradient", S3.coefficient_gradient, {"G": G3}, {}),
    ("pi", S3.pi, {"G": G3}, {}),
    ("project", S3.project, {"G": G3}, {}),
    ("coefficients", S3.coefficients, {"W": S3.to_matrix(COEF)}, {}),
    ("from_basis", lambda matrices: st.from_basis(matrices).to_matrix(np.ones(2)),
     {"matrices": [I2, P2]}, {}),
    ("layer_matrices", st.layer_matrices, {"params": [COEF, G3]}, {"structures": [S3, None]}),
    ("structured loss_and_gradients", st.loss_and_gradients, {"params": [COEF, G3], "X": G3, "Y": G3},
     {"structures": [S3, None]}),
    ("structured train", st.train, {"params": [np.array([0.0, 1.0, 1.0, 1.0, 0.0]), np.eye(3)],
                                    "X": np.eye(3), "Y": G3},
     {"structures": [S3, None], "lr": 0.01, "max_steps": 5}),
]


def given(value, convert):
    """An argument in another form: each array of a list of arrays, or the array."""
    return [convert(a) for a in value] if isinstance(value, list) else convert(value)


def numbers(result):
    """The numbers of a result, flat: arrays, floats, tests, certificates, histories, dicts."""
    if isinstance(result, (list, tuple)):
        return [x for r in result for x in numbers(r)]
    if isinstance(result, dict):
        return [x for k in sorted(result) for x in numbers(result[k])]
    if isinstance(result, align.History):
        return numbers([result.losses, result.measurements, result.final_step])
    if isinstance(result, align.AlignmentTest):
        return [float(result.aligned), result.residual]
    if isinstance(result, align.Certificate):
        return numbers([float(result.ok), result.lam, result.lam_prime, result.residual])
    if isinstance(result, (bool, int, float, np.number)):
        return [float(result)]
    return np.asarray(result, dtype=float).ravel().tolist()


@pytest.mark.parametrize("name, fn, arrays, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", list(AS_GIVEN))
def test_lists_integers_and_array_objects_give_the_float64_numbers(name, fn, arrays, options, form):
    want = numbers(fn(**arrays, **options))
    for argument in arrays:
        got = numbers(fn(**{**arrays, argument: given(arrays[argument], AS_GIVEN[form])}, **options))
        np.testing.assert_allclose(got, want, rtol=0, atol=0, err_msg=f"{name}: {argument} as {form}")


REFUSED = {"float16": lambda a: a.astype(np.float16), "complex": lambda a: a.astype(complex),
           "object": lambda a: a.astype(object), "strings": lambda a: a.astype(str),
           "ragged": lambda a: [list(row) for row in a.reshape(len(a), -1)][:-1] + [[1.0]]
           if a.ndim > 1 else [[1.0, 2.0], [3.0]]}


def argument_names(argument, value):
    """The names an error may give for ``argument``: its own, or (for a list of layers or
    arrays) W_i or argument[i]."""
    if argument in ("weights", "weights_0", "weights_t", "now"):
        return ["W_1"]
    return [argument, f"{argument}[0]"]


@pytest.mark.parametrize("name, fn, arrays, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_kinds_that_are_not_real_numbers_are_refused_naming_the_argument(name, fn, arrays, options, kind):
    for argument, value in arrays.items():
        bad = [REFUSED[kind](value[0])] + value[1:] if isinstance(value, list) else REFUSED[kind](value)
        with pytest.raises(ValueError) as e:
            fn(**{**arrays, argument: bad}, **options)
        assert any(n in str(e.value) for n in argument_names(argument, value)), (argument, str(e.value))


# ------------------------------------------------------------ clear errors (§2) --
def test_a_tracker_refuses_layers_it_was_not_built_for():
    three = [np.eye(3)] * 3
    with pytest.raises(ValueError, match="this tracker was built for layers"):
        align.train([np.eye(3)] * 2, np.eye(3), np.eye(3), max_steps=2, measures=align.tracker(three))
    with pytest.raises(ValueError, match="built for layers"):
        align.tracker([np.eye(3), np.eye(3)])([np.ones((4, 3)), np.ones((3, 4))])
    with pytest.raises(ValueError, match="built for layers"):
        align.tracker([np.eye(3)])([np.eye(3), np.eye(3)])
    with pytest.raises(ValueError, match="built for layers"):
        align_fast.train([np.eye(3)] * 2, np.eye(3), np.eye(3), max_steps=2,
                         measures=align_fast.tracker(three))


@pytest.mark.parametrize("call, message", [
    (lambda: align.train(W, X, Y, lr="0.1"), "lr must be a number"),
    (lambda: align_fast.train(W, X, Y, lr="0.1"), "lr must be a number"),
    (lambda: align.prop2_learning_rate([], [], [], 5), "sigmas0 must be d x r"),
    (lambda: align.forward([np.ones((2, 3, 2))], np.ones((2, 2, 4))), "align.py takes one network"),
    (lambda: align_fast.train([np.ones((2, 3, 2))], np.ones((3, 2, 4)), np.ones((3, 3, 4)), max_steps=1),
     "X holds data for 3 networks but the batch has B = 2"),
    (lambda: align.proposition4([np.ones((2, 3, 3))] * 2, np.eye(3), np.eye(3)), "takes one network"),
    (lambda: align.singular_value_dynamics(SIG, LAM, LAM, 0.1, 4, steps=-3), "steps must be an integer >= 0"),
    (lambda: align.loss([np.ones((0, 3))], np.ones((3, 2)), np.ones((0, 2)), "mse_mean"), "no outputs"),
    (lambda: align.gradients([np.ones((0, 3))], np.ones((3, 2)), np.ones((0, 2)), "mse_mean"), "no outputs"),
    (lambda: align.train([np.ones((0, 3))], np.ones((3, 2)), np.ones((0, 2)), "mse_mean"), "no outputs"),
    (lambda: st.train([S3], [[1, 2, 3, 4, 5]], np.eye(3), np.eye(3), max_steps=1) and
     st.train([S3], [np.ones(5, np.float16)], np.eye(3), np.eye(3)), "params\\[0\\] must hold real"),
    (lambda: st.train([S3], [COEF], np.eye(3, dtype=np.float16), np.eye(3)), "X must hold real"),
    # found by a review that called every public function as a new user would
    (lambda: align.aligned_init(np.eye(2), np.eye(3), [3, 4, 2], chain=[np.eye(3)]), "chain must be d - 1"),
    (lambda: align.aligned_init(np.eye(2), np.eye(3), [3, 2], dtype="int32"), "dtype must be float32"),
    (lambda: align.aligned_init(np.eye(2), np.eye(3), [3, 2], scale="1"), "scale must be a number"),
    (lambda: align.gradient_descent([np.ones(2)] * 2, lambda ps: (0.0, ps[:1])), "returned 1 gradients for 2"),
    (lambda: align_fast.gradient_descent([np.ones(2)] * 2, lambda ps: (0.0, ps[:1])), "returned 1 gradients"),
    (lambda: align.gradient_descent(np.ones(3), lambda ps: (0.0, ps)), "params must be a list"),
    (lambda: align.train(W, X, Y, callback=3), "callback must be a function"),
    (lambda: align_fast.train(W, X, Y, callback=3), "callback must be a function"),
    (lambda: align.ussvd_matrix(np.eye(3), np.ones(4), np.eye(3)), "s must be a vector of at most"),
    (lambda: align.ussvd_reorder(np.eye(3), np.ones(3), np.eye(3), [0, 1], [1, 1]), "perm must be a permutation"),
    (lambda: align.ussvd_reorder(np.eye(3), np.ones(3), np.eye(3), [0, 1, 2], [1, 2, 1]), "signs must be 3"),
    (lambda: align.rect_diag(np.ones(4), 2, 3), "s must be a vector of at most min"),
    (lambda: align.rect_diag(np.ones(2), "2", 3), "m must be an integer"),
    (lambda: align.aligned_network([np.eye(2), np.ones((2, 3))], [np.ones(2)]), r"bases\[1\] must be a square"),
    (lambda: align.singular_value_dynamics(SIG, LAM[:1], LAM, 0.1, 4, steps=3), "lam, lam_prime of length r"),
    (lambda: align.singular_value_dynamics(SIG, LAM, LAM, "0.1", 4, steps=3), "lr must be a number"),
    (lambda: align.singular_value_dynamics(SIG, LAM, LAM, 0.1, 4, 3, "mse_mean", kd="2"), "kd must be an integer"),
    (lambda: align.invariance_certificate(np.eye(3), np.eye(3), 3), "widths must be a list"),
    (lambda: align.invariance_certificate(np.eye(3), np.eye(3), [3, 2.5, 3]), "widths must be a list"),
    (lambda: align.invariance_certificate(np.eye(3), np.eye(3), [3, 3], tol="x"), "tol must be a number"),
    (lambda: align.balanced_factorization(np.eye(3), hidden="3"), "hidden must be an integer"),
    (lambda: align.balanced_factorization(np.eye(3), W=np.ones((2, 2))), "W must be an orthogonal"),
    (lambda: align.balanced_factorization(np.eye(3), W=2 * np.eye(3)), "not orthogonal"),
    (lambda: align.prop2_learning_rate(SIG, LAM, LAM, "5"), "n must be an integer"),
    (lambda: align.prop2_learning_rate(SIG, -LAM, LAM, 5), "lam must be eigenvalues"),
    (lambda: align.proposition4(SQ, np.eye(2), np.ones((3, 2))), "Y kd = 2"),
    (lambda: align_fast.train([W[0][None]] * 1 + [W[1][None]], X, Y, lr=["a"]), "lr must be a number or one"),
    (lambda: align_fast.gradient_descent([np.ones((2, 2, 2))], lambda ps: (0.0, ps), lr=[0.1, 0.2]),
     "takes one lr"),                           # (it applied the list along the last axis)
])
def test_every_bad_input_gets_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_structured_train_converts_list_and_integer_coefficients():
    a = st.train([S3], [[1, 2, 3, 4, 5]], np.eye(3, dtype=int), np.eye(3), lr=0.001, max_steps=5)[0]
    b = st.train([S3], [COEF], np.eye(3), np.eye(3), lr=0.001, max_steps=5)[0]
    np.testing.assert_array_equal(a[0], b[0])


def test_is_aligned_takes_the_tolerance_of_the_dtype():
    """An aligned float32 network (aligned_init) is rejected at 1e-8 (its rounding is 1e-6),
    accepted at the default tolerance, which follows the least precise layer: 1000 eps."""
    rng = np.random.default_rng(0)
    U, V = (np.linalg.qr(rng.standard_normal((6, 6)))[0] for _ in range(2))
    weights = align.aligned_init(U, V, [6, 6, 6, 6], seed=1, dtype=np.float32)
    assert not align.is_aligned(weights, tol=1e-8)
    assert align.is_aligned(weights) and align.default_tol(weights) == pytest.approx(
        1000 * np.finfo(np.float32).eps)
    assert align.default_tol([W.astype(float) for W in weights]) == 1e-8


# -------------------------------------------------------------------------- fuzz --
def fuzz_array(rng, shape, kind):
    """A random array of ``shape`` of one of the kinds a user might pass."""
    a = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)
    if kind == "zeros":
        return np.zeros(shape)
    if kind in ("nan", "inf") and a.size:
        a.flat[rng.integers(a.size)] = np.nan if kind == "nan" else np.inf
    if kind == "huge":
        return a * 1e200
    if kind == "tiny":
        return a * 1e-200
    if kind == "float32":
        return a.astype(np.float32)
    if kind == "int":
        return np.rint(a).astype(int)
    if kind == "float16":
        return a.astype(np.float16)
    return a


KINDS = ("plain", "zeros", "nan", "inf", "huge", "tiny", "float32", "int", "float16")
ALLOWED = (ValueError, TypeError, align.DivergenceError)


def fuzz_calls(rng):
    """One random call of the public API: (label, function of no arguments)."""
    d = int(rng.integers(1, 4))
    widths = [int(k) for k in rng.integers(0, 5, d + 1)]
    n = int(rng.integers(0, 5))
    kind = KINDS[rng.integers(len(KINDS))]
    weights = [fuzz_array(rng, (widths[i + 1], widths[i]), kind) for i in range(d)]
    X, Y = fuzz_array(rng, (widths[0], n), kind), fuzz_array(rng, (widths[-1], n), kind)
    batch = [np.stack([W, W]) for W in weights]
    loss = ("mse", "mse_mean", "ce", "logistic", "exp")[rng.integers(5)]
    r = max(1, min(widths))
    S = st.toeplitz(max(1, widths[0]))
    return [
        ("forward", lambda: align.forward(weights, X)),
        ("loss", lambda: align.loss(weights, X, Y, loss)),
        ("gradients", lambda: align.gradients(weights, X, Y, loss)),
        ("train", lambda: align.train(weights, X, Y, loss, lr=0.01, max_steps=3)),
        ("fast train", lambda: align_fast.train(weights, X, Y, loss, lr=0.01, max_steps=3)),
        ("fast train batch", lambda: align_fast.train(batch, X, Y, loss, lr=[0.01, 0.02], max_steps=3)),
        ("alignment", lambda: align.alignment(weights, ("paired", "matched")[rng.integers(2)])),
        ("fast alignment", lambda: align_fast.alignment(batch)),
        ("invariance", lambda: align.invariance(weights, weights)),
        ("fast invariance", lambda: align_fast.invariance(batch, batch, "matched")),
        ("tracker", lambda: align.tracker(weights)(weights)),
        ("fast tracker", lambda: align_fast.tracker(batch)(batch)),
        ("is_aligned", lambda: align.is_aligned(weights, tol=float(10.0 ** -rng.integers(2, 12)))),
        ("ussvd", lambda: align.ussvd(X)),
        ("certificate", lambda: align.invariance_certificate(X, Y, widths)),
        ("balanced", lambda: align.balanced_factorization(X)),
        ("dynamics", lambda: align.singular_value_dynamics(fuzz_array(rng, (d, r), kind), np.ones(r),
                                                           np.ones(r), 0.01, max(n, 1), 3)),
        ("prop2", lambda: align.prop2_learning_rate(np.abs(fuzz_array(rng, (d, r), kind)),
                                                    np.ones(r), np.ones(r), max(n, 1))),
        ("structured", lambda: st.train([S, None], [fuzz_array(rng, S.r, kind), weights[0]],
                                        fuzz_array(rng, (S.shape[1], n), kind), Y, lr=0.01,
                                        max_steps=2)),
    ]


def test_a_fuzz_of_the_public_api_gives_results_or_clear_errors():
    """300 random problems (widths 0-4, n 0-4, zeros, NaN, inf, huge, tiny, float32,
    integers, float16), each through every public entry point: a result, or ValueError,
    TypeError or DivergenceError, and nothing else (no IndexError, ZeroDivisionError,
    LinAlgError, UFuncTypeError...)."""
    rng = np.random.default_rng(20261207)
    failures = []
    with np.errstate(all="ignore"):
        for trial in range(300):
            for label, call in fuzz_calls(rng):
                try:
                    call()
                except ALLOWED:
                    pass
                except Exception as exc:                 # noqa: BLE001 - what the test looks for
                    failures.append(f"trial {trial} {label}: {type(exc).__name__}: {exc}"[:300])
    assert failures == []
