"""Beyond the paper: the stability experiment, grid sweeps and their shards."""
import dataclasses
import json

import numpy as np
import pytest

import align
import experiments
import runner
import sweeps

GRID = ["--grid", "lr=0.01,0.03", "--grid", "depth=2,3"]


def config(name, *argv):
    args = runner.parser(experiments.EXPERIMENTS, name).parse_args([name, "-q", *argv])
    args.command = ""
    return runner.configure(experiments.EXPERIMENTS[name], name, args, np)


def sweep(tmp_path, *argv):
    return experiments.main(["sweep", "fig1a", *GRID, "--seeds", "2", "--max-steps", "400",
                             "--out", str(tmp_path), "-q", *argv])


def test_stability_keeps_alignment_exactly_at_eps_0_and_loses_it_as_eps_squared():
    """At eps = 0 the data meet Theorem 1's condition: the four measures stay 1 to 1e-8.
    Away from it, 1 - measure grows as eps^2 (the fitted exponent, depth 2, two seeds)."""
    cfg = dataclasses.replace(config("stability", "--seeds", "2"), depth=2, max_steps=2000)
    runs = {}
    claim = experiments.stability(cfg, runs)
    assert claim["holds"] and claim["value"] <= 1e-8
    assert len(runs) == 2 * len(experiments.STABILITY_EPS)
    for run in runs.values():
        assert run["stop_reason"] == "tol" and run["depth"] == 2
        assert set(run["final_departure"]) == set(align.MEASURE_KEYS)
        worst = max(run["largest_departure"].values())
        assert worst <= 1e-8 if run["eps"] == 0 else worst > 1e-13
        assert run["largest_departure"]["alignment_paired"] >= run["final_departure"]["alignment_paired"]
    exponent = experiments.stability_findings(runs)["exponent"]["depth=2"]
    for key in align.MEASURE_KEYS:
        assert 1.8 < exponent[key]["final"]["mean"] < 2.2 and exponent[key]["final"]["seeds"] == 2


def test_stability_data_meet_theorem1_only_at_eps_0():
    widths = [9, 9, 9]
    start, X, Y = experiments.near_certified(3, widths, 9, 0.0)
    assert align.invariance_certificate(X, Y, widths).residual < 1e-10
    assert align.is_aligned(start).aligned
    _, Xe, Ye = experiments.near_certified(3, widths, 9, 1e-3)
    assert np.linalg.norm(Xe - X) == pytest.approx(1e-3 * np.linalg.norm(X))
    assert np.linalg.norm(Ye - Y) == pytest.approx(1e-3 * np.linalg.norm(Y))
    assert align.invariance_certificate(Xe, Ye, widths).violation > 1e-5


def test_fitted_slope_uses_small_eps_above_rounding():
    eps = [0.0, 1e-6, 1e-5, 1e-4, 1e-2]
    values = [0.0, 3e-12, 3e-10, 3e-8, 0.5]          # eps^2 up to 1e-4, saturated after
    assert experiments.fitted_slope(eps, values) == pytest.approx(2.0)
    assert experiments.fitted_slope(eps, [0.0, 1e-14, 1e-14, 3e-8, 0.5]) is None


def test_a_sweep_gives_each_cell_what_it_gives_alone(tmp_path):
    """Cells sharing shapes train as one batch with one lr per network; each run ends as
    the cell's own fig1a run: the same stop, the same final measures to rounding."""
    assert sweep(tmp_path) == 0
    result = json.loads((tmp_path / "sweep-fig1a.json").read_text())
    assert [c["cell"] for c in result["cells"]] == [{"lr": 0.01, "depth": 2}, {"lr": 0.01, "depth": 3},
                                                   {"lr": 0.03, "depth": 2}, {"lr": 0.03, "depth": 3}]
    assert len(result["runs"]) == 8 and {r["batched"] for r in result["runs"].values()} == {4}
    for cell in result["cells"]:
        for seed in (0, 1):
            alone = {}
            cfg = dataclasses.replace(config("fig1a", "--seed", str(seed), "--max-steps", "400"),
                                      **cell["cell"])
            experiments.fig1a(cfg, alone)
            mine = result["runs"][f"{sweeps.cell_name(cell['cell'])} seed={seed}"]
            assert mine["final_step"] == alone[f"seed={seed}"]["final_step"]
            for key, values in alone[f"seed={seed}"]["measurements"].items():
                np.testing.assert_allclose(mine["measurements"][key], values, rtol=1e-9)
        finals = [result["runs"][f"{sweeps.cell_name(cell['cell'])} seed={s}"]["measurements"]
                  ["alignment_paired"][-1] for s in (0, 1)]
        assert cell["alignment_paired"]["mean"] == pytest.approx(np.mean(finals))
        assert cell["alignment_paired"]["min"] == min(finals)
    text = (tmp_path / "sweep-fig1a.csv").read_text().splitlines()
    assert text[0].startswith("lr,depth,runs,converged,steps_mean,alignment_paired_mean") and len(text) == 5
    assert (tmp_path / "sweep-fig1a.png").stat().st_size > 0


def test_merged_shards_give_the_unsharded_records_and_refuse_missing_or_other_parts(tmp_path, capsys):
    assert sweep(tmp_path / "whole") == 0
    for i in (1, 2, 3):
        assert sweep(tmp_path / "parts", "--shard", f"{i}/3") == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == \
        [f"sweep-fig1a-shard-{i}-of-3.json" for i in (1, 2, 3)]
    assert sweep(tmp_path / "parts", "--merge") == 0
    whole, merged = (json.loads((tmp_path / d / "sweep-fig1a.json").read_text()) for d in ("whole", "parts"))
    drop = lambda runs: {n: {k: v for k, v in r.items() if k not in ("wall_time", "batched")}
                         for n, r in runs.items()}
    assert list(merged["runs"]) == list(whole["runs"])
    assert drop(merged["runs"]) == drop(whole["runs"])
    assert merged["cells"] == whole["cells"]
    assert (tmp_path / "parts" / "sweep-fig1a.csv").read_text() == (tmp_path / "whole" / "sweep-fig1a.csv").read_text()
    capsys.readouterr()
    assert experiments.main(["sweep", "fig1a", *GRID, "--seeds", "3", "--max-steps", "400",
                             "--out", str(tmp_path / "parts"), "-q", "--merge"]) == 1
    assert "sweep-fig1a-shard-1-of-3.json is from another sweep (seeds 2 there, 3 here)" in capsys.readouterr().err
    (tmp_path / "parts" / "sweep-fig1a-shard-2-of-3.json").unlink()
    assert sweep(tmp_path / "parts", "--merge") == 1
    err = capsys.readouterr().err
    assert "1 of 3 shards cannot be merged" in err and "--array=2 " in err
    assert f"{tmp_path / 'parts' / 'sweep-fig1a-shard-2-of-3.json'} is missing" in err
    assert sweep(tmp_path / "empty", "--merge") == 1
    assert "no shards of sweep fig1a" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sweep", "fig1a", "--grid", "eps=0.1"], "does not apply to fig1a"),
    (["sweep", "fig1a", "--grid", "speed=1"], "unknown parameter"),
    (["sweep", "fig1a", "--grid", "lr=0.1,x"], "is not a number"),
    (["sweep", "fig1a", "--grid", "depth=0"], "out of range"),
    (["sweep", "fig1a", "--grid", "lr=0.1", "--grid", "lr=0.2"], "given twice"),
    (["sweep", "fig1a"], "at least one --grid"),
])
def test_bad_grids_and_shards_are_refused_naming_the_problem(argv, message, tmp_path, capsys):
    assert experiments.main([*argv, "--out", str(tmp_path), "-q"]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sweep_of_an_experiment_without_a_grid_is_a_usage_error(tmp_path, capsys):
    assert experiments.main(["sweep", "fig2a", "--grid", "lr=1"]) == 2
    assert "must be one of fig1a, stability" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        experiments.main(["sweep", "fig1a", "--grid", "lr=1", "--shard", "1/2", "--merge"])
    assert e.value.code == 2
    for shard in ("4/3", "0/8"):                         # (refused before --out is made)
        with pytest.raises(SystemExit) as e:
            experiments.main(["sweep", "fig1a", "--grid", "lr=0.1", "--shard", shard,
                              "--out", str(tmp_path / "out"), "-q"])
        assert e.value.code == 2 and "1 <= I <= N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert experiments.main(["sweep", "--help"]) == 0
    assert "EXPERIMENT is one of: fig1a, stability" in capsys.readouterr().out


def test_an_interrupted_shard_is_written_as_such_and_not_merged(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a sweep: the runs so far are written, marked interrupted (exit 130); a
    merge refuses an interrupted shard, naming it."""
    calls = []

    def interrupt(self, step, loss, hist):
        calls.append(step)
        if len(calls) == 150:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner.Progress, "__call__", interrupt)
    assert sweep(tmp_path, "--shard", "1/2") == 130
    path = tmp_path / "sweep-fig1a-shard-1-of-2.json"
    assert f"interrupted during sweep fig1a: sweep fig1a's runs so far written to {path}" in \
        capsys.readouterr().err
    part = json.loads(path.read_text())
    assert part["status"] == "interrupted" and part["runs"]
    assert all(r["stop_reason"] == "interrupted" for r in part["runs"].values())
    # (one batch, depth 2: every network's record up to the batch's last whole step)
    assert len({r["final_step"] for r in part["runs"].values()}) == 1
    for r in part["runs"].values():
        assert r["steps"] == [t for t in range(r["final_step"] + 1)             # (every 100th kept)
                              if t % runner.SWEEP_LOSS_EVERY == 0 or t == r["final_step"]]
        assert len(r["losses"]) == len(r["steps"])
        assert r["measure_steps"] == [0, 100, r["final_step"]]
    monkeypatch.undo()
    assert sweep(tmp_path, "--shard", "2/2") == 0
    capsys.readouterr()
    assert sweep(tmp_path, "--merge") == 1
    assert "sweep-fig1a-shard-1-of-2.json is not a complete shard 1/2 (status interrupted)" in \
        capsys.readouterr().err
