"""The built-in default model, shipped with the package."""

import functools
import json
import pathlib

from ._io import load
from ._potential import UMA

DATA = pathlib.Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "default_model.eqx"
DEFAULT_MODEL_REPORT = DATA / "default_model_report.json"


@functools.cache
def default_model() -> UMA:
    """A small UMA-architecture model (float32) trained by `uma_eqx.train` on EMT data.

    Elements Cu, Ag, Au, Ni, Pd, Pt, Al; task `"omat"`; lmax 2, 2 layers, 4 experts. It is a
    stand-in that runs out of the box without downloading weights: it reproduces ASE's EMT
    potential (see `default_model_report()` for its held-out errors), not DFT.
    Regenerate with `python data_gen/make_emt_dataset.py --out runs/emt` and
    `uma-eqx train data_gen/default_model.toml`.
    """
    return load(DEFAULT_MODEL)


def default_model_report() -> dict:
    """Held-out validation report of [`default_model`][] (errors against EMT)."""
    return json.loads(DEFAULT_MODEL_REPORT.read_text())
