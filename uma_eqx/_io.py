"""Torch-free `.eqx` model files: a JSON header with the config, then Equinox leaves."""

import codecs
import dataclasses
import json
import os
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._config import UMAConfig
from ._heads import EnergyReferences
from ._potential import UMA, merge_experts


def _x64_enabled() -> bool:
    """Whether `jax_enable_x64` is on now."""
    return jax.config.jax_enable_x64  # pyright: ignore[reportAttributeAccessIssue]  # jax adds config options as attributes at run time


#: The first bytes of every `.eqx` model file: this package's own signature, written by [`save`][].
MAGIC = b"UMA-EQX\n"
#: The header length after `MAGIC`: an unsigned little-endian integer of this many bytes.
HEADER_LENGTH_BYTES = 8
#: The file layout [`save`][] writes and the newest one [`load`][] reads (1: `MAGIC`, header
#: length, JSON header, `eqx.tree_serialise_leaves` leaves). Raise it on any incompatible change.
FORMAT_VERSION = 1
#: Keys every header has since format version 1.
_HEADER_KEYS = ("format", "format_version", "dtype", "config")
#: How many leading bytes [`file_kind`][] looks at: the longest signature below (8 bytes) and a
#: zip's first record name (`torch.save` names it `<file stem>/data.pkl`).
_SNIFF_BYTES = 512
#: Zip local file header signature "PK\x03\x04" (PKWARE APPNOTE.TXT 4.3.7); `torch.save`'s
#: default format since PyTorch 1.6 is a zip archive.
_ZIP_LOCAL_HEADER = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True)
class _Signature:
    kind: str
    prefix: bytes
    what: str


#: Leading bytes of formats a model path may hold by mistake, checked in order.
_SIGNATURES = (
    _Signature("uma_eqx", MAGIC, "a uma_eqx model file"),
    _Signature("zip", _ZIP_LOCAL_HEADER, "a zip archive"),
    # an empty zip archive is only its end-of-central-directory record "PK\x05\x06" (APPNOTE 4.3.16)
    _Signature("zip", b"PK\x05\x06", "an empty zip archive"),
    # pickle's PROTO opcode b"\x80" then the protocol, 2..5 (Python's pickletools); torch.save's
    # legacy (pre-1.6, or _use_new_zipfile_serialization=False) format starts b"\x80\x02".
    _Signature("pickle", b"\x80\x02", "a Python pickle (protocol 2: a legacy PyTorch checkpoint?)"),
    _Signature("pickle", b"\x80\x03", "a Python pickle (protocol 3)"),
    _Signature("pickle", b"\x80\x04", "a Python pickle (protocol 4)"),
    _Signature("pickle", b"\x80\x05", "a Python pickle (protocol 5)"),
    # PNG signature (RFC 2083 section 3.1)
    _Signature("png", b"\x89PNG\r\n\x1a\n", "a PNG image"),
    # gzip member header ID1 ID2 (RFC 1952 section 2.3.1), e.g. a .tar.gz or .xyz.gz
    _Signature("gzip", b"\x1f\x8b", "a gzip-compressed file"),
    # HDF5 superblock format signature (HDF5 File Format Specification, section II.A)
    _Signature("hdf5", b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    # NumPy .npy magic string (numpy.lib.format, NEP 1)
    _Signature("npy", b"\x93NUMPY", "a NumPy .npy array"),
)


def file_kind(path: str | os.PathLike) -> tuple[str, str]:
    """What kind of file `path` is, from its first bytes (not its name).

    **Arguments:**

    - `path`: an existing file.

    **Returns:**

    `(kind, what)`: `kind` is one of `"uma_eqx"`, `"torch"` (a PyTorch zip checkpoint),
    `"pickle"`, `"zip"`, `"png"`, `"gzip"`, `"hdf5"`, `"npy"`, `"empty"`, `"truncated_uma_eqx"`
    (shorter than `MAGIC` but a prefix of it), `"text"` or `"unknown"`; `what` describes it in
    words for an error message (e.g. `"a PNG image"`).

    **Raises:**

    `OSError` if the file cannot be opened.
    """
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head:
        return "empty", "an empty file (0 bytes)"
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        return "truncated_uma_eqx", f"a truncated uma_eqx model file ({len(head)} bytes)"
    for sig in _SIGNATURES:
        if head.startswith(sig.prefix):
            return _zip_kind(path, head) if sig.prefix == _ZIP_LOCAL_HEADER else (sig.kind, sig.what)
    # a multi-byte UTF-8 character cut at _SNIFF_BYTES is not an error (final=False)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text", f"a text file (starting {text[:40]!r})"
    return "unknown", f"a file of unknown format (first bytes {head[:8]!r})"


#: Zip local file header layout (PKWARE APPNOTE.TXT 4.3.7): the name length is the 2-byte
#: little-endian field at offset 26, and the name starts at offset 30.
_ZIP_NAME_LENGTH_AT, _ZIP_NAME_AT = 26, 30


def _zip_kind(path, head: bytes) -> tuple[str, str]:
    """Tell a `torch.save` zip (records under one folder, the first being `<folder>/data.pkl`)
    from other zips, and a whole archive from a truncated one (no central directory at its end)."""
    n = int.from_bytes(head[_ZIP_NAME_LENGTH_AT : _ZIP_NAME_LENGTH_AT + 2], "little")
    first = head[_ZIP_NAME_AT : _ZIP_NAME_AT + n]
    whole = zipfile.is_zipfile(path)
    torch = first == b"data.pkl" or first.endswith(b"/data.pkl")
    if whole and not torch:
        try:
            with zipfile.ZipFile(path) as z:
                torch = any(name == "data.pkl" or name.endswith("/data.pkl") for name in z.namelist())
        except (zipfile.BadZipFile, OSError):
            whole = False
    if torch:
        return "torch", "a PyTorch checkpoint (zip format)" + ("" if whole else ", truncated or corrupt")
    return "zip", "a zip archive" + ("" if whole else " (truncated or corrupt)")


def _not_uma_eqx(path: str, kind: str, what: str) -> ValueError:
    if kind in ("torch", "pickle"):
        return ValueError(
            f"{path!r} is {what}, not a uma_eqx model file: convert a fairchem checkpoint with "
            f"uma_eqx.load_fairchem_checkpoint({path!r}) or `uma-eqx convert {path} OUT.eqx`"
        )
    if kind == "truncated_uma_eqx":
        return ValueError(f"{path!r} is {what}: the file is cut short; save or convert it again")
    return ValueError(
        f"{path!r} is {what}, not a uma_eqx model file (those start with {MAGIC!r}); give a .eqx written by "
        "uma_eqx.save or `uma-eqx convert`"
    )


def save(path: str | os.PathLike, model: UMA) -> None:
    """Write `model` to `path` (`.eqx`): `MAGIC`, header length, JSON header, leaves.

    The header records the format version, the full [`UMAConfig`][], the dtype and whether the
    experts were merged; the leaves are written with `eqx.tree_serialise_leaves`.

    **Arguments:**

    - `path`: the file to write (replaced if it exists).
    - `model`: the model.
    """
    header = {
        "format": "uma_eqx",
        "format_version": FORMAT_VERSION,
        "dtype": jnp.dtype(model.dtype).name,
        "references_dtype": jnp.dtype(model.references.energy_rmsd.dtype).name,
        "merged": model.is_merged,
        "config": json.loads(model.config.to_json()),
    }
    blob = json.dumps(header, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(len(blob).to_bytes(HEADER_LENGTH_BYTES, "little"))
        f.write(blob)
        eqx.tree_serialise_leaves(f, model)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of an `.eqx` model file (config, dtype, format version), without the weights.

    **Arguments:**

    - `path`: the `.eqx` file.

    **Returns:**

    The header as a dict: `format`, `format_version`, `dtype`, `references_dtype`, `merged`,
    `config` (the [`UMAConfig`][] fields).

    **Raises:**

    `FileNotFoundError` for a missing file; `ValueError` naming the path and the fix for a file
    that is not a uma_eqx model (a fairchem `.pt`, any other format, an empty file), a truncated
    or corrupt header, or a format version newer than this uma_eqx reads.
    """
    path = _existing_file(path, "model file")
    with open(path, "rb") as f:
        return _read_header(f, path)


def _existing_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a directory; give the file inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


def _corrupt(path: str, problem: str) -> ValueError:
    return ValueError(f"{path!r}: corrupt uma_eqx header: {problem}; save or convert the model again")


def _read_header(f, path: str) -> dict:
    kind, what = file_kind(path)
    if kind != "uma_eqx":
        raise _not_uma_eqx(path, kind, what)
    f.seek(len(MAGIC))
    length_bytes = f.read(HEADER_LENGTH_BYTES)
    if len(length_bytes) < HEADER_LENGTH_BYTES:
        raise ValueError(
            f"{path!r} is a truncated uma_eqx model file (it ends inside the header length); save or convert it again"
        )
    size = int.from_bytes(length_bytes, "little")
    remaining = os.fstat(f.fileno()).st_size - f.tell()
    if size == 0 or size > remaining:
        raise _corrupt(path, f"its length field says {size} bytes but {remaining} follow (truncated?)")
    blob = f.read(size)
    try:
        header = json.loads(blob)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise _corrupt(path, f"not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"a JSON {type(header).__name__}, not an object")
    version = header.get("format_version")
    valid_version = isinstance(version, int) and not isinstance(version, bool) and version >= 1
    if (
        isinstance(version, int) and valid_version and version > FORMAT_VERSION
    ):  # checked first: a newer layout may have other keys
        raise ValueError(
            f"{path!r} has format version {version}, newer than this uma_eqx reads (up to {FORMAT_VERSION}): "
            "upgrade uma_eqx (pip install -U uma_eqx)"
        )
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing:
        raise _corrupt(path, f"missing {missing}")
    if header["format"] != "uma_eqx" or not valid_version:
        raise _corrupt(path, f"format={header['format']!r}, format_version={version!r}")
    for key in ("dtype", "references_dtype"):
        value = header.get(key, header["dtype"])
        try:
            floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:  # not a dtype name at all
            floating = False
        if not floating:
            raise _corrupt(path, f"{key}={value!r} is not a floating-point dtype")
    if not isinstance(header["config"], dict):
        raise _corrupt(path, f"config is a JSON {type(header['config']).__name__}, not an object")
    return header


def load(path: str | os.PathLike, dtype=None) -> UMA:
    """Read a model written by [`save`][]; torch is not needed.

    Safe on untrusted files: the header is JSON and the weights are NumPy arrays read with
    `allow_pickle=False`, so no pickled code runs.

    **Arguments:**

    - `path`: the `.eqx` file.
    - `dtype`: cast the floating-point leaves (e.g. `jnp.float64` for a float64 model, which
      needs `jax_enable_x64`); default: as stored.

    **Returns:**

    The [`UMA`][] model.

    **Raises:**

    `FileNotFoundError` for a missing file; `ValueError` naming the path and the fix for a
    fairchem/PyTorch checkpoint (use [`uma_eqx.load_fairchem_checkpoint`][]), any other
    non-`.eqx` file, a truncated or corrupt file, or a format version newer than this uma_eqx
    reads (see [`read_header`][]).
    """
    path = _existing_file(path, "model file")
    if dtype is not None and jnp.dtype(dtype) == jnp.float64 and not _x64_enabled():
        raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True) first")
    with open(path, "rb") as f:
        header = _read_header(f, path)
        try:
            config = UMAConfig.from_json(json.dumps(header["config"]))
        except (ValueError, TypeError) as e:
            raise _corrupt(path, f"invalid model config ({e})") from None
        stored = jnp.dtype(header["dtype"])
        skeleton = eqx.filter_eval_shape(lambda: UMA(config, stored, key=jax.random.key(0)))  # key traced: no compile
        ref_dtype = jnp.dtype(header.get("references_dtype", header["dtype"]))
        if ref_dtype == jnp.float64 and not _x64_enabled():
            ref_dtype = jnp.dtype(jnp.float32)  # read as float32 when JAX runs without x64
        refs = eqx.filter_eval_shape(EnergyReferences, len(config.datasets), config.max_num_elements, ref_dtype)
        skeleton = eqx.tree_at(lambda m: m.references, skeleton, refs)
        if header.get("merged"):
            skeleton = eqx.filter_eval_shape(merge_experts, skeleton, jnp.zeros(config.num_experts, stored))
        model = _read_leaves(f, path, skeleton)
    if dtype is not None:
        refs = model.references
        model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
        # energy references keep their stored precision (float64 when saved from a float64 run)
        model = eqx.tree_at(lambda m: m.references, model, refs)
    return model


def _load_leaf(file, like):
    """`eqx.default_deserialise_filter_spec` without compiling: an array leaf is read with
    `np.load` (bfloat16 recovered as `jnp.load` does) and moved with `jax.device_put`, where
    `jnp.load` would compile a small program per shape (a third of a fresh process's programs)."""
    if not isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        return eqx.default_deserialise_filter_spec(file, like)
    host = np.load(file, allow_pickle=False)
    if host.dtype == np.dtype("V2"):  # numpy writes bfloat16 as 2-byte void
        host = host.view(jnp.bfloat16)
    return jax.device_put(host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False))


class _LeafError(Exception):
    """Raised inside `eqx.tree_deserialise_leaves`; carries which array failed and why."""


def _read_leaves(f, path: str, skeleton: UMA) -> UMA:
    """Fill `skeleton`'s arrays from `f` (NumPy `.npy` records, `allow_pickle=False`), checking
    that each has the expected shape and dtype and that nothing follows the last one."""

    def stored(x) -> bool:  # what `eqx.default_deserialise_filter_spec` reads from the file
        return eqx.is_array_like(x) or isinstance(x, jax.ShapeDtypeStruct)

    total = sum(map(stored, jax.tree.leaves(skeleton)))
    count = 0

    def read_leaf(file, like):
        nonlocal count
        if not stored(like):
            return like
        count += 1
        try:
            value = _load_leaf(file, like)
        except (EOFError, ValueError, OSError) as e:  # truncated; not an .npy record; object (pickled) arrays
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _LeafError(f"array {count} of {total}: {reason}") from None
        if hasattr(like, "shape") and (value.shape != like.shape or value.dtype != like.dtype):
            raise _LeafError(
                f"array {count} of {total} is {value.dtype}{list(value.shape)}, expected {like.dtype}{list(like.shape)}"
            )
        return value

    try:
        model = eqx.tree_deserialise_leaves(f, skeleton, filter_spec=read_leaf)
    except Exception as e:
        cause: BaseException = e
        while not isinstance(cause, _LeafError) and (outer := cause.__cause__ or cause.__context__) is not None:
            cause = outer
        raise ValueError(f"{path!r}: truncated or corrupt model weights ({cause}); save or convert it again") from e
    extra = os.fstat(f.fileno()).st_size - f.tell()
    if extra:
        raise ValueError(
            f"{path!r}: corrupt model file: {extra} unexpected bytes after the weights; save or convert it again"
        )
    return model
