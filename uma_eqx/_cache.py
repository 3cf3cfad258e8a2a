"""A persistent (on-disk) cache of compiled XLA programs, so new processes skip recompiling."""

import hashlib
import os
import platform
from pathlib import Path

import jax

#: Environment variable naming the cache directory (our choice of name).
CACHE_DIR_ENV = "UMA_EQX_CACHE_DIR"


def host_fingerprint() -> str:
    """`<machine>-<12 hex digits>`: the architecture and a hash of the CPU's model and feature flags.

    Compiled CPU programs use the instruction-set extensions of the CPU that compiled them, and
    XLA's loader (jax 0.10) only logs an error when the loading CPU's features differ, then runs
    the program anyway, so one cache directory must never serve two kinds of CPU (a home
    directory shared by the nodes of a cluster, say): [`uma_eqx.default_cache_dir`][] has one
    subdirectory per fingerprint.
    """
    description = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for key in ("model name", "flags", "Features", "CPU part"):  # x86 and Arm spellings
        description += "|" + next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")
    digest = hashlib.sha256(description.encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_cache_dir() -> Path:
    """`$UMA_EQX_CACHE_DIR` if set, else `uma_eqx/xla/<host fingerprint>` under `$XDG_CACHE_HOME`
    (default `~/.cache`); see [`uma_eqx.host_fingerprint`][]."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "uma_eqx" / "xla" / host_fingerprint()


def enable_compilation_cache(
    directory: str | os.PathLike | None = None, *, min_compile_time_s: float | None = None
) -> Path:
    """Keep the compiled XLA programs of this process on disk and reuse them in later ones.

    A full-size UMA compiles for several seconds per graph size (one program per padding bucket,
    task and entry point); with the cache, a later process that meets the same program (same
    model architecture, shapes, dtype, jax version and machine) loads it instead of compiling it
    again. It still traces the model in Python. Weights are arguments, not constants, so
    fine-tuned variants of one architecture share entries.

    This sets JAX's process-wide options `jax_compilation_cache_dir` (and, if given,
    `jax_persistent_cache_min_compile_time_secs`), so it also caches the caller's own programs.
    Call it before the first compilation: JAX reads the options when it first compiles.
    `uma-eqx` commands call it unless given `--no-compile-cache`.

    **Arguments:**

    - `directory`: where to keep the programs; default [`uma_eqx.default_cache_dir`][]. Created
      if missing. Safe to share between processes.
    - `min_compile_time_s`: cache only programs that took at least this long to compile
      (JAX's default, 1 s, when `None`).

    **Returns:**

    The cache directory.
    """
    if min_compile_time_s is not None and not min_compile_time_s >= 0:
        raise ValueError(
            f"min_compile_time_s must be >= 0 seconds (or None for JAX's default), got {min_compile_time_s!r}."
        )
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path
