"""benchmarks/compare.py: its rows are bench.py's ratios, and bad input is named."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "compare.py")


def compare_module():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_rows_are_bench_ratios_from_the_minimum_times():
    m = {"step_ours_1000": 1.0, "step_ours_4000": 1.6, "step_plain_60": 1.2, "step_torch_60": 0.6,
         "train_measuring_20": 2.0, "train_only_20": 1.0, "train_measuring_80": 5.0,
         "train_only_80": 1.0, "measure_full": 1.0, "fig2b_ours": 0.5, "fig2b_full": 1.0,
         "cor1_full_20": 2.0, "cor1_reduced_200": 0.02, "seeds1_training": 0.1,
         "seeds1_measuring": 0.2, "seeds100_training": 1.0, "seeds100_measuring": 4.0,
         "seeds1000_training": 8.0, "seeds1000_measuring": 30.0, "measure_1000_networks": 0.1}
    rows = compare_module().ratios(m)
    assert rows["GD step vs straightforward Eq. (8)"] == pytest.approx(0.02 / 0.0002)   # 100x
    assert rows["GD step vs PyTorch autograd"] == pytest.approx(0.01 / 0.0002)
    assert rows["measuring fig1b vs full SVDs"] == pytest.approx(1.0 / (3.0 / 60))        # 20x
    assert rows["measuring fig2b vs full SVDs"] == pytest.approx(2.0)
    assert rows["Corollary 1 vs full GD"] == pytest.approx(0.1 / 0.0001)                 # 1000x
    assert rows["cost per seed, 100 seeds, training"] == pytest.approx(0.1)
    assert rows["cost per seed, 1000 seeds, measuring"] == pytest.approx(0.15)
    assert rows["one measurement of 1000 networks vs 100 steps"] == pytest.approx(4.0)


@pytest.mark.parametrize("args, message", [
    ([], "give two checkouts"),
    ([ROOT, "/no/such/tree"], "/no/such/tree is not a checkout"),
    ([ROOT, ROOT, "--parts", "steps"], "--parts takes step, measure, cor1, seeds"),
])
def test_compare_names_bad_input(args, message):
    done = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True)
    assert done.returncode == 1 and message in done.stderr
