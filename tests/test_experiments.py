"""experiments.py: every experiment's claim in --quick mode, outputs, MNIST and CLI errors."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import align
import experiments
import outputs
import runner
from conftest import CUPY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK_CLAIMS = ["fig1a", "fig1b", "fig1c", "fig2a", "fig2b", "thm1", "prop1", "cor1", "thm3", "stability"]


def run(tmp_path, *args):
    return experiments.main([*args, "--out", str(tmp_path), "-q"])


@pytest.mark.parametrize("name", QUICK_CLAIMS)
def test_experiment_quick_run_shows_its_claim(name, tmp_path, capsys):
    shorter = ["--max-steps", "100"] if name == "fig2b" else []    # (784 x 784 layers: 100 steps do)
    assert run(tmp_path, name, "--quick", *shorter) == 0
    result = json.loads((tmp_path / f"{name}-quick.json").read_text())
    if name == "thm3":                    # 300 steps do not interpolate: the premise fails
        assert result["claim"]["verdict"] == "not shown" and not result["claim"]["holds"]
    else:
        assert result["claim"]["holds"] and result["claim"]["verdict"] == "holds", result["claim"]
    assert result["status"] == "done"
    assert (tmp_path / f"{name}-quick.csv").read_text().startswith("run,step,loss,alignment_paired")
    assert result["environment"]["numpy"] == np.__version__
    for record in result["runs"].values():
        assert record["final_step"] <= runner.QUICK_STEPS
    assert name in capsys.readouterr().out


def test_theorem3_holds_once_the_network_interpolates(tmp_path, capsys):
    """thm3 to its threshold (1e-10, about 2,000 steps): the claim holds; stopped at 300
    steps it is reported as not shown, with exit status 3 for a full run."""
    assert run(tmp_path, "thm3") == 0
    assert json.loads((tmp_path / "thm3.json").read_text())["claim"]["verdict"] == "holds"
    assert run(tmp_path, "thm3", "--max-steps", "300") == 3
    assert "NOT SHOWN: its premise failed" in capsys.readouterr().out


def test_fig1a_loses_alignment_while_thm1_keeps_it_over_the_same_budget(tmp_path):
    run(tmp_path, "fig1a", "--quick", "--seeds", "2")
    run(tmp_path, "thm1", "--quick")
    fig = json.loads((tmp_path / "fig1a-quick.json").read_text())
    thm = json.loads((tmp_path / "thm1-quick.json").read_text())
    assert len(fig["runs"]) == 2 and "alignment_paired" in fig["summary"]["over_all"]
    assert all(min(r["measurements"]["alignment_paired"]) < 0.99 for r in fig["runs"].values())
    for r in thm["runs"].values():
        assert min(r["measurements"]["alignment_paired"]) > 1 - 1e-8
        assert min(r["measurements"]["invariance_paired"]) > 1 - 1e-8


def test_same_seed_gives_same_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, "fig1a", "--quick")
    run(b, "fig1a", "--quick")
    ra = json.loads((a / "fig1a-quick.json").read_text())["runs"]
    rb = json.loads((b / "fig1a-quick.json").read_text())["runs"]
    assert ra["seed=0"]["losses"] == rb["seed=0"]["losses"]
    assert ra["seed=0"]["measurements"] == rb["seed=0"]["measurements"]


def test_full_fig1a_reaches_its_threshold(tmp_path):
    assert run(tmp_path, "fig1a") == 0
    result = json.loads((tmp_path / "fig1a.json").read_text())["runs"]["seed=0"]
    assert result["stop_reason"] == "tol" and result["losses"][-1] < 1e-4


def test_mnist_subset_matches_the_published_facts():
    images, labels = runner.load_mnist()
    assert images.shape == (1024, 28, 28)
    assert labels[:20].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9]


def test_idx_reader_accepts_raw_and_gzip_and_rejects_bad_files(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw = runner.idx_bytes(images)
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert (runner.read_idx(str(tmp_path / "a")) == images).all()
    assert (runner.read_idx(str(tmp_path / "a.gz")) == images).all()
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x99" + raw[4:])
    with pytest.raises(outputs.ExperimentError, match="not an MNIST idx file"):
        runner.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(outputs.ExperimentError, match="truncated"):
        runner.read_idx(str(tmp_path / "short"))
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(outputs.ExperimentError, match="corrupt gzip"):
        runner.read_idx(str(tmp_path / "broken.gz"))


def test_full_mnist_folder_is_read(tmp_path):
    images, labels = runner.load_mnist()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(runner.idx_bytes(images[:300])))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(runner.idx_bytes(labels[:300]))
    got, lab = runner.load_mnist(str(tmp_path))
    assert got.shape == (300, 28, 28) and (lab == labels[:300]).all()


@pytest.mark.parametrize("args, message", [
    (["fig9"], "invalid choice"),
    (["fig1a", "--lr", "-1"], "positive number"),
    (["fig1a", "--seeds", "0"], "positive integer"),
    (["fig1a", "--dtype", "float16"], "invalid choice"),
    (["fig1a", "--device", "tpu"], "invalid choice"),
])
def test_cli_rejects_bad_options(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        experiments.main(args)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_mnist_folder_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path, "fig1b", "--quick", "--mnist", str(tmp_path / "nowhere")) == 1
    assert "no such directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert run(tmp_path, "fig1b", "--quick", "--mnist", str(tmp_path / "empty")) == 1
    assert "no train-images-idx3-ubyte" in capsys.readouterr().err


def test_cli_unusable_output_folder_fails_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_experiment", lambda *a: pytest.fail("ran before checking --out"))
    (tmp_path / "file").write_text("")
    assert experiments.main(["thm1", "--out", str(tmp_path / "file"), "-q"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert experiments.main(["thm1", "--out", str(tmp_path / "file" / "sub"), "-q"]) == 1
    assert "cannot create the folder" in capsys.readouterr().err


@pytest.mark.skipif(CUPY is not None, reason="a GPU is available here")
def test_cli_gpu_without_cupy_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path, "fig1a", "--quick", "--device", "gpu") == 1
    assert "CuPy" in capsys.readouterr().err


def test_list_and_help_describe_every_experiment(capsys):
    assert experiments.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in experiments.EXPERIMENTS)
    with pytest.raises(SystemExit):
        experiments.main(["--help"])
    out = capsys.readouterr().out
    assert "Fig. 2b" in out
    choices = " ".join(out.split()).split("EXPERIMENT one of: ")[1].split(" (see below)")[0]
    assert choices.split(", ") == ["list", *experiments.EXPERIMENTS, "all", "verify", "report", "sweep"]


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_a_closed_pipe_ends_the_command_quietly(reader):
    """`python experiments.py list | head -1` (the reader stops early, or is gone before
    anything is written): exit status 0 and no traceback."""
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} experiments.py list | {reader}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
    assert done.stdout == ("experiments:\n" if reader == "head -1" else "")


def test_divergence_is_reported_not_hidden(tmp_path, capsys):
    assert run(tmp_path, "fig1a", "--quick", "--lr", "50") == 1
    assert "smaller learning rate" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["1", "2"])
def test_interrupted_run_writes_partial_results(seeds, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 40 of one run, or of a batch (two seeds): every network's record up
    to step 40, the files marked interrupted, and the message naming them."""
    calls = []

    def interrupt(self, step, loss, hist):
        calls.append(step)
        if step == 40:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner.Progress, "__call__", interrupt)
    assert run(tmp_path, "fig1a", "--quick", "--seeds", seeds) == 130
    result = json.loads((tmp_path / "fig1a-quick.json").read_text())
    assert result["status"] == "interrupted"
    assert list(result["runs"]) == [f"seed={s}" for s in range(int(seeds))]
    for record in result["runs"].values():
        assert record["stop_reason"] == "interrupted"
        assert record["final_step"] == 40 and record["steps"] == list(range(41))
    assert f"interrupted during fig1a: fig1a's runs so far written to {tmp_path / 'fig1a-quick.json'}" \
        in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before its first run", "at step 40"])
def test_an_interrupt_names_what_finished_and_what_was_written(where, tmp_path, monkeypatch, capsys):
    """`all` interrupted in its second experiment (thm3): the message names the experiment
    that finished and what the interrupted one wrote (its files, or nothing)."""
    monkeypatch.setattr(experiments, "EXPERIMENTS", {k: experiments.EXPERIMENTS[k] for k in ("fig2a", "thm3")})
    if where == "at step 40":
        def interrupt(self, step, loss, hist):
            if self.cfg.lr == 0.1 and step == 40:               # (thm3's lr; fig2a's is 1e-2)
                raise KeyboardInterrupt
        monkeypatch.setattr(runner.Progress, "__call__", interrupt)
    else:
        monkeypatch.setattr(experiments.st, "conv2d", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(tmp_path, "all", "--quick") == 130
    err = capsys.readouterr().err
    files = ", ".join(str(tmp_path / f"thm3-quick.{e}") for e in ("json", "csv", "png")
                      if (tmp_path / f"thm3-quick.{e}").exists())
    if where == "at step 40":
        assert f"interrupted during thm3: fig2a complete and written; thm3's runs so far written to {files}, " \
               f"marked \"interrupted\"" in err
        assert json.loads((tmp_path / "thm3-quick.json").read_text())["runs"]["seed=0"]["final_step"] == 40
    else:
        assert "interrupted during thm3: fig2a complete and written; nothing written for thm3" in err and not files
    assert json.loads((tmp_path / "fig2a-quick.json").read_text())["status"] == "done"


def test_batched_seeds_equal_separate_runs(tmp_path):
    run(tmp_path / "batch", "fig1a", "--quick", "--seeds", "3", "--tol", "0.7")
    batch = json.loads((tmp_path / "batch" / "fig1a-quick.json").read_text())["runs"]
    stops = set()
    for seed in range(3):
        run(tmp_path / str(seed), "fig1a", "--quick", "--seed", str(seed), "--tol", "0.7")
        alone = json.loads((tmp_path / str(seed) / "fig1a-quick.json").read_text())["runs"][f"seed={seed}"]
        together = batch[f"seed={seed}"]
        stops.add(alone["final_step"])
        assert together["final_step"] == alone["final_step"]
        assert together["stop_reason"] == alone["stop_reason"]
        np.testing.assert_allclose(together["losses"], alone["losses"], rtol=1e-10)
        assert together["measure_steps"] == alone["measure_steps"]
        for key, values in alone["measurements"].items():
            np.testing.assert_allclose(together["measurements"][key], values, atol=1e-10)
    assert len(stops) > 1            # the networks stopped at different steps


@pytest.mark.parametrize("name, args", [("fig1a", ["--seeds", "2"]), ("fig2a", []), ("thm1", [])])
def test_progress_lines_report_step_loss_alignment_rate_and_eta(name, args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.0)
    assert experiments.main([name, "--quick", "--out", str(tmp_path), *args]) == 0
    err = capsys.readouterr().err
    assert "step" in err and "loss" in err and "alignment" in err and "steps/s" in err and "ETA" in err
    assert "step 0  loss" not in err                       # no line before a rate exists


def test_auto_device_keeps_small_experiments_on_the_cpu(tmp_path, monkeypatch, capsys):
    """With a GPU usable, --device auto still runs fig2a (4x4 layers) with NumPy; a GPU
    stand-in that cannot compute would fail the run if it were used."""
    monkeypatch.setattr(runner, "select_device", lambda device, quiet=False: object())
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "fig2a-quick.json").read_text())["environment"]["device"] == "cpu"
    assert "fig2a runs on the CPU" in capsys.readouterr().err
    with pytest.raises(AttributeError):                   # --device gpu insists
        experiments.main(["fig2a", "--quick", "--device", "gpu", "--out", str(tmp_path), "-q"])


def test_seeds_beyond_device_memory_run_in_batches_with_the_same_records(tmp_path, monkeypatch):
    run(tmp_path / "one", "fig1a", "--quick", "--seeds", "5")
    free = 64 * 81 * 8 * 2 * 2.5                  # room for two networks per batch
    monkeypatch.setattr(runner, "available_memory",
                        lambda xp: free if xp is np and free < 1e6 else 2 ** 40)
    labels = []
    monkeypatch.setattr(runner, "train_dense", lambda cfg, runs, label, *a, train_dense=runner.train_dense,
                        **k: labels.append(label) or train_dense(cfg, runs, label, *a, **k))
    run(tmp_path / "three", "fig1a", "--quick", "--seeds", "5")
    assert labels == ["seed=0 .. seed=1", "seed=2 .. seed=3", "seed=4"]
    one, three = (json.loads((tmp_path / d / "fig1a-quick.json").read_text())["runs"] for d in ("one", "three"))
    assert one.keys() == three.keys()
    for name in one:
        assert one[name]["losses"] == three[name]["losses"]
        for key, values in one[name]["measurements"].items():     # sums in another order
            np.testing.assert_allclose(three[name]["measurements"][key], values, rtol=1e-13)


def test_seeds_whose_records_exceed_host_memory_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "available_memory", lambda xp: 2 ** 20)
    assert run(tmp_path, "fig1a", "--seeds", "1000") == 1
    assert "needs about" in capsys.readouterr().err


def test_loss_every_thins_the_records_but_not_the_run(tmp_path):
    run(tmp_path / "all", "fig2a", "--quick")
    run(tmp_path / "some", "fig2a", "--quick", "--loss-every", "7")
    full, thin = (next(iter(json.loads((tmp_path / d / "fig2a-quick.json").read_text())["runs"].values()))
                  for d in ("all", "some"))
    assert thin["final_step"] == full["final_step"] and thin["measurements"] == full["measurements"]
    assert thin["steps"] == [t for t in full["steps"] if t % 7 == 0] + [full["steps"][-1]]
    assert thin["losses"] == [L for t, L in zip(full["steps"], full["losses"]) if t % 7 == 0] + \
        [full["losses"][-1]]


def test_many_seeds_are_told_how_to_thin_their_loss_records(capsys):
    import argparse
    cfg = argparse.Namespace(max_steps=100_000, dtype=np.float64, loss_every=1, quiet=False, xp=np)
    assert runner.batches(cfg, 1000, 81) == [slice(0, 1000)]
    assert "--loss-every" in capsys.readouterr().err
    cfg.loss_every = 100
    runner.batches(cfg, 1000, 81)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(CUPY is not None, reason="a GPU is available here")
def test_gpu_without_cupy_names_what_is_missing(capsys):
    with pytest.raises(runner.DeviceError, match="CuPy"):
        runner.select_device("gpu")
    assert runner.select_device("auto") is np
    assert "CPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be one of"):
        runner.select_device("tpu")


def fake_run(stop_reason, final_step, alignment):
    """A run record with a stop, a final step and a paired alignment that falls linearly."""
    steps = list(range(0, final_step + 1, 100)) + ([final_step] if final_step % 100 else [])
    values = list(np.linspace(1.0, alignment, len(steps)))
    return {"steps": steps, "losses": list(np.geomspace(1.0, 1e-5, len(steps))), "measure_steps": steps,
            "measurements": {key: values for key in align.MEASURE_KEYS},
            "stop_reason": stop_reason, "final_step": final_step, "wall_time": 1.0}


def test_summary_counts_runs_that_did_not_converge_apart():
    """Two of five runs hit the step cap: the summary says 3 of 5 converged and gives the
    statistics over those three and, separately, over all five."""
    runs = {f"seed={j}": fake_run("tol", 1000 * (j + 1), 0.9) for j in range(3)}
    runs |= {f"seed={j}": fake_run("max_steps", 100_000, 0.3) for j in (3, 4)}
    stats = outputs.spread(runs)
    assert (stats["runs"], stats["converged"]) == (5, 3)
    assert stats["over_converged"]["final_step"]["mean"] == 2000
    assert stats["over_all"]["final_step"]["mean"] == (6000 + 200_000) / 5
    assert stats["over_converged"]["alignment_paired"]["mean"] == pytest.approx(0.9)
    assert stats["over_all"]["alignment_paired"]["mean"] == pytest.approx((2.7 + 0.6) / 5)
    text = outputs.summary("fig1a", runs, {"claim": "c", "value": 0.3, "holds": True}, "done")
    assert "converged (loss below --tol): 3 of 5 runs" in text
    assert "over converged (3): steps 2,000" in text and "over all (5): steps 41,200" in text


@pytest.mark.parametrize("count", [3, 8])
def test_plot_gives_each_run_one_colour_in_every_panel(count):
    """Every line of a run (loss, paired and matched measures) has that run's colour; no two
    runs share one; from BAND_FROM_RUNS runs a mean and a min-max band; labelled axes."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {f"seed={j}": fake_run("tol", 500 + 300 * j, 0.5 + 0.05 * j) for j in range(count)}
    fig = outputs.figure("Figure 1a: a title", runs)
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                colours.setdefault(line.get_gid(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert set(colours) == set(runs) and all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == count
    lines_per_run = [sum(line.get_gid() == name for ax in fig.axes for line in ax.get_lines())
                     for name in runs]
    assert lines_per_run == [5] * count                       # loss, 2 x (paired, matched)
    means = [line for ax in fig.axes for line in ax.get_lines() if "mean of" in line.get_label()]
    assert len(means) == (3 if count >= outputs.BAND_FROM_RUNS else 0)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "alignment", "invariance"]
    assert fig._suptitle.get_text() == "Figure 1a: a title"
    plt.close(fig)



def test_a_diverged_network_of_a_batch_is_recorded_as_diverged_where_it_diverged():
    batch = {"steps": [0, 1, 2, 3], "losses": [[1.0, 1.0], [0.5, 2.0], [0.2, float("inf")],
                                              [0.1, float("nan")]],
             "measure_steps": [0, 2, 3], "measurements": {"a": [[1.0, 1.0], [0.9, 0.8], [0.8, 0.7]]},
             "stop_reason": "max_steps", "final_step": 3, "wall_time": 2.0}
    runs = runner.split_batch(batch, ["ok", "bad"], tol=1e-4)
    assert runs["bad"]["stop_reason"] == "diverged" and runs["bad"]["final_step"] == 2
    assert runs["bad"]["losses"] == [1.0, 2.0] and runs["bad"]["measure_steps"] == [0]
    assert runs["ok"]["stop_reason"] == "max_steps" and runs["ok"]["losses"][-1] == 0.1
    assert runs["ok"]["measure_steps"] == [0, 2, 3]


THREADS_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})        # one CPU, as a job's share
import runner
print(json.dumps([runner.usable_cores(), runner.blas_threads(None, 10 ** 8)]))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_thread_count_honours_the_affinity_mask():
    script = THREADS_SCRIPT.format(repo=REPO)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert json.loads(run.stdout) == [1, 1], run.stderr           # (large layers: all usable cores)


def test_cgroup_quota_caps_the_usable_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runner.cgroup_cpu_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runner.cgroup_cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert runner.cgroup_cpu_quota(str(tmp_path)) == 3.0


@pytest.mark.parametrize("given, want", [([], 1), (["--threads", "2"], 2)])
def test_threads_are_set_for_the_run_and_recorded(given, want, tmp_path, monkeypatch):
    pytest.importorskip("threadpoolctl")
    seen = []
    run_experiment = runner.run_experiment
    monkeypatch.setattr(runner, "run_experiment", lambda exp, name, cfg: seen.append(
        [p["num_threads"] for p in runner.blas_pools()]) or run_experiment(exp, name, cfg))
    assert experiments.main(["fig1a", "--quick", "--out", str(tmp_path), "-q"] + given) == 0
    result = json.loads((tmp_path / "fig1a-quick.json").read_text())
    assert result["config"]["threads"] == want
    assert all(n == want for n in seen[0]) and seen[0]
    assert [p["num_threads"] for p in result["environment"]["blas"]] == seen[0]


PROJECT_MODULES = ("align", "align_fast", "align_cuda", "structured", "verify", "outputs", "sweeps",
                   "runner", "experiments")


def test_align_is_the_reference_alone_and_the_imports_have_no_circle():
    """`import align` loads no other module of the project; align.py's code names no fast
    module (its prose may point the reader to align_fast) and imports nothing by name at
    run time; among the project's modules the imports form no circle."""
    import ast
    run = subprocess.run([sys.executable, "-c", "import sys, align; print(sorted(sys.modules))"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert not set(PROJECT_MODULES[1:]) & set(json.loads(run.stdout.replace("'", '"')))
    tree = ast.parse(open(os.path.join(REPO, "align.py")).read())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | \
        {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} | \
        {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
         for a in node.names} | {node.module for node in ast.walk(tree)
                                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not {n for n in names if n in ("align_fast", "align_steps") or "_cuda" in n}, names
    assert not {"importlib", "__import__", "import_module"} & names
    imports = {}
    for name in PROJECT_MODULES:
        tree = ast.parse(open(os.path.join(REPO, name + ".py")).read())
        found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names} | {node.module for node in ast.walk(tree)
                                         if isinstance(node, ast.ImportFrom) and node.module}
        imports[name] = found & set(PROJECT_MODULES)

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, seen + (m,)))
                   for m in imports[start])
    assert not [m for m in PROJECT_MODULES if reaches(m, m)], imports


@pytest.mark.parametrize("name", ["fig1a", "fig2a", "thm1"])
def test_reference_runs_give_the_same_claims_and_steps(name, tmp_path):
    """--reference trains and measures with align.py's code: the same claim and steps
    (within 0.1%) as align_fast.py, and the JSON says which code ran."""
    results = {}
    for flags in ([], ["--reference"]):
        out = tmp_path / ("ref" if flags else "fast")
        assert experiments.main([name, "--quick", "--out", str(out), "-q"] + flags) == 0
        results[bool(flags)] = json.loads((out / f"{name}-quick.json").read_text())
    fast, ref = results[False], results[True]
    assert fast["config"]["implementation"] == "align_fast" and ref["config"]["implementation"] == "align"
    assert fast["claim"]["holds"] == ref["claim"]["holds"]
    for a, b in zip(fast["runs"].values(), ref["runs"].values()):
        assert abs(a["final_step"] - b["final_step"]) <= 1e-3 * a["final_step"]
