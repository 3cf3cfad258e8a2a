"""Every script in examples/ runs as written (with fewer steps) and prints its result."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    if "jax_md" in script.name:
        pytest.importorskip("jax_md")
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "40"], capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    print(result.stdout)
