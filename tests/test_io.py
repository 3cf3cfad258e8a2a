"""`.eqx` model files (`uma_eqx/_io.py`): round trips, and a one-line `ValueError` naming the
path and the fix for every kind of bad file (truncated, corrupt, newer, foreign, a checkpoint)."""

import gzip
import io
import json
import pickle
import zipfile

import jax
import numpy as np
import pytest
from conftest import FIXTURE_NAMES, FIXTURES

import uma_eqx
from uma_eqx._io import FORMAT_VERSION, HEADER_LENGTH_BYTES, MAGIC, file_kind
from uma_eqx.convert import load_pytorch_checkpoint

GOOD = FIXTURES / "dense.eqx"


def _parts(path=GOOD) -> tuple[dict, bytes]:
    """(header, leaves) of a good file."""
    blob = path.read_bytes()
    start = len(MAGIC) + HEADER_LENGTH_BYTES
    size = int.from_bytes(blob[len(MAGIC) : start], "little")
    return json.loads(blob[start : start + size]), blob[start + size :]


def _file(path, header, leaves: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(text).to_bytes(HEADER_LENGTH_BYTES, "little") + text + leaves)
    return path


def _raises(fn, path, *fragments):
    """`fn(path)` raises a one-line ValueError naming the path and containing `fragments`."""
    with pytest.raises(ValueError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_committed_files_load_and_roundtrip(tmp_path, name):
    model = uma_eqx.load(FIXTURES / f"{name}.eqx")
    header = uma_eqx.read_header(FIXTURES / f"{name}.eqx")
    assert header["format"] == "uma_eqx" and header["format_version"] == FORMAT_VERSION
    uma_eqx.save(tmp_path / "again.eqx", model)
    again = uma_eqx.load(tmp_path / "again.eqx")
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_default_model_file_loads():
    assert uma_eqx.read_header(uma_eqx._default.DEFAULT_MODEL)["format_version"] == FORMAT_VERSION
    assert uma_eqx.load(uma_eqx._default.DEFAULT_MODEL).config.task_names == ("omat",)


def test_missing_file_and_directory(tmp_path):
    for fn in (uma_eqx.load, uma_eqx.read_header):
        with pytest.raises(FileNotFoundError, match="model file not found"):
            fn(tmp_path / "missing.eqx")
        with pytest.raises(IsADirectoryError, match="is a directory"):
            fn(tmp_path)


def _cut_points() -> dict[str, int]:
    _, leaves = _parts()
    total = GOOD.stat().st_size
    return {
        "inside the magic": 4,
        "inside the header length": len(MAGIC) + 3,
        "inside the header": len(MAGIC) + HEADER_LENGTH_BYTES + 10,
        "inside the weights": total - len(leaves) // 2,
        "one byte short": total - 1,
    }


@pytest.mark.parametrize("where, cut", list(_cut_points().items()))
def test_truncated(tmp_path, where, cut):
    path = tmp_path / "cut.eqx"
    path.write_bytes(GOOD.read_bytes()[:cut])
    message = _raises(uma_eqx.load, path, "again")
    assert "truncated" in message
    if where in ("inside the weights", "one byte short"):
        uma_eqx.read_header(path)  # the header itself is intact
        assert "model weights" in message and "array" in message
    else:
        assert _raises(uma_eqx.read_header, path) == message


def test_corrupt_header(tmp_path):
    header, leaves = _parts()
    blob = GOOD.read_bytes()
    start = len(MAGIC) + HEADER_LENGTH_BYTES
    cases = {
        "huge length": blob[: len(MAGIC)] + (10**12).to_bytes(HEADER_LENGTH_BYTES, "little") + blob[start:],
        "zero length": blob[: len(MAGIC)] + bytes(HEADER_LENGTH_BYTES) + blob[start:],
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.eqx").write_bytes(data)
        _raises(uma_eqx.load, tmp_path / f"{name}.eqx", "corrupt uma_eqx header", "length field says")
    bad_json = bytearray(blob)
    bad_json[start] = ord("[")  # the header's opening "{"
    (tmp_path / "json.eqx").write_bytes(bytes(bad_json))
    _raises(uma_eqx.read_header, tmp_path / "json.eqx", "not valid JSON")
    not_utf8 = bytearray(blob)
    not_utf8[start + 1] = 0xFF
    (tmp_path / "utf8.eqx").write_bytes(bytes(not_utf8))
    _raises(uma_eqx.read_header, tmp_path / "utf8.eqx", "not valid JSON")
    for name, bad, fragment in [
        ("list", [1, 2], "not an object"),
        ("no config", {k: v for k, v in header.items() if k != "config"}, "missing ['config']"),
        ("string version", {**header, "format_version": "1"}, "format_version='1'"),
        ("version 0", {**header, "format_version": 0}, "format_version=0"),
        ("other format", {**header, "format": "npz"}, "format='npz'"),
        ("dtype", {**header, "dtype": "int8"}, "dtype='int8'"),
        ("references dtype", {**header, "references_dtype": "double-ish"}, "references_dtype='double-ish'"),
        ("config type", {**header, "config": "lmax=2"}, "config is a JSON str"),
    ]:
        path = _file(tmp_path / f"{name}.eqx", bad, leaves)
        _raises(uma_eqx.read_header, path, "corrupt uma_eqx header", fragment)
        _raises(uma_eqx.load, path, "corrupt uma_eqx header", fragment)
    # a header that parses but describes another model: its config, then the weights' shapes
    path = _file(tmp_path / "field.eqx", {**header, "config": {**header["config"], "no_such_field": 1}}, leaves)
    _raises(uma_eqx.load, path, "invalid model config", "no_such_field")
    wider = {**header, "config": {**header["config"], "sphere_channels": header["config"]["sphere_channels"] + 1}}
    _raises(uma_eqx.load, _file(tmp_path / "shape.eqx", wider, leaves), "model weights", "array 1 of", "expected")


def test_garbage_weights(tmp_path):
    header, leaves = _parts()
    garbage = np.random.default_rng(0).integers(0, 256, len(leaves), dtype=np.uint8).tobytes()
    _raises(uma_eqx.load, _file(tmp_path / "garbage.eqx", header, garbage), "model weights", "array 1 of")


def test_trailing_bytes(tmp_path):
    path = tmp_path / "extra.eqx"
    path.write_bytes(GOOD.read_bytes() + b"extra")
    _raises(uma_eqx.load, path, "5 unexpected bytes after the weights")


def test_newer_format_version(tmp_path):
    header, leaves = _parts()
    path = _file(tmp_path / "future.eqx", {**header, "format_version": FORMAT_VERSION + 1}, leaves)
    # a newer layout may drop or rename keys: the version is still what the message names
    other = _file(tmp_path / "other.eqx", {"format_version": FORMAT_VERSION + 1, "model": {}}, leaves)
    for fn in (uma_eqx.read_header, uma_eqx.load):
        for p in (path, other):
            _raises(fn, p, f"format version {FORMAT_VERSION + 1}", f"up to {FORMAT_VERSION}", "upgrade uma_eqx")


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("notes.txt", "hello")
    return buffer.getvalue()


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


#: (file contents, file_kind's kind, a fragment of the error) for files that are not models.
FOREIGN = {
    "empty": (b"", "empty", "an empty file"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(32), "png", "a PNG image"),
    "zip": (_zip_bytes(), "zip", "a zip archive"),
    "gzip": (gzip.compress(b"2\n\nCu 0 0 0\nCu 0 0 1.8\n"), "gzip", "gzip-compressed"),
    "npy": (_npy_bytes(), "npy", "NumPy .npy"),
    "hdf5": (b"\x89HDF\r\n\x1a\n" + bytes(32), "hdf5", "an HDF5 file"),
    "text": (b"2\nProperties=species:S:1:pos:R:3\nCu 0 0 0\nCu 0 0 1.8\n", "text", "a text file"),
    "wrong magic": (b"UMA-EQY\n" + GOOD.read_bytes()[len(MAGIC) :], "unknown", "unknown format"),
    "binary": (bytes(range(256)), "unknown", "unknown format"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_files(tmp_path, name):
    data, kind, fragment = FOREIGN[name]
    path = tmp_path / "model.eqx"  # the right name: the content decides
    path.write_bytes(data)
    assert file_kind(path)[0] == kind
    for fn in (uma_eqx.load, uma_eqx.read_header):
        _raises(fn, path, fragment, "not a uma_eqx model file", "uma-eqx convert")
    _raises(load_pytorch_checkpoint, path, "not a PyTorch zip checkpoint", fragment)


@pytest.mark.parametrize("name", ["dense", "uma_s_1p1"])
def test_fairchem_checkpoint_given_to_load(tmp_path, name):
    renamed = tmp_path / "model.eqx"  # detected by content, whatever the name
    renamed.write_bytes((FIXTURES / f"{name}.pt").read_bytes())
    for path in (FIXTURES / f"{name}.pt", renamed):
        assert file_kind(path)[0] == "torch"
        for fn in (uma_eqx.load, uma_eqx.read_header):
            _raises(fn, path, "PyTorch checkpoint", "uma_eqx.load_fairchem_checkpoint(", "uma-eqx convert")


def test_pickle_given_to_load(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))  # torch's legacy .pt starts the same way
    assert file_kind(path)[0] == "pickle"
    _raises(uma_eqx.load, path, "legacy PyTorch checkpoint", "uma_eqx.load_fairchem_checkpoint(")
    _raises(load_pytorch_checkpoint, path, "Python pickle", "zip format", "re-save it")


def test_eqx_given_to_load_fairchem_checkpoint(tmp_path):
    """Told by content before torch is imported, in the library and the top-level wrapper."""
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(GOOD.read_bytes())
    short = tmp_path / "short.pt"
    short.write_bytes(MAGIC[:5])
    for path in (GOOD, renamed, short):
        for fn in (uma_eqx.load_fairchem_checkpoint, load_pytorch_checkpoint):
            _raises(fn, path, "uma_eqx model file", "not a PyTorch checkpoint", "uma_eqx.load(")


def test_truncated_checkpoint(tmp_path):
    data = (FIXTURES / "dense.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    assert file_kind(path) == ("torch", "a PyTorch checkpoint (zip format), truncated or corrupt")
    _raises(load_pytorch_checkpoint, path, "truncated or corrupt", "download or copy it again")
    _raises(uma_eqx.load, path, "PyTorch checkpoint", "truncated or corrupt")


class _Payload:
    """Unpickling this would create `marker` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_in_weights_are_not_run(tmp_path):
    header, leaves = _parts()
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    np.save(payload, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    path = _file(tmp_path / "evil.eqx", header, payload.getvalue() + leaves)
    _raises(uma_eqx.load, path, "model weights", "array 1 of")
    assert not marker.exists()


def test_pickled_code_in_a_checkpoint_is_not_run(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Payload(marker)}, path)
    assert file_kind(path)[0] == "torch"
    _raises(load_pytorch_checkpoint, path, "cannot read")
    assert not marker.exists()
