"""Shared test configuration: float64 enabled, fixture paths, tolerance table."""

import os
import pathlib
import tempfile

import jax

jax.config.update("jax_enable_x64", True)
# `uma-eqx` commands run in-process here would otherwise switch on the on-disk compilation
# cache for the whole test process (tests/test_compile_cache.py tests it in child processes).
os.environ["UMA_EQX_COMPILE_CACHE"] = "0"
#: The suite's own on-disk compilation cache, in this process only (child processes keep their
#: settings: tests/test_compile_cache.py and tests/test_cold_start.py count cache hits there).
#: Test modules drop their compiled programs (below) and the pytest-xdist workers meet the same
#: programs, so a program compiled once is loaded, not compiled, by later modules and workers.
#: `UMA_EQX_TEST_XLA_CACHE=off` compiles everything afresh.
_TEST_XLA_CACHE = os.environ.get(
    "UMA_EQX_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), f"uma_eqx_test_xla_{os.getuid()}")
)
if _TEST_XLA_CACHE != "off":
    jax.config.update("jax_compilation_cache_dir", _TEST_XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ("uma_s_1p1", "uma_s_1p2", "uma_m_1p1", "dense")

#: Parity tolerances against fairchem, relative to the largest reference component
#: (issue #2): float32 runs of fairchem itself differ by up to ~8e-6.
TOLERANCES = {
    "float64": {"energy": 1e-9, "forces": 1e-9, "stress": 1e-9},
    "float32": {"energy": 1e-5, "forces": 1e-4, "stress": 1e-4},
}


def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every XLA:CPU executable keeps memory mappings alive; the whole suite compiles thousands of
    programs and, in one process, reached the kernel's `vm.max_map_count` (65530), after which
    compilation crashed (SIGSEGV/SIGABRT inside `backend_compile`). Clearing the caches between
    modules releases them.
    """
    yield
    jax.clear_caches()
