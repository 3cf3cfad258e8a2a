"""The on-disk compilation cache: a second process loads the compiled program instead of compiling it.

Each run is a fresh child process (JAX reads the cache options at its first compilation and keeps
compiled programs in memory for the rest of a process), with the cache in a temporary directory.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import uma_eqx

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, ase.build
    import uma_eqx

    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    if sys.argv[1] != "off":
        uma_eqx.enable_compilation_cache(sys.argv[1], min_compile_time_s=0)
    model = uma_eqx.default_model()
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=0)
    graph = uma_eqx.AtomicGraph.from_atoms(atoms, cutoff=model.config.cutoff,
                                           datasets=model.config.datasets, task_name="omat")
    out = uma_eqx.energy_forces_stress(model, graph)
    print(json.dumps({
        "energy": float(out["energy"][0]),
        "forces": out["forces"].tolist(),
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "misses": events.count("/jax/compilation_cache/cache_misses"),
    }))
    """
)


def _child(*args: str, script: str = CHILD, env_update: dict | None = None):
    """Run `script` with `args` in a fresh Python process; returns the JSON of its last output line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_update or {}))
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_second_process_loads_compiled_programs_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first = _child(str(cache))
    assert first["misses"] > 0  # (a program met twice in one process is a hit already)
    assert any(cache.iterdir()), "the first process wrote no cache entries"
    second = _child(str(cache))
    assert second["misses"] == 0 and second["hits"] == first["hits"] + first["misses"]
    # the cached programs compute the same numbers as freshly compiled ones
    assert second["energy"] == first["energy"]
    np.testing.assert_array_equal(second["forces"], first["forces"])
    plain = _child("off")
    assert plain["hits"] == plain["misses"] == 0
    assert plain["energy"] == first["energy"]


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UMA_EQX_CACHE_DIR", str(tmp_path / "mine"))
    assert uma_eqx.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("UMA_EQX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert uma_eqx.default_cache_dir() == tmp_path / "xdg" / "uma_eqx" / "xla" / uma_eqx.host_fingerprint()


def test_host_fingerprint_separates_cpus(monkeypatch):
    import platform

    here = uma_eqx.host_fingerprint()
    assert here == uma_eqx.host_fingerprint() and here.startswith(platform.machine())
    monkeypatch.setattr(platform, "processor", lambda: "another CPU")
    assert uma_eqx.host_fingerprint() != here


def test_negative_min_compile_time_is_refused(tmp_path):
    with pytest.raises(ValueError, match="min_compile_time_s"):
        uma_eqx.enable_compilation_cache(tmp_path, min_compile_time_s=-1.0)


CLI_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    from click.testing import CliRunner
    from uma_eqx.cli import main

    result = CliRunner().invoke(main, sys.argv[1:])
    assert result.exit_code == 0, result.output
    print(json.dumps(jax.config.jax_compilation_cache_dir))
    """
)


@pytest.mark.parametrize(
    "args, env, enabled",
    [
        (["info"], {"UMA_EQX_COMPILE_CACHE": "1"}, True),
        (["--no-compile-cache", "info"], {"UMA_EQX_COMPILE_CACHE": "1"}, False),
        (["info"], {"UMA_EQX_COMPILE_CACHE": "0"}, False),  # what tests/conftest.py sets
        (["--compile-cache", "info"], {"UMA_EQX_COMPILE_CACHE": "0"}, True),
    ],
)
def test_cli_switches_the_cache_on_by_default(tmp_path, args, env, enabled):
    got = _child(*args, script=CLI_CHILD, env_update=dict(env, UMA_EQX_CACHE_DIR=str(tmp_path / "c")))
    assert got == (str(tmp_path / "c") if enabled else None)
