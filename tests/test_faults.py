"""Faults a user meets: bad input (CLI and library) gives a message naming the problem and
leaves earlier results alone; Ctrl-C, a second Ctrl-C, SIGTERM and a full disk leave a
consistent set of files (or the earlier one)."""
import errno
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import align
import align_fast
import experiments
import outputs
import runner
import structured as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder):
    """{name: bytes} of every file in folder."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A results folder holding a complete fig2a --quick run and a complete full fig1a run."""
    out = tmp_path_factory.mktemp("results")
    assert experiments.main(["fig2a", "--quick", "--out", str(out), "-q"]) == 0
    assert experiments.main(["thm3", "--out", str(out), "-q"]) == 0
    return out


def mnist_folder(tmp_path, images=None, labels=None):
    """A --mnist folder with the given idx bytes (valid two-image files by default)."""
    good_images = runner.idx_bytes(np.zeros((2, 28, 28), np.uint8))
    good_labels = runner.idx_bytes(np.array([3, 7], np.uint8))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(good_images if images is None else images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(good_labels if labels is None else labels)
    return str(tmp_path)


CLI_CASES = [   # (arguments, exit status, message on stderr)
    (["fig1a", "--seed", "-1"], 2, "must be an integer >= 0"),
    (["fig1a", "--mnist", "MNIST"], 2, "--mnist does not apply to fig1a"),
    (["thm1", "--init", "random"], 2, "--init does not apply to thm1"),
    (["fig2a", "--loss-scale", "paper", "--init", "random", "--mnist", "MNIST"], 2, "--mnist does not apply"),
    (["all", "--quick", "--mnist", "/nonexistent"], 1, "--mnist /nonexistent: no such directory"),
    (["prop1", "--quick", "--mnist", "SHORT"], 1, "truncated: its header needs 16 bytes"),
    (["prop1", "--quick", "--mnist", "LABELS"], 1, "labels must be digits 0..9, found 12"),
    (["fig1a", "--seeds", "10000000"], 1, "a run may use 80% of the"),
    (["fig1a", "--quick", "--lr", "50"], 1, "smaller learning rate"),
    (["fig1a", "--max-steps", "0"], 2, "must be a positive integer"),
]


@pytest.mark.parametrize("args, status, message", CLI_CASES)
def test_bad_command_lines_are_refused_and_leave_results_alone(args, status, message, earlier, tmp_path,
                                                               capsys):
    for name in ("good", "short", "labels"):
        (tmp_path / name).mkdir()
    folders = {"MNIST": mnist_folder(tmp_path / "good"),
               "SHORT": mnist_folder(tmp_path / "short", images=b"\x00\x00\x08\x03\x00\x00\x00\x02"),
               "LABELS": mnist_folder(tmp_path / "labels",
                                      labels=runner.idx_bytes(np.array([3, 12], np.uint8)))}
    args = [folders.get(a, a) for a in args]
    before = snapshot(earlier)
    try:
        code = experiments.main([*args, "--out", str(earlier), "-q"])
    except SystemExit as exc:                                  # argparse's usage errors
        code = exc.code
    assert code == status
    assert message in capsys.readouterr().err
    assert snapshot(earlier) == before


def test_experiment_help_shows_its_options_and_defaults(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["thm3", "--help"])
    text = capsys.readouterr().out
    assert "learning rate (default 0.1)" in text and "(default 1e-10)" in text
    assert "--mnist" not in text and "--init" not in text and "--loss-scale" not in text
    with pytest.raises(SystemExit):
        experiments.main(["fig1b", "--help"])
    text = capsys.readouterr().out
    assert "--mnist" in text and "--init" in text and "default float32" in text


def network(rng, widths=(4, 5, 3)):
    return [rng.standard_normal((widths[i + 1], widths[i])) for i in range(len(widths) - 1)]


LIBRARY_CASES = [   # (call on a fresh network ws, X, Y, message)
    (lambda ws, X, Y: align.alignment(ws, rtol=math.nan), "rtol must be a number >= 0 and < 1"),
    (lambda ws, X, Y: align.alignment(ws, rtol=10), "rtol must be a number >= 0 and < 1, got 10"),
    (lambda ws, X, Y: align.is_aligned(ws, tol=math.nan), "tol must be a number >= 0 and < 1"),
    (lambda ws, X, Y: align.is_aligned(ws, tol=-1), "tol must be a number >= 0 and < 1, got -1"),
    (lambda ws, X, Y: align.train(ws, X, Y, tol=math.nan), "tol must be a number >= 0, got nan"),
    (lambda ws, X, Y: align.train([W.astype(complex) for W in ws], X, Y), "W_1.*float32 or float64.*complex128"),
    (lambda ws, X, Y: align.train(ws, X.astype(object), Y),
     "X must hold real numbers as float32 or float64, got object"),
    (lambda ws, X, Y: align.train(ws, X.astype(str), Y), "X must hold real numbers .*got <U"),
    (lambda ws, X, Y: align.loss(ws, X.astype(np.float16), Y), "got float16"),
    (lambda ws, X, Y: align.train([[[1.0, 2.0], [3.0]]] + ws[1:], X, Y), "W_1 must be an array of numbers"),
    (lambda ws, X, Y: align.alignment(np.ones((2, 3, 3))), "weights must be a non-empty list.*got ndarray"),
    (lambda ws, X, Y: align.invariance(ws, network(np.random.default_rng(1), (4, 6, 3))),
     "weights_t and weights_0 must have the same shapes"),
    (lambda ws, X, Y: align.train(ws, X[:, :0], Y[:, :0]),
     r"X must be k0 x n = 4 x n with n >= 1 \(one example per column\), got shape 4x0"),
    (lambda ws, X, Y: align.train(ws, X, [Y[0].tolist(), Y[1, :3].tolist()]), "Y must be an array of numbers"),
    (lambda ws, X, Y: st.conv2d(3, 29), "wider than 2p - 1 = 5"),
    (lambda ws, X, Y: st.conv2d(28, 3.0), "filter size s that is an integer >= 1, got 3.0"),
    (lambda ws, X, Y: st.alignment_impossible(-1, 4, 2), "needs r as an integer >= 0, got -1"),
    (lambda ws, X, Y: align.ussvd(np.full((2, 2), np.nan)), "A contains NaN or inf"),
    (lambda ws, X, Y: align.invariance_certificate(X * np.nan, Y, [4, 6, 3]), "X contains NaN"),
    (lambda ws, X, Y: align.aligned_init(np.eye(3) * 2, np.eye(4), [4, 6, 3]),
     "U must be an orthogonal matrix"),
    (lambda ws, X, Y: align.train(ws, X, Y, measures=[align.tracker(ws)]),
     "measures must be a dict .* or one such function"),
]


@pytest.mark.parametrize("call, message", LIBRARY_CASES)
def test_bad_library_input_raises_value_error_naming_it(call, message):
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=message):
        call(network(rng), rng.standard_normal((4, 6)), rng.standard_normal((3, 6)))


@pytest.mark.parametrize("lib", [align, align_fast])
def test_lists_and_boolean_or_integer_arrays_are_converted_to_float64(lib):
    """Lists, booleans and integers are not errors: they train as their float64 arrays."""
    rng = np.random.default_rng(5)
    ws, X, Y = network(rng), rng.standard_normal((4, 6)), rng.integers(-2, 3, (3, 6))
    got, hist = lib.train([W.tolist() for W in ws], X > 0, Y.tolist(), max_steps=5)
    want, expected = lib.train(ws, (X > 0).astype(np.float64), Y.astype(np.float64), max_steps=5)
    assert hist.losses == expected.losses
    assert all(a.dtype == np.float64 and (a == b).all() for a, b in zip(got, want))


def test_is_aligned_at_extreme_scales_answers_instead_of_overflowing():
    rng = np.random.default_rng(6)
    Q = [np.linalg.qr(rng.standard_normal((4, 4)))[0] for _ in range(4)]
    weights = [Q[i + 1] @ np.diag(rng.uniform(0.5, 2, 4)) @ Q[i].T for i in range(3)]
    for scale in (1e200, 1e-200, -1e200):         # (-1e200: the largest entry is tiny, |entry| huge)
        test = align.is_aligned([scale * W for W in weights])
        assert test and test.residual < 1e-12
        np.testing.assert_allclose(np.sort(np.abs(test.ussvds[0][1]))[::-1],      # (unsorted: Def. 1)
                                   abs(scale) * np.linalg.svd(weights[0])[1])
    negative = [np.diag([-1e200, -2e200, -1e-300]), np.diag([-3e200, -1e200, 0.0])]
    test = align.is_aligned(negative)
    assert test and test.residual == 0.0
    assert not align.is_aligned([1e200 * W for W in weights[:2]] + [1e200 * rng.standard_normal((4, 4))])


SIGNAL_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import align_fast, experiments
tracker, calls, at = align_fast.tracker, [], {at!r}

def slow_tracker(weights_0, rtol=1e-6):
    measure = tracker(weights_0, rtol)
    def m(weights, w0=None):
        calls.append(1)
        if len(calls) in at:
            os.kill(os.getpid(), signal.{sig})
            time.sleep(2)                            # the signal arrives inside the measurement
        return measure(weights, w0)
    return m
align_fast.tracker = slow_tracker
sys.exit(experiments.main(sys.argv[1:]))
"""


def consistent(folder, stem, complete=False):
    """The three files of an interrupted run (or a ``complete`` one) agree: strict JSON, one
    CSV row per measurement step, every measure recorded at every measurement step."""
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")
    result = json.loads((folder / f"{stem}.json").read_text(), parse_constant=no_constants)
    rows = (folder / f"{stem}.csv").read_text().strip().splitlines()[1:]
    if complete:
        assert result["status"] == "done" and result["claim"]["verdict"] != "not shown"
    else:
        assert result["status"] == "interrupted" and result["claim"]["verdict"] == "not shown"
    assert (folder / f"{stem}.png").exists() or "matplotlib" not in sys.modules
    count = 0
    for run in result["runs"].values():
        assert all(len(v) == len(run["measure_steps"]) for v in run["measurements"].values())
        count += len(run["measure_steps"])
    assert len(rows) == count
    return result


@pytest.mark.parametrize("sig, at, status", [("SIGINT", (3,), 130), ("SIGINT", (3, 4), 130),
                                             ("SIGTERM", (2,), 143)])
def test_signals_during_a_measurement_leave_consistent_files(sig, at, status, tmp_path):
    """Ctrl-C inside a measurement, a second Ctrl-C inside the final one, SIGTERM: exit
    130/143 and the JSON, CSV and PNG of what was computed, marked interrupted."""
    script = SIGNAL_SCRIPT.format(repo=REPO, at=at, sig=sig)
    run = subprocess.run([sys.executable, "-c", script, "fig1a", "--out", str(tmp_path), "-q"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == status, run.stderr[-2000:]
    result = consistent(tmp_path, "fig1a")
    assert result["runs"]["seed=0"]["measure_steps"] == ([0, 100, 200] if at == (3,) else [0, 100])
    assert f"{'terminated' if sig == 'SIGTERM' else 'interrupted'} during fig1a: fig1a's runs so far " \
           f"written to {tmp_path / 'fig1a.json'}" in run.stderr, run.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_interrupted_run_does_not_replace_a_complete_one(tmp_path, monkeypatch, capsys):
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 0
    before = snapshot(tmp_path)

    def interrupt(self, step, loss, hist):
        if step == 120:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner.Progress, "__call__", interrupt)
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 130
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    result = consistent(tmp_path, "fig2a-quick-interrupted")
    assert result["runs"]["seed=0"]["final_step"] == 120
    assert "holds a complete run" in capsys.readouterr().out


def test_ctrl_c_before_any_run_writes_nothing(earlier, monkeypatch, capsys):
    before = snapshot(earlier)
    monkeypatch.setattr(experiments.st, "toeplitz", lambda k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert experiments.main(["fig2a", "--quick", "--out", str(earlier), "-q"]) == 130
    assert snapshot(earlier) == before
    captured = capsys.readouterr()
    assert "fig2a: interrupted before any run was recorded; nothing written" in captured.out
    assert "interrupted during fig2a: nothing written for fig2a" in captured.err
    assert "written to" not in captured.err and "complete" not in captured.err


def test_a_full_disk_keeps_the_previous_files_and_says_which_failed(earlier, monkeypatch, capsys):
    before = snapshot(earlier)
    text_writer = outputs.text_writer

    def full_disk(text):
        if text.startswith("run,step"):                            # the CSV
            def write(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")
            return write
        return text_writer(text)
    monkeypatch.setattr(outputs, "text_writer", full_disk)
    assert experiments.main(["fig2a", "--quick", "--out", str(earlier), "-q"]) == 1
    captured = capsys.readouterr()
    assert "fig2a-quick.csv: No space left on device" in captured.err
    assert "fig2a: alignment is not an invariant" in captured.out        # the summary came first
    assert snapshot(earlier) == before


def test_results_are_strict_json_with_command_version_and_time(earlier):
    result = json.loads((earlier / "fig2a-quick.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
    assert result["command"] == "python experiments.py fig2a --quick --out " + str(earlier) + " -q"
    assert result["version"] == "0.1.0" and result["timestamp"].endswith("Z")
    assert result["claim"]["verdict"] == "holds"
    assert outputs.strict_json({"a": [math.nan, 1.0, math.inf]}) == {"a": [None, 1.0, None]}


def test_quick_runs_never_replace_a_full_runs_files(earlier, capsys):
    before = snapshot(earlier)
    assert experiments.main(["thm3", "--quick", "--out", str(earlier), "-q"]) == 0
    after = snapshot(earlier)
    assert {k: after[k] for k in before} == before
    assert {"thm3-quick.json", "thm3-quick.csv"} <= set(after)
    assert "thm3-quick.json" in capsys.readouterr().out


def test_no_old_plot_is_left_beside_new_results(tmp_path, monkeypatch, capsys):
    """A rerun that cannot plot (matplotlib missing) removes the earlier PNG instead of
    leaving it beside the new JSON, and does not claim to have written one."""
    stale = tmp_path / "fig2a-quick.png"
    stale.write_bytes(b"an earlier run's plot")
    monkeypatch.setattr(outputs, "figure_or_note", lambda title, runs, draw=None: "matplotlib is not installed")
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert not stale.exists() and "fig2a-quick.png" not in out and "matplotlib is not installed" in out
    assert (tmp_path / "fig2a-quick.json").exists() and (tmp_path / "fig2a-quick.csv").exists()


SWEEP_SCRIPT = """
import contextlib, io, json, os, signal, sys, tempfile, time
sys.path.insert(0, {repo!r})
import experiments
args, points, base = {args!r}, {points!r}, {base!r}
signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))

def once(delay):
    out, err = tempfile.mkdtemp(dir=base), io.StringIO()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, delay)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = experiments.main(args + ["--out", out, "-q"])
    took = time.perf_counter() - start
    signal.setitimer(signal.ITIMER_REAL, 0)
    return dict(delay=delay, status=status, took=took, out=out, stderr=err.getvalue())

whole = min(once(0)["took"] for _ in range(2))        # (0: no signal; the first warms up)
for k in range(points):
    print(json.dumps(once(0.02 + whole * k / (points - 1))), flush=True)
"""


def whole_steps(result, measure_every=100):
    """Every run of a result ends at a whole step: losses of steps 0, 1, ... up to its final
    step (or the step before: an interrupt after a step's update, before its loss), all
    finite; measurements at multiples of measure_every, and at its final step."""
    for name, run in result["runs"].items():
        final, steps = run["final_step"], run["steps"]
        assert steps == list(range(len(steps))) and final - steps[-1] in (0, 1), name
        assert len(run["losses"]) == len(steps) and all(map(math.isfinite, run["losses"])), name
        assert run["measure_steps"] == sorted(set(run["measure_steps"])), name
        assert all(t % measure_every == 0 or t == final for t in run["measure_steps"]), name
        assert run["measure_steps"][-1] <= final, name
        if result["status"] == "done":
            assert final == steps[-1] and run["measure_steps"][-1] == final, name


@pytest.mark.parametrize("args, points", [(["fig1a", "--seeds", "2", "--max-steps", "3000"], 14),
                                          (["fig1b", "--max-steps", "100"], 7)])
def test_ctrl_c_at_any_moment_stops_at_a_whole_step_with_consistent_files(args, points, tmp_path):
    """Ctrl-C swept across a whole run (the set-up, the measurement of step 0, the steps, the
    final measurement, the summary and the writes): exit 130 with a consistent set of files
    whose runs end at a whole step, the message naming them, or none ('nothing written'),
    never a traceback or a temporary file (a run that ended first: exit 0)."""
    script = SWEEP_SCRIPT.format(repo=REPO, args=args, points=points, base=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == points and sum(r["status"] == 130 for r in results) >= points // 2
    for r in results:
        folder, files = r["out"], sorted(os.listdir(r["out"]))
        assert r["status"] in (0, 130), r
        assert not [f for f in files if f.startswith(".tmp-")], r
        assert "Traceback" not in r["stderr"], r
        if r["status"] == 130:
            if files:                            # (a signal in the writes: held till done)
                stem = files[0].rsplit(".", 1)[0]
                result = consistent(pathlib.Path(folder), stem, complete="interrupted" not in stem and
                                    json.loads(open(os.path.join(folder, stem + ".json")).read())[
                                        "status"] == "done")
                whole_steps(result)
                assert f"{os.path.join(folder, stem)}.json" in r["stderr"], r    # (named)
                assert "nothing" not in r["stderr"], r
            else:
                assert "nothing written" in r["stderr"] or "nothing was written" in r["stderr"], r


@pytest.mark.parametrize("argv, stem", [
    (["fig2a", "--quick"], "fig2a-quick"),
    (["sweep", "fig1a", "--grid", "lr=0.01,0.02", "--max-steps", "50"], "sweep-fig1a")])
def test_ctrl_c_during_the_writes_says_what_was_written(argv, stem, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the results are written: held till the files are in place (complete),
    then exit 130 with a message naming them, never 'nothing written'."""
    import signal
    write_files = outputs.write_files

    def interrupted_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return write_files(*args, **kwargs)
    monkeypatch.setattr(outputs, "write_files", interrupted_write)
    assert experiments.main([*argv, "--out", str(tmp_path), "-q"]) == 130
    err = capsys.readouterr().err
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["status"] == "done" and (tmp_path / f"{stem}.csv").exists()
    if stem == "fig2a-quick":
        consistent(tmp_path, stem, complete=True)
    assert f"{tmp_path / stem}.json" in err and "nothing" not in err, err


def test_a_later_run_removes_the_temporary_files_a_killed_run_left(tmp_path):
    """SIGKILL during the writes leaves .tmp-<host>~<pid namespace>~<pid>-* files; the next
    run into the folder deletes those of this host and namespace whose process is no longer
    running (never those of a live one)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    mine = outputs.temporary_prefix()                       # .tmp-<host>~<namespace>~<pid>-
    assert mine.endswith(f"~{os.getpid()}-")
    stale = tmp_path / f"{mine[:-len(f'{os.getpid()}-')]}{dead}-xyzfig1a.json"
    live = tmp_path / f"{mine[:-len(f'{os.getpid()}-')]}{os.getppid()}-xyzfig1a.json"
    for path in (stale, live):
        path.write_text("partial")
    assert experiments.main(["thm3", "--quick", "--out", str(tmp_path), "-q"]) == 0
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_ctrl_c_during_the_steps_leaves_a_whole_step(path, monkeypatch):
    """A signal at random moments of a run: train raises align.Interrupted, whose weights are
    those of its History's final step exactly (no step half applied to the layers)."""
    import signal
    lib = align if path == "reference" else align_fast
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((12, 12)) / 4 for _ in range(6)]
    X, Y = rng.standard_normal((12, 30)), rng.standard_normal((12, 30))
    measure = lambda ws, _: float(ws[0][0, 0])
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        inside = 0
        for delay in np.linspace(0.01, 0.2, 12):
            signal.setitimer(signal.ITIMER_REAL, delay)
            try:
                out, hist = lib.train(weights, X, Y, lr=1e-3, max_steps=10 ** 6, tol=0.0,
                                      measure_every=7, measures={"m": measure})
            except align.Interrupted as stop:
                out, hist = stop.weights, stop.history
            except KeyboardInterrupt:               # (in the set-up, before the loop: no run)
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert hist.stop_reason == "interrupted"
            inside += 1
            again, _ = lib.train(weights, X, Y, lr=1e-3, max_steps=hist.final_step, tol=0.0)
            for a, b in zip(out, again):             # (fast: runs of steps and single steps
                np.testing.assert_allclose(a, b, rtol=0 if lib is align else 1e-12,   # round
                                           atol=0 if lib is align else 1e-15)  # differently)
        assert inside >= 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_train_takes_a_tracker_as_its_measures():
    rng = np.random.default_rng(6)
    ws = network(rng)
    X, Y = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    _, hist = align.train(ws, X, Y, max_steps=10, measure_every=5, measures=align.tracker(ws))
    assert sorted(hist.measurements) == sorted(align.MEASURE_KEYS)
    assert hist.measure_steps == [0, 5, 10]
