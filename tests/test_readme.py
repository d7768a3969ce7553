"""The README as a reader meets it: its Python examples run, it fits its budget, and its
verify table lists every row verify prints."""
import os
import re
import subprocess
import sys

import pytest

import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("block", python_blocks(README))
def test_every_python_example_of_the_readme_runs(block, tmp_path):
    """Each ```python block runs as a script beside the project's modules (in a fresh
    folder, so that it writes nothing into the checkout)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip()                        # (each example prints what it shows)


def test_the_readme_has_an_example_and_fits_300_lines():
    assert python_blocks(README) and len(README.splitlines()) <= 300
    assert not re.search(r"\{[A-Z_]+\}", README)                        # no placeholder left


def test_the_readme_verify_table_has_every_row_verify_prints():
    """The statements of the README's verify table are those of verify's checks, in order."""
    rows = [r.statement for r in verify.verify(quick=True)]
    table = re.search(r"\| statement \|.*?\n\n", README, flags=re.S).group(0)
    shown = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert shown == rows
