"""What the experiments leave: files written whole or not at all (signals held meanwhile),
strict JSON and CSV, plots, the terminal summary, and the reproduction report (Markdown and
HTML rendered from one model).  Used by experiments.py; nothing here trains or measures."""
import base64
import contextlib
import csv
import gc
import html
import io
import json
import math
import os
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse

import numpy as np

import align


class ExperimentError(RuntimeError):
    """A problem the user can fix (missing files, bad data, a failed write); printed without
    a traceback."""


# --------------------------------------------------- files, whole or not at all --

def write_files(writers, remove=()):
    """Write the files {path: write(tmp)} together: each into a temporary file beside it,
    then all moved into place (usual permissions), and the files ``remove`` deleted, with
    Ctrl-C and SIGTERM held until the set is complete.  A write that fails (a full disk)
    removes every temporary file and raises ExperimentError naming the file and the
    reason; nothing is replaced then."""
    temps = {}
    try:
        with signals_held():
            for folder in {os.path.dirname(os.path.abspath(path)) for path in writers}:
                remove_stale_temporaries(folder)
            for path, write in writers.items():
                fd, temps[path] = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                                   prefix=temporary_prefix(),
                                                   suffix=os.path.basename(path))
                os.close(fd)
                try:
                    write(temps[path])
                except OSError as exc:
                    raise ExperimentError(f"could not write {path}: {exc.strerror or exc}; the "
                                          "files it belongs with were left as they were") from exc
            umask = os.umask(0)
            os.umask(umask)
            for path, tmp in temps.items():
                os.chmod(tmp, 0o666 & ~umask)
            for path, tmp in list(temps.items()):
                os.replace(tmp, path)
                del temps[path]
                FILES_WRITTEN.append(path)
            for path in remove:
                if os.path.exists(path):
                    os.remove(path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


STALE_AFTER = 86400                 # seconds: old-style temporaries, foreign leftovers


def temporary_prefix():
    """The name every temporary file of this process starts with:
    ``.tmp-<host>~<pid namespace>~<pid>-`` (then mkstemp's random letters and the file's
    name).  The host is percent-escaped (no '-' or '~' left in it); the namespace is the
    number of ``/proc/self/ns/pid`` ('unknown' where Linux hides it, '0' on systems without
    pid namespaces).  Versions before this one wrote ``.tmp-<pid>-``: they take the owner
    field for a pid only when it is all digits, so they leave these files alone."""
    host, namespace, pid = _identity()
    host = urllib.parse.quote(host, safe="").replace("-", "%2D").replace("~", "%7E")
    return f".tmp-{host}~{namespace}~{pid}-"


def remove_stale_temporaries(folder):
    """Delete the temporary files that killed earlier runs of this machine left in
    ``folder``: those of this host and pid namespace whose process is gone.  Every other one
    stays: those of a live process, of another host or pid namespace (a shard of a job array
    on another node or in another container, whose pid means nothing here), and the
    old-style ``.tmp-<pid>-*`` of earlier versions (no host in the name) unless the pid is
    not running here and the file is more than a day old."""
    host, namespace, pid = _identity()
    for name in os.listdir(folder):
        owner, path = _owner(name), os.path.join(folder, name)
        if owner is None or owner[2] == pid:
            continue
        with contextlib.suppress(OSError):
            mine = owner[:2] == (host, namespace) and namespace != "unknown"
            old_style = owner[0] is None and time.time() - os.stat(path).st_mtime > STALE_AFTER
            if (mine or old_style) and not _running(owner[2]):
                os.remove(path)


def foreign_temporaries(folder, older_than=STALE_AFTER):
    """The temporary files in ``folder`` that :func:`remove_stale_temporaries` never
    deletes because another host or pid namespace wrote them, older than ``older_than``
    seconds (most likely left by a killed task): a list of (path, host, age in seconds),
    for a report to mention.  Nothing is deleted."""
    host, namespace, _ = _identity()
    found = []
    for name in sorted(os.listdir(folder)):
        owner, path = _owner(name), os.path.join(folder, name)
        if owner and owner[0] is not None and owner[:2] != (host, namespace):
            with contextlib.suppress(OSError):
                age = time.time() - os.stat(path).st_mtime
                if age > older_than:
                    found.append((path, owner[0], age))
    return found


def _identity():
    """(host, pid namespace, pid) of this process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        namespace = "unknown" if sys.platform.startswith("linux") else "0"
    return socket.gethostname(), namespace, os.getpid()


def _owner(name):
    """(host, pid namespace, pid) of a temporary file's name, (None, None, pid) for an
    old-style one, None for any other name."""
    if not name.startswith(".tmp-") or "-" not in name[5:]:
        return None
    fields = name[5:].split("-", 1)[0].split("~")
    if len(fields) == 1 and fields[0].isdigit():
        return None, None, int(fields[0])
    if len(fields) == 3 and fields[2].isdigit():
        return urllib.parse.unquote(fields[0]), fields[1], int(fields[2])
    return None


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                          # (another user's process)
        return True
    return True


def text_writer(text):
    """A writer for write_files: ``text`` into the file."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
    return write


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (write_files)."""
    write_files({path: text_writer(text)})


SIGNALS_RECEIVED = []                       # SIGINT / SIGTERM numbers this process received
HOLDING = []                                # the held signals while a hold is active
FILES_WRITTEN = []                          # paths write_files put in place (this command)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill), handled like Ctrl-C: exit status 143."""


def complete_result(path):
    """Whether ``path`` holds a readable result of a complete run (status "done")."""
    try:
        with open(path) as f:
            return json.load(f).get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def on_signal(signum, frame):
    SIGNALS_RECEIVED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM until the block ends, then raise as they would have (in the
    main thread; elsewhere nothing is held)."""
    if threading.current_thread() is not threading.main_thread() or HOLDING:
        yield                                    # (inside a hold: the outer one raises)
        return
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    HOLDING.append(held)
    try:
        yield
    finally:
        HOLDING.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        SIGNALS_RECEIVED.extend(held)
        raise Terminated() if signal.SIGTERM in held else KeyboardInterrupt()


def strict_json(value):
    """``value`` with every NaN and infinity replaced by None, for strict JSON (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value



# ------------------------------------------------------ records and plots --

def csv_text(runs):
    """One CSV row per measurement: run, step, loss and the four measures."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "step", "loss", *align.MEASURE_KEYS])
    for name, run in runs.items():
        losses = dict(zip(run["steps"], run["losses"]))
        for j, step in enumerate(run["measure_steps"]):
            loss = losses.get(step, "")
            writer.writerow([name, step, loss if not isinstance(loss, list) else max(loss)] +
                            [run["measurements"].get(m, [""] * (j + 1))[j] for m in align.MEASURE_KEYS])
    return buf.getvalue()


BAND_FROM_RUNS = 7                 # plots of more runs show their mean and min-max band


def figure_or_note(title, runs, draw=None):
    """draw(title, runs) (default :func:`figure`), or a note saying why there is no figure
    (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        return "matplotlib is not installed: pip install '.[plot]' to get the plots"
    return (draw or figure)(title, runs)


def close_figure(fig):
    """Free a figure of figure_or_note (a note needs nothing), and collect its garbage now:
    matplotlib's caches hold weak references whose callbacks would otherwise run during a
    later training run, where a Ctrl-C landing inside one is printed and lost (Python
    ignores exceptions in weakref callbacks).  Called where signals are held."""
    if not isinstance(fig, str):
        import matplotlib.pyplot as plt
        plt.close(fig)
        gc.collect()


def figure(title, runs):
    """Loss (log) and both rules of alignment and invariance against iteration, one colour
    per run in every panel (its lines carry the run's name as gid); from BAND_FROM_RUNS
    runs on, each run thin and the mean over runs with its min-max band."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    band = len(runs) >= BAND_FROM_RUNS
    for j, (label, run) in enumerate(runs.items()):
        style = dict(color=f"C{j % 10}", gid=label, lw=0.6 if band else 1.2, alpha=0.35 if band else 1.0)
        axes[0].semilogy(run["steps"], _worst(run["losses"]), label=label, **style)
        if "reduced_sigma" in run:                  # cor1: products of singular values
            _plot_sigma(axes[1:], run)
            continue
        for ax, what in zip(axes[1:], ("alignment", "invariance")):
            for how, dash in (("paired", "-"), ("matched", "--")):
                values = run["measurements"].get(f"{what}_{how}")
                if values:
                    ax.plot(run["measure_steps"], values, dash, **style)
    if band:
        _plot_band(axes, runs)
    axes[0].set_title("training loss", fontsize=9)
    axes[0].set_ylabel("loss")
    if not any("reduced_sigma" in run for run in runs.values()):
        for ax, what in zip(axes[1:], ("alignment", "invariance")):
            ax.set_title(f"{what}\n(solid: paired rule, dashed: matched)", fontsize=9)
            ax.set(ylabel=what, ylim=(-0.02, 1.02))
            if len(runs) <= 6:
                ax.legend(handles=[line for line in ax.get_lines() if line.get_linestyle() == "-"],
                          labels=list(runs), fontsize=7)     # (runs at 1 overlap: named here)
    for ax in axes:
        ax.set_xlabel("iteration")
    if len(runs) <= 6:
        axes[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    return fig


def _worst(losses):
    """A loss record's values, the largest of each batch row."""
    return [max(v) if isinstance(v, list) else v for v in losses]


def _plot_band(axes, runs):
    """The mean over runs (black; the loss's geometric mean) and the min-max band (grey) of
    the loss and the paired measures, each run held at its last value after it stopped."""
    end = max(run["final_step"] for run in runs.values())
    grid = np.linspace(0, end, 200)
    at = lambda steps, values: np.interp(grid, steps, values)
    series = [(axes[0], [at(r["steps"], _worst(r["losses"])) for r in runs.values()])]
    for ax, key in zip(axes[1:], ("alignment_paired", "invariance_paired")):
        if all(key in r["measurements"] for r in runs.values()):
            series.append((ax, [at(r["measure_steps"], r["measurements"][key]) for r in runs.values()]))
    for j, (ax, values) in enumerate(series):
        values = np.array(values)
        ax.fill_between(grid, values.min(axis=0), values.max(axis=0), color="0.6", alpha=0.4,
                        label="min-max over runs")
        mean = np.exp(np.log(values).mean(axis=0)) if j == 0 else values.mean(axis=0)
        ax.plot(grid, mean, color="k", lw=1.5,
                label=f"{'geometric ' if j == 0 else ''}mean of {len(values)} runs")


def _plot_sigma(axes, run):
    """Corollary 1: S_k(t) = prod_i sigma_k(W_i(t)) of full GD (lines) and of the recursion
    (dots), and the singular values of W_1."""
    steps = run["measure_steps"]
    full, reduced = np.array(run["measurements"]["sigma"]), np.array(run["reduced_sigma"])
    for k in range(full.shape[2]):
        line, = axes[0].plot(steps, full[:, :, k].prod(axis=1), "-", lw=1, label=f"k = {k + 1}")
        axes[0].plot(steps, reduced[:, :, k].prod(axis=1), ".", ms=3, color=line.get_color())
        axes[1].plot(steps, full[:, 0, k], "-", lw=1, color=line.get_color())
        axes[1].plot(steps, reduced[:, 0, k], ".", ms=3, color=line.get_color())
    axes[0].set_title("S_k = prod_i sigma_k(W_i): GD (lines), Cor. 1 (dots)", fontsize=9)
    axes[1].set_title("sigma_k(W_1): GD (lines), Cor. 1 (dots)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=3)


def stability_figure(title, runs):
    """1 - alignment and 1 - invariance at the end against eps (log-log), one colour per
    depth: the geometric mean over seeds (solid: paired rule, dashed: matched) with the
    min-max band of the paired rule; eps = 0 and departures below 1e-16 are not drawn."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted({r["depth"] for r in runs.values()})
    for j, depth in enumerate(depths):
        chosen = [r for r in runs.values() if r["depth"] == depth and r["eps"] > 0]
        grid = sorted({r["eps"] for r in chosen})
        for ax, what in zip(axes, ("alignment", "invariance")):
            for how, dash in (("paired", "-"), ("matched", "--")):
                values = np.array([[max(r["final_departure"][f"{what}_{how}"], 1e-16)
                                    for r in chosen if r["eps"] == e] for e in grid])
                mean = np.exp(np.log(values).mean(axis=1))
                ax.loglog(grid, mean, dash, color=f"C{j}", marker="o" if how == "paired" else None,
                          ms=3, label=f"depth {depth}" if how == "paired" else None)
                if how == "paired":
                    ax.fill_between(grid, values.min(axis=1), values.max(axis=1), color=f"C{j}", alpha=0.2)
    for ax, what in zip(axes, ("alignment", "invariance")):
        ax.set(xlabel="eps (distance from Theorem 1's condition)", ylabel=f"1 - {what} at the end",
               title=f"1 - {what} (solid: paired, dashed: matched; band: min-max over seeds)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    return fig


LIMIT_PANELS = [("1 - alignment (paired)", ("1 - alignment_paired", "1 - restricted alignment_paired")),
                ("norm excess; distance to Proposition 3 (depth 2)", ("norm_excess", "prop3_distance")),
                ("balance defect at the end", ("balance_end",)),
                ("smallest tol is_aligned accepts", ("smallest_tol",))]


def limit_figure(title, runs):
    """limit's quantities at the end against the scale s of the start (log-log), one column per
    regime, one colour per depth: the geometric mean over the converged seeds with the
    min-max band of the first quantity of a panel (solid), the second one dashed."""
    import matplotlib.pyplot as plt
    converged = [r for r in runs.values() if r["stop_reason"] == "tol" and "quantities" in r]
    regimes = sorted({r["regime"] for r in converged})
    fig, axes = plt.subplots(len(LIMIT_PANELS), max(len(regimes), 1), figsize=(11, 12), squeeze=False)
    for col, regime in enumerate(regimes):
        for j, depth in enumerate(sorted({r["depth"] for r in converged})):
            chosen = [r for r in converged if r["regime"] == regime and r["depth"] == depth]
            grid = sorted({r["init_scale"] for r in chosen})
            for row, (label, keys) in enumerate(LIMIT_PANELS):
                ax = axes[row, col]
                for key, dash in zip(keys, ("-", "--")):
                    values = [[r["quantities"].get(key) for r in chosen if r["init_scale"] == s] for s in grid]
                    points = [(s, [max(v, 1e-17) for v in vs if v is not None]) for s, vs in zip(grid, values)]
                    points = [(s, vs) for s, vs in points if vs]
                    if not points:
                        continue
                    xs = [s for s, _ in points]
                    ax.loglog(xs, [math.exp(np.mean(np.log(vs))) for _, vs in points], dash, marker="o",
                              ms=3, color=f"C{j}", label=f"depth {depth}" if dash == "-" else None)
                    if dash == "-":
                        ax.fill_between(xs, [min(vs) for _, vs in points], [max(vs) for _, vs in points],
                                        color=f"C{j}", alpha=0.2)
        for row, (label, _) in enumerate(LIMIT_PANELS):
            ax = axes[row, col]
            ax.set(xlabel="s (scale of the start)", ylabel=label)
            ax.set_title(f"{regime}: {label}" + (" (dashed: restricted)" if row == 0 else ""), fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    return fig


def findings_text(findings):
    """An experiment's findings for the terminal: its fitted exponents, one line per group
    (stability: a depth and measure; limit: a regime and depth), and the runs that did not
    converge."""
    rows = [f"  exponents (fitted over {findings['fitted_over']}), mean [min, max] over seeds:"]
    text = lambda v: f"{v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" if v else "-"

    def leaves(node, path):
        if node is None or "mean" in node:
            yield path, node
        else:
            for key, value in node.items():
                yield from leaves(value, path + [key])
    groups = {}
    for path, stats in leaves(findings["exponent"], []):
        groups.setdefault(" ".join(path[:-1]), []).append(f"{path[-1].replace('_', ' ')} {text(stats)}")
    rows += [f"    {group}: " + "; ".join(items) for group, items in groups.items()]
    if findings.get("not_converged"):
        rows.append(f"  not converged (left out): {', '.join(findings['not_converged'])}")
    return "\n".join(rows)


def summary(name, runs, claim, stop):
    """The terminal table: the claim, then per run the first and last loss, measures, steps,
    time and stop; over several runs how many converged, with statistics over those and
    over all."""
    value = "" if claim["value"] is None else f" (value {claim['value']:.6g})"
    why = f": {claim['why']}" if "why" in claim else ""
    width = max([24] + [len(label) + 1 for label in runs])          # (the longest name fits)
    head = f"{name}: " + (f"{claim['claim']}: " if not claim["claim"].startswith(name) else "")
    rows = [f"{head}{'holds' if claim['holds'] else claim['verdict'].upper()}"
            f"{why}{value}{'  [interrupted]' if stop == 'interrupted' else ''}",
            f"  {'run':<{width}}{'loss 0':>11}{'loss end':>11}{'align p/m':>16}{'invar p/m':>16}"
            f"{'steps':>9}{'time s':>9}  stop"]
    for label, run in runs.items():
        m = run["measurements"]
        first, last = _worst([run["losses"][0], run["losses"][-1]])
        pair = lambda what: (f"{m[what + '_paired'][-1]:.4f}/{m[what + '_matched'][-1]:.4f}"
                             if what + "_paired" in m else "-")
        rows.append(f"  {label:<{width}}{first:>11.3e}{last:>11.3e}{pair('alignment'):>16}"
                    f"{pair('invariance'):>16}{run['final_step']:>9,}{run['wall_time']:>9.2f}  "
                    f"{run['stop_reason']}")
    if len(runs) > 1:
        stats = spread(runs)
        rows.append(f"  converged (loss below --tol): {stats['converged']} of {stats['runs']} runs")
        for which in ("converged", "all"):
            part = stats[f"over_{which}"]
            if part:
                rows.append(f"  over {which} ({part['runs']}): steps {part['final_step']['mean']:,.0f} +- "
                            f"{part['final_step']['std']:,.0f}" + "".join(
                                f", {key.replace('_', ' ')} {part[key]['mean']:.4f} +- {part[key]['std']:.4f}"
                                for key in ("alignment_paired", "invariance_paired") if key in part))
    return "\n".join(rows)


def spread(runs):
    """How many runs converged (stopped below --tol), and the mean and standard deviation of
    the final values over the converged runs and over all runs."""
    def stats(chosen):
        if not chosen:
            return {}
        out = {"runs": len(chosen)}
        for key in ("final_step", "wall_time"):
            values = [r[key] for r in chosen]
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        for m in align.MEASURE_KEYS:
            values = [r["measurements"][m][-1] for r in chosen if m in r["measurements"]]
            if values:
                out[m] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        return out
    converged = [r for r in runs.values() if r["stop_reason"] == "tol"]
    return {"runs": len(runs), "converged": len(converged), "over_converged": stats(converged),
            "over_all": stats(list(runs.values()))}


# ------------------------------------------------------------- the report --
# One model, two renderings: blocks ("h", level, spans), ("p", spans), ("ul", [spans]),
# ("table", header, [[spans per cell]]), ("img", alt, png path); spans are (text, style)
# with style None, "b" (bold), "code", or a class: "holds", "fails", "missing",
# "interrupted" (bold in Markdown, coloured in HTML).

def report(out, experiments, verify_rows=None, verify_quick=False):
    """results/report.md and a self-contained report.html from the JSON files in ``out``:
    the verify table first (marked when from verify --quick), then per experiment its
    figure, claim, verdict, steps, time, device, seeds and the command that reproduces it;
    missing, interrupted and unreadable results said.  Returns (markdown, html,
    [(path, problem) of each unreadable file])."""
    blocks, unreadable = [("h", 1, [("Reproduction report", None)])], []
    if verify_rows:
        heading = "Every numbered statement, checked" + (" (verify --quick: one seed)"
                                                         if verify_quick else "")
        blocks += [("h", 2, [(heading, None)]),
                   ("table", ["statement", "checked", "value", "tol", "verdict"],
                    [[[(r.statement, None)], [(r.checked, None)], [(f"{r.value:.2e}", None)],
                      [(f"{r.op} {r.tol:.0e}", None)],
                      [("holds", "holds")] if r.holds else [("FAILS", "fails")]]
                     for r in verify_rows])]
    blocks.append(("h", 2, [("Experiments", None)]))
    for name, exp in experiments.items():
        path = next((os.path.join(out, f"{name}{s}.json") for s in ("", "-quick", "-interrupted")
                     if os.path.exists(os.path.join(out, f"{name}{s}.json"))), None)
        result, problem = _read_result(path) if path else (None, None)
        if problem:
            unreadable.append((path, problem))
        blocks += _experiment_blocks(name, exp, path, result, problem)
    return _markdown(blocks), _html(blocks), unreadable


def _experiment_blocks(name, exp, path, result, problem):
    blocks = [("h", 3, [(f"{name}: {exp.paper}", None)])]
    if path is None:
        return blocks + [("p", [("Missing", "missing"), (f": no {name}.json in the results "
                                                          "folder (", None),
                                (f"python experiments.py {name}", "code"), (" makes it).", None)])]
    if problem:
        return blocks + [("p", [("Unreadable", "missing"),
                                (f": {os.path.basename(path)} ({problem}); ", None),
                                (f"python experiments.py {name}", "code"), (" replaces it.", None)])]
    f = _experiment_facts(result)
    png = path[:-5] + ".png"
    status = [(f["status"], "interrupted" if f["status"] != "done" else "b")]
    if f["status"] == "interrupted":
        status.append((" (the run was stopped before the end)", None))
    if path.endswith("-quick.json"):
        status.append((" (a --quick run)", None))
    blocks.append(("img", name, png) if os.path.exists(png) else ("p", [("(no plot)", None)]))
    return blocks + [("ul", [
        [("status: ", None)] + status,
        [(f"claim: {f['claim']}: ", None), (f["verdict"], "b"), (f" {f['why']}", None)],
        [(f"steps: {f['steps']}; converged {f['converged']}; time {f['time']}; "
          f"device {f['device']}", None)],
        [(f"alignment (paired) {f['alignment']}; invariance (paired) {f['invariance']}", None)],
        [("reproduce: ", None), (f["command"], "code")]])]


def _read_result(path):
    """(an experiment's JSON record, None), or (None, what is wrong with the file)."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(result, dict) or not isinstance(result.get("runs"), dict) or \
            not isinstance(result.get("claim"), dict) or \
            not all(isinstance(r, dict) and "final_step" in r for r in result["runs"].values()):
        return None, "not an experiment's record (no runs or claim)"
    return result, None


def _experiment_facts(result):
    runs = list(result["runs"].values())
    summary = result.get("summary", {})
    env = result.get("environment", {})
    return {"status": result.get("status", "?"), "claim": result["claim"].get("claim", ""),
            "verdict": result["claim"].get("verdict", "holds" if result["claim"].get("holds") else "?"),
            "why": result["claim"].get("why", ""),
            "steps": ", ".join(f"{r['final_step']:,}" for r in runs[:6]) + (" ..." if len(runs) > 6 else ""),
            "converged": f"{summary.get('converged', '?')} of {summary.get('runs', len(runs))}",
            "time": f"{result.get('wall_time', 0):.1f} s",
            "device": env.get("gpu", env.get("device", "?")),
            "command": result.get("command", ""),
            "alignment": _spread(summary.get("over_all", {}), "alignment_paired"),
            "invariance": _spread(summary.get("over_all", {}), "invariance_paired")}


def _spread(stats, key):
    s = stats.get(key)
    return "-" if not s else f"{s['mean']:.3f} +- {s['std']:.3f}"


def _md_spans(spans):
    return "".join(f"`{t}`" if s == "code" else f"**{t}**" if s else t for t, s in spans)


def _markdown(blocks):
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + _md_spans(block[2]), ""]
        elif kind == "p":
            lines += [_md_spans(block[1]), ""]
        elif kind == "ul":
            lines += [f"- {_md_spans(item)}" for item in block[1]] + [""]
        elif kind == "img":
            lines += [f"![{block[1]}]({os.path.basename(block[2])})", ""]
        elif kind == "table":
            header = block[1]
            lines += ["| " + " | ".join(header) + " |",
                      "| " + " | ".join("---:" if h in ("value", "tol") else "---" for h in header)
                      + " |"]
            lines += ["| " + " | ".join(_md_spans(cell).replace("|", "\\|") for cell in row) + " |"
                      for row in block[2]]                      # (| in a cell: escaped)
            lines.append("")
    return "\n".join(lines)


def _html_spans(spans):
    e = html.escape
    return "".join(f"<code>{e(t)}</code>" if s == "code" else f"<b>{e(t)}</b>" if s == "b"
                   else f"<span class='{s}'>{e(t)}</span>" if s else e(t) for t, s in spans)


def _html(blocks):
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Reproduction report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}"
             ".holds{color:#070}.fails,.missing,.interrupted{color:#b00;font-weight:bold}"
             "img{max-width:100%}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{_html_spans(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_html_spans(block[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_html_spans(item)}</li>" for item in block[1])
                         + "</ul>")
        elif kind == "img":
            data = base64.b64encode(open(block[2], "rb").read()).decode()
            parts.append(f"<img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                         + "</tr>" + "".join("<tr>" + "".join(f"<td>{_html_spans(cell)}</td>"
                                                             for cell in row) + "</tr>"
                                             for row in block[2]) + "</table>")
    parts.append("</body></html>")
    return "".join(parts)
