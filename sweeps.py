"""Grid sweeps over an experiment's parameters, in shards for job arrays.

    python experiments.py sweep fig1a --grid lr=0.01,0.02 --grid depth=2,3,4 --seeds 5
    python experiments.py sweep fig1a ... --shard 2/4      # the 2nd of 4 parts (a job array)
    python experiments.py sweep fig1a ... --merge          # join the parts into one result

A cell is one combination of the grid's values (itertools.product order: the last --grid
varies fastest); each cell trains --seeds networks.  Cells whose networks share shapes
train as one batch, each network with its own learning rate, so a grid costs little more
than its slowest cell.  Shard I of N takes the cells whose index is I - 1 modulo N (none
when N exceeds the cells: an empty shard is complete) and writes
<out>/sweep-<experiment>-shard-I-of-N.json; in a SLURM job array --shard comes from the
array itself.  --merge checks that the N parts are there, complete and of the same sweep
(naming every one that is not, with the --array list to resubmit) and writes
<out>/sweep-<experiment>.{json,csv,png} as the unsharded sweep would (every network trains
in a batch either way, so the records are the same bit for bit; only wall times and batch
sizes differ).  --quick sweeps write -quick files; an interrupted shard never replaces a
complete one (it goes to ...-interrupted.json).
"""
import csv
import dataclasses
import glob
import io
import itertools
import json
import os
import re
import time

import numpy as np

import align
import outputs
from outputs import ExperimentError

FINAL = align.MEASURE_KEYS                       # the cells' statistics: each measure at the end
POSITIVE = {"lr", "init_scale"}                  # must be > 0; depth, width, n: integers >= 1


def parse_grid(items, name, exp, kinds):
    """{parameter: [values]} from --grid NAME=V1,V2,... items; ExperimentError naming the
    problem (an unknown or inapplicable name, a repeated one, a bad value)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ExperimentError(f"--grid {item}: write NAME=V1,V2,... (e.g. --grid lr=0.01,0.02)")
        if key not in kinds:
            raise ExperimentError(f"--grid {key}: unknown parameter; {name} sweeps "
                                  f"{', '.join(exp.sweeps)}")
        if key not in exp.sweeps:
            raise ExperimentError(f"--grid {key}: does not apply to {name}, which sweeps "
                                  f"{', '.join(exp.sweeps)}")
        if key in grid:
            raise ExperimentError(f"--grid {key} given twice: put all its values in one --grid")
        grid[key] = [_value(key, text, kinds[key]) for text in values.split(",")]
        if len(set(grid[key])) < len(grid[key]):
            raise ExperimentError(f"--grid {key}: a value is repeated ({values})")
    if not grid:
        raise ExperimentError("sweep needs at least one --grid NAME=V1,V2,...")
    return grid


def _value(key, text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise ExperimentError(f"--grid {key}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not np.isfinite(value) or value < 0 or (value == 0 and key != "eps") or \
            (kind is int and value < 1):
        raise ExperimentError(f"--grid {key}: {text} is out of range (" +
                              ("eps >= 0" if key == "eps" else "> 0" if key in POSITIVE else ">= 1") + ")")
    return value


def cells(grid):
    """Every combination of the grid's values, in a fixed order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def cell_name(cell):
    """A cell as "lr=0.01 depth=3": the prefix of its runs' names."""
    return " ".join(f"{k}={v:g}" for k, v in cell.items())


def parse_shard(text):
    """(I, N) from "I/N" with 1 <= I <= N; ValueError otherwise (a usage error)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"--shard {text}: write I/N with 1 <= I <= N (e.g. --shard 2/4)")
    return int(match[1]), int(match[2])


def shard_from_array(environ, shards=None):
    """(I, N) of a SLURM job array task, from SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and
    SLURM_ARRAY_TASK_COUNT (I = ID - MIN + 1, so arrays numbered from 0 or from 1 both
    work), or with ``shards`` (an array resubmitted for some shards: --array=4,7 --shards
    16) (ID, shards); None outside an array.  ValueError for an array that is not one
    contiguous range (e.g. --array=1,3,5) without ``shards``."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        if shards:
            raise ValueError("--shards N is for a job array's tasks (SLURM_ARRAY_TASK_ID is not "
                             "set): give --shard I/N")
        return None
    if shards:
        return parse_shard(f"{environ['SLURM_ARRAY_TASK_ID']}/{shards}")
    try:
        task, first, count = (int(environ[k]) for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                        "SLURM_ARRAY_TASK_COUNT"))
    except (KeyError, ValueError):
        raise ValueError("a SLURM array task without SLURM_ARRAY_TASK_MIN and _COUNT as "
                         "integers: give --shard I/N") from None
    shard = task - first + 1, count
    if not 1 <= shard[0] <= count:
        raise ValueError(f"array task {task} of an array from {first} with {count} tasks is not "
                         f"one contiguous range: give --shard I/N")
    return shard


def shard_indices(count, shard):
    """The cell indices of shard (I, N): those equal to I - 1 modulo N (all without a shard)."""
    return list(range(count)) if shard is None else list(range(shard[0] - 1, count, shard[1]))


def run_sweep(name, exp, cfg, grid, shard, train_problems, thinned):
    """Train the cells of this shard (all without one), every network as part of a batch
    (``train_problems(..., always_batch=True)``): (its runs in cell order, each ``thinned``
    to every --loss-every-th loss, "done" or "interrupted")."""
    every, problems = cells(grid), []
    for index in shard_indices(len(every), shard):
        cell = every[index]
        for p in exp.problems(dataclasses.replace(cfg, **cell)):
            problems.append(dataclasses.replace(p, name=f"{cell_name(cell)} {p.name}",
                                                extra=p.extra | {"cell": cell, "cell_index": index}))
    runs, status = {}, "done"
    try:
        train_problems(cfg, runs, f"sweep {name}", problems, always_batch=True)
    except KeyboardInterrupt:                   # (the runs so far are in runs)
        status = "interrupted"
    return {p.name: thinned(runs[p.name], cfg.loss_every) for p in problems if p.name in runs}, status


def cell_stats(grid, runs):
    """Per cell: its values, how many runs (converged), steps and each final measure's mean,
    standard deviation, min and max over the seeds."""
    out = []
    for index, cell in enumerate(cells(grid)):
        mine = [r for r in runs.values() if r["cell_index"] == index]
        if not mine:
            continue
        row = {"cell": cell, "runs": len(mine),
               "converged": sum(r["stop_reason"] == "tol" for r in mine),
               "final_step": _stats([r["final_step"] for r in mine])}
        for key in FINAL:
            values = [r["measurements"][key][-1] for r in mine if key in r["measurements"]]
            if values:
                row[key] = _stats(values)
        out.append(row)
    return out


def _stats(values):
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def csv_text(grid, stats):
    """One row per cell: its values, runs, converged, mean steps, and mean, std, min, max
    of each final measure."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*grid, "runs", "converged", "steps_mean"] +
                    [f"{key}_{s}" for key in FINAL for s in ("mean", "std", "min", "max")])
    for row in stats:
        writer.writerow([row["cell"][k] for k in grid] + [row["runs"], row["converged"],
                                                          row["final_step"]["mean"]] +
                        [row[key][s] if key in row else "" for key in FINAL
                         for s in ("mean", "std", "min", "max")])
    return buf.getvalue()


def summary_text(name, grid, stats, status):
    rows = [f"sweep {name}: {len(stats)} cells{'  [interrupted]' if status == 'interrupted' else ''}",
            "  " + "".join(f"{k:>12}" for k in grid) + f"{'runs':>6}{'conv':>6}{'steps':>10}"
            f"{'align p':>18}{'invar p':>18}"]
    for row in stats:
        pm = lambda key: (f"{row[key]['mean']:.4f} +- {row[key]['std']:.4f}" if key in row else "-")
        rows.append("  " + "".join(f"{row['cell'][k]:>12g}" for k in grid) +
                    f"{row['runs']:>6}{row['converged']:>6}{row['final_step']['mean']:>10,.0f}"
                    f"{pm('alignment_paired'):>18}{pm('invariance_paired'):>18}")
    return "\n".join(rows)


def figure(title, grid, stats):
    """One parameter: the final alignment and invariance against it (mean, min-max band;
    solid paired, dashed matched).  Two: heatmaps of the mean final paired alignment and
    invariance.  More: a note (see the CSV)."""
    if len(grid) > 2:
        return f"no plot for a sweep of {len(grid)} parameters: the CSV has every cell"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install '.[plot]' to get the plots"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(grid)
    for ax, what in zip(axes, ("alignment", "invariance")):
        if len(grid) == 1:
            x = [row["cell"][names[0]] for row in stats]
            for how, dash in (("paired", "-"), ("matched", "--")):
                key = f"{what}_{how}"
                ax.plot(x, [row[key]["mean"] for row in stats], dash, marker="o", ms=3, color="C0",
                        label=f"{how} rule, mean")
                if how == "paired":
                    ax.fill_between(x, [row[key]["min"] for row in stats],
                                    [row[key]["max"] for row in stats], color="C0", alpha=0.2,
                                    label="min-max over seeds")
            if min(x) > 0 and max(x) / min(x) >= 100:
                ax.set_xscale("log")
            ax.set(xlabel=names[0], ylabel=f"final {what}", ylim=(-0.02, 1.02))
            ax.legend(fontsize=7)
        else:
            rows, cols = grid[names[0]], grid[names[1]]
            mean = np.full((len(rows), len(cols)), np.nan)
            for row in stats:
                mean[rows.index(row["cell"][names[0]]), cols.index(row["cell"][names[1]])] = \
                    row[f"{what}_paired"]["mean"]
            image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(mean):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 else "k")
            ax.set(xticks=range(len(cols)), xticklabels=[f"{c:g}" for c in cols], xlabel=names[1],
                   yticks=range(len(rows)), yticklabels=[f"{r:g}" for r in rows], ylabel=names[0])
            fig.colorbar(image, ax=ax)
        ax.set_title(f"final {what} (paired rule{', mean over seeds' if len(grid) == 2 else ''})",
                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def base_name(name, quick):
    """sweep-<experiment>, or sweep-<experiment>-quick for --quick sweeps."""
    return f"sweep-{name}{'-quick' if quick else ''}"


def shard_path(out, name, shard, quick=False, interrupted=False):
    return os.path.join(out, f"{base_name(name, quick)}-shard-{shard[0]}-of-{shard[1]}"
                             f"{'-interrupted' if interrupted else ''}.json")


def identity(result):
    """What parts of one sweep must share: experiment, grid, seeds and the settings that
    change the numbers."""
    config = {k: v for k, v in result["config"].items()
              if k not in ("out", "quiet", "command", "threads", "device")}
    return {"swept": result["swept"], "grid": result["grid"], "config": config}


def read_parts(out, name, expected, quick=False):
    """The shards of sweep ``name`` in ``out``, checked: all N parts present, complete, each
    the sweep ``expected`` (identity) and holding its own cells.  ExperimentError names every
    shard that is missing, interrupted, unreadable or of another sweep at once, with the
    --array list to resubmit."""
    pattern = re.compile(re.escape(base_name(name, quick)) + r"-shard-(\d+)-of-(\d+)\.json")
    found = {tuple(map(int, m.groups())): os.path.join(out, f) for f in sorted(os.listdir(out))
             for m in [pattern.fullmatch(f)] if m}
    if not found:
        raise ExperimentError(f"no shards of sweep {name} in {out} ({base_name(name, quick)}-shard-"
                              f"I-of-N.json); run the parts with --shard I/N first")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise ExperimentError(f"shards of different splits in {out} (of {', '.join(map(str, counts))}): "
                              "remove those of the old split")
    count, parts, problems = counts[0], [], {}
    for i in range(1, count + 1):
        path = found.get((i, count))
        if path is None:
            problems[i] = f"{shard_path(out, name, (i, count), quick)} is missing"
            continue
        try:
            with open(path) as f:
                part = json.load(f)
            mine = identity(part)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems[i] = f"{path} cannot be read ({exc})"
            continue
        theirs = {**mine["config"], "experiment": mine["swept"], "grid": mine["grid"]}
        asked = {**expected["config"], "experiment": expected["swept"], "grid": expected["grid"]}
        differ = [f"{k} {theirs.get(k)} there, {asked.get(k)} here" for k in {**theirs, **asked}
                  if theirs.get(k) != asked.get(k)]
        if differ:
            problems[i] = f"{path} is from another sweep ({'; '.join(sorted(differ))})"
        elif part["shard"] != [i, count] or part["status"] != "done":
            problems[i] = f"{path} is not a complete shard {i}/{count} (status {part['status']})"
        else:
            parts.append(part)
    if problems:
        raise ExperimentError(f"{len(problems)} of {count} shards cannot be merged:\n  " +
                              "\n  ".join(problems.values()) + f"\nrerun them with this command's "
                              f"settings (a job array: sbatch --array={','.join(map(str, problems))} "
                              f"<your job script> --shards {count}) and merge again")
    return parts


def merged_runs(parts, grid):
    """The parts' runs in the unsharded sweep's order (by cell, then as trained)."""
    every = [(r["cell_index"], j, name, r) for part in parts for j, (name, r) in enumerate(part["runs"].items())]
    seen = [name for _, _, name, _ in every]
    if len(seen) != len(set(seen)):
        raise ExperimentError("the same run is in two shards: remove the duplicated shard files")
    cell_count = len(cells(grid))
    found = {i for i, *_ in every}
    if found != set(range(cell_count)):
        raise ExperimentError(f"cells {sorted(set(range(cell_count)) - found)} are in no shard")
    return {name: r for _, _, name, r in sorted(every, key=lambda t: (t[0], t[1]))}


def result_record(name, exp, cfg, grid, shard, runs, status, start, environment, version):
    """The sweep's JSON record."""
    return {"experiment": "sweep", "swept": name, "paper": exp.paper, "grid": grid,
            "shard": list(shard) if shard else None, "status": status, "command": cfg.command,
            "version": version, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.to_dict(), "environment": environment, "wall_time": time.perf_counter() - start,
            "cells": cell_stats(grid, runs), "runs": runs}


def write(result, out, name, shard):
    """A shard's JSON, or the sweep's JSON, CSV and PNG; the paths written."""
    stats, grid, quick = result["cells"], result["grid"], result["config"]["quick"]
    text = json.dumps(outputs.strict_json(result), indent=1, allow_nan=False)
    if shard:
        path = shard_path(out, name, shard, quick)
        if result["status"] != "done" and outputs.complete_result(path):
            path = shard_path(out, name, shard, quick, interrupted=True)
            print(f"  note: {shard_path(out, name, shard, quick)} holds a complete shard; this "
                  f"interrupted one goes to {os.path.basename(path)}")
        outputs.write_files({path: outputs.text_writer(text)})
        return [path]
    base = os.path.join(out, base_name(name, quick))
    if result["status"] != "done" and outputs.complete_result(base + ".json"):
        base += "-interrupted"
    writers = {base + ".json": outputs.text_writer(text), base + ".csv": outputs.text_writer(csv_text(grid, stats))}
    fig = figure(f"sweep {name}: " + ", ".join(f"{k} in {v}" for k, v in grid.items()) +
                 f", {result['config']['seeds']} seeds", grid, stats) if stats else "no cell finished"
    if not isinstance(fig, str):
        writers[base + ".png"] = lambda tmp: fig.savefig(tmp, dpi=120, format="png")
    try:
        outputs.write_files(writers, remove=[base + ".png"] if isinstance(fig, str) else [])
    finally:
        outputs.close_figure(fig)
    if isinstance(fig, str):
        print(f"  {fig}")
    return list(writers)


def done_already(name, exp, cfg, grid, shard, version):
    """Whether this shard's complete file of the same sweep exists (--skip-done)."""
    path = shard_path(cfg.out, name, shard, cfg.quick)
    if not outputs.complete_result(path):
        return False
    with open(path) as f:
        part = json.load(f)
    expected = result_record(name, exp, cfg, grid, shard, {}, "done", 0.0, {}, version)
    return identity(part) == identity(expected)


def merge(name, exp, cfg, grid, environment, version):
    """Join the shards in cfg.out into the sweep's result (as run unsharded)."""
    start = time.perf_counter()
    expected = identity(result_record(name, exp, cfg, grid, None, {}, "done", start, {}, version))
    parts = read_parts(cfg.out, name, expected, cfg.quick)
    runs = merged_runs(parts, grid)
    result = result_record(name, exp, cfg, grid, None, runs, "done", start, environment, version)
    result["wall_time"] = sum(p["wall_time"] for p in parts)
    result["merged_from"] = [shard_path(cfg.out, name, tuple(p["shard"]), cfg.quick) for p in parts]
    return result
