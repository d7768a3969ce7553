"""python experiments.py verify: every numbered statement holds, and a statement broken on
purpose fails with its row named; report: one page from a results folder, saying what is
missing or interrupted."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import align
import experiments
import runner


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def test_verify_quick_every_statement_holds(tmp_path, monkeypatch, capsys):
    """Every statement holds; verify says where it wrote its table, and its progress on a
    terminal is one line, rewritten."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert experiments.main(["verify", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "verify-quick.json").read_text())["rows"]
    progress = [line for line in terminal.getvalue().split("\n") if "rows checked" in line]
    assert len(progress) == 1 and progress[0].count("\r") == len(rows), terminal.getvalue()
    assert progress[0].endswith(f"verify: {len(rows)} rows checked")
    names = " ".join(r["statement"] for r in rows)
    for statement in ("Definition 2", "Lemma 1", "Lemma 2", "Theorem 1 (if)", "Theorem 1 (only if)",
                      "Theorem 4", "Corollary 1", "Eq. (6)", "Proposition 1", "Proposition 2",
                      "Proposition 3", "Appendix G", "Proposition 4", "Proposition 5", "Theorem 2",
                      "Theorem 3"):
        assert statement in names
    assert all(r["holds"] for r in rows) and len(rows) >= 20
    out = capsys.readouterr().out
    assert f"{len(rows)} of {len(rows)} hold" in out
    assert f"; wrote {tmp_path / 'verify-quick.json'}" in out.splitlines()[-1]


def test_verify_names_a_statement_broken_on_purpose(tmp_path, monkeypatch, capsys):
    """Corollary 1 with Eq. (6) as printed (the product over all j): its row fails, exit 3."""
    def over_all_j(sig):
        xp = align.array_module(sig)
        return xp.broadcast_to(sig.prod(axis=-2, keepdims=True), sig.shape)
    monkeypatch.setattr(align, "_others_product", over_all_j)
    assert experiments.main(["verify", "--quick", "--out", str(tmp_path)]) == 3
    rows = {r["statement"]: r for r in json.loads((tmp_path / "verify-quick.json").read_text())["rows"]}
    assert not rows["Corollary 1 (Appendix B's product over j != i)"]["holds"]
    assert rows["Theorem 2"]["holds"]
    captured = capsys.readouterr()
    assert "FAILS" in captured.out and f"wrote {tmp_path / 'verify-quick.json'}" in captured.out
    assert "rows checked" not in captured.err           # no progress where stderr is no terminal
    assert not [line for line in captured.err.splitlines() if not line.startswith("note:")], \
        captured.err                                        # (notes only: the CPU, threads)


def test_report_says_what_is_missing_and_what_was_interrupted(tmp_path, monkeypatch):
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 0
    assert experiments.main(["verify", "--quick", "--out", str(tmp_path), "-q"]) == 0

    def interrupt(self, step, loss, hist):
        if step == 50:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(runner.Progress, "__call__", interrupt)
        assert experiments.main(["thm3", "--quick", "--out", str(tmp_path), "-q"]) == 130
    assert experiments.main(["report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "### fig1a" in md and "**Missing**: no fig1a.json" in md
    assert "status: **interrupted**" in md and "thm3's claim: **not shown**" in md
    assert "fig2a" in md and "**holds**" in md and "Corollary 1" in md
    assert "Missing</span>: no fig1a.json" in page and "class='interrupted'" in page
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page
    if (tmp_path / "fig2a-quick.png").exists():
        assert "data:image/png;base64," in page


def test_report_run_fills_in_the_missing_quick_runs(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(experiments, "EXPERIMENTS", {k: experiments.EXPERIMENTS[k] for k in ("fig2a", "thm1")})
    run_experiment, verify_command = runner.run_experiment, runner.verify_command
    monkeypatch.setattr(runner, "run_experiment",
                        lambda exp, name, cfg: made.append(name) or run_experiment(exp, name, cfg))
    monkeypatch.setattr(runner, "verify_command",
                        lambda args, xp: made.append("verify") or verify_command(args, xp))
    main = experiments.main
    assert main(["report", "--run", "--out", str(tmp_path), "-q"]) == 0
    assert made == ["fig2a", "thm1", "verify"]
    assert "Missing" not in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["fig1a", "--run"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 0
    assert experiments.main(["report", "--out", str(tmp_path)]) == 0
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "render_report.sh")
    run = subprocess.run(["bash", script, str(tmp_path / "report.html"), str(tmp_path / "page.png")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    png = (tmp_path / "page.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000       # a page, not a blank


def test_full_verify_holds_with_its_three_seeds():
    """The full table (three seeds, 3,000 steps), not only --quick's: more instances, and a
    row that holds for one seed must hold for three."""
    import verify
    rows = verify.verify(np)
    assert len(rows) >= 28 and all(row.holds for row in rows), [r.statement for r in rows if not r.holds]


def test_verify_runs_on_the_array_backend(xp):
    """--device gpu: the same statements hold with the training on CuPy (here, where no GPU
    is, on the strict NumPy stand-in that test_kernels runs these cases on)."""
    import verify
    rows = verify.verify(xp, quick=True)
    assert all(row.holds for row in rows), [row.statement for row in rows if not row.holds]


@pytest.mark.parametrize("content", ["", "{", "{}", "[]", '{"runs": [], "claim": {}}'])
def test_report_names_an_unreadable_result_and_writes_the_rest(content, tmp_path, capsys):
    assert experiments.main(["fig2a", "--quick", "--out", str(tmp_path), "-q"]) == 0
    (tmp_path / "thm3.json").write_text(content)
    assert experiments.main(["report", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'thm3.json'} cannot be read" in err
    md = (tmp_path / "report.md").read_text()
    assert "**Unreadable**: thm3.json" in md and "### fig2a" in md and "**holds**" in md
    assert "Unreadable</span>: thm3.json" in (tmp_path / "report.html").read_text()


def test_verify_quick_keeps_a_full_verify_and_the_report_says_which_it_shows(tmp_path):
    full = tmp_path / "verify.json"
    full.write_text('{"rows": []}')
    assert experiments.main(["verify", "--quick", "--out", str(tmp_path), "-q"]) == 0
    assert full.read_text() == '{"rows": []}' and (tmp_path / "verify-quick.json").exists()
    full.unlink()
    assert experiments.main(["report", "--out", str(tmp_path), "-q"]) == 0
    assert "checked (verify --quick: one seed)" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("argv", [["verify", "--lr", "5"], ["verify", "--dtype", "float32"],
                                  ["report", "--seeds", "3"], ["report", "--mnist", "/nonexistent"],
                                  ["fig1b", "--run"]])
def test_options_that_do_not_apply_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        experiments.main(argv)
    assert stop.value.code == 2
    assert f"{argv[1]} does not apply to {argv[0]}" in capsys.readouterr().err


def test_an_experiments_help_shows_only_its_own_options(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["fig1b", "--help"])
    out = capsys.readouterr().out
    assert "--run" not in out and "EXPERIMENT" not in out and "--mnist" in out


def test_report_on_a_folder_without_results_warns_and_says_where_to_look(tmp_path, capsys):
    """report --out on an empty folder: a report listing every experiment as missing, and a
    warning with hints (run them, give --out, or --run); no note about CuPy or the CPU."""
    empty = tmp_path / "empty"
    assert experiments.main(["report", "--out", str(empty)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {empty} holds no results" in err
    assert "report --out DIR" in err and "--run" in err and f"all --quick --out {empty}" in err
    assert "CuPy" not in err and "running on the CPU" not in err
    assert "**Missing**: no fig1a.json" in (empty / "report.md").read_text()
    assert experiments.main(["fig2a", "--quick", "--out", str(empty), "-q"]) == 0
    capsys.readouterr()
    assert experiments.main(["report", "--out", str(empty)]) == 0
    assert "holds no results" not in capsys.readouterr().err


@pytest.mark.parametrize("rule", [{"paired": "matched", "matched": "paired"},      # swapped
                                  {"paired": "paired", "matched": "paired"},       # merged
                                  {"paired": "matched", "matched": "matched"}],
                         ids=["swapped", "both-paired", "both-matched"])
def test_verify_tells_the_paired_rule_from_the_matched_rule(rule, monkeypatch):
    """Section 6's two rules swapped, or merged into one (either way): a row fails, and the
    rows where the rules differ are among those that do; the real rules hold every row."""
    import verify
    assert all(row.holds for row in verify.section6_measures(np, [0], 300))
    alignment, invariance = align.alignment, align.invariance
    monkeypatch.setattr(align, "alignment", lambda weights, how="paired", rtol=1e-6:
                        alignment(weights, rule[how], rtol))
    monkeypatch.setattr(align, "invariance", lambda weights_t, weights_0, how="paired", rtol=1e-6:
                        invariance(weights_t, weights_0, rule[how], rtol))
    failing = [row.statement for row in verify.verify(np, quick=True) if not row.holds]
    assert "Section 6 (the rules differ: alignment)" in failing
    assert "Section 6 (the rules differ: invariance)" in failing
