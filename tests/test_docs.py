"""The documentation: runnable examples, generated tables, and a strict mkdocs build.

Code blocks: every ```python block in `docs/*.md` is executed, in order, one shared namespace
per page, from the repository root. A block is skipped when the line right before its fence is
an HTML comment `<!-- skip: reason -->` (use it for examples that need a checkpoint you
downloaded yourself); `<!-- requires: torch -->` runs it only when that module is importable.

The key table in `docs/converting.md` (between `<!-- key-table:start -->` and
`<!-- key-table:end -->`) is generated from `uma_eqx.convert.key_table` for the committed
`uma_s_1p1` fixture; `python tests/test_docs.py` prints a fresh copy to paste.
"""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FIXTURE = ROOT / "tests" / "fixtures" / "uma_s_1p1.eqx"

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"<!--\s*(skip|requires)\s*:?\s*(.*?)\s*-->\s*$")


def _blocks(page: pathlib.Path) -> list[tuple[int, str, str | None, str | None]]:
    """`(line, code, skip_reason, required_module)` for each ```python block of a page."""
    text = page.read_text()
    out = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        skip = required = None
        if marker is not None and marker.group(1) == "skip":
            skip = marker.group(2) or "marked <!-- skip -->"
        elif marker is not None:
            required = marker.group(2)
        out.append((text.count("\n", 0, match.start()) + 1, match.group(1), skip, required))
    return out


_PAGES = sorted(p for p in DOCS.glob("*.md") if _blocks(p))


def _run_page(page: pathlib.Path) -> dict:
    """Execute the runnable blocks of one page in a fresh namespace (child-process side)."""
    import traceback

    namespace = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for line, code, skip, required in _blocks(page):
        if skip is not None:
            continue
        if required and importlib.util.find_spec(required) is None:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except BaseException:
            return {
                "ran": ran,
                "error": f"example at {page.relative_to(ROOT)}:{line} failed:\n{traceback.format_exc()}",
            }
        ran += 1
    return {"ran": ran, "error": None}


@pytest.fixture(scope="module")
def example_results() -> dict[str, dict]:
    """Run every page in its own fresh Python process, all pages concurrently.

    A fresh process per page runs the examples as a reader would (JAX defaults, e.g. float32,
    and nothing compiled or configured by other tests). XLA optimisations are switched off to
    keep compile times short; the examples' results do not depend on them.
    """
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env.pop("JAX_ENABLE_X64", None)
    procs = {
        page.name: subprocess.Popen(
            [sys.executable, __file__, "--run-page", str(page)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for page in _PAGES
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        last = out.strip().rsplit("\n", 1)[-1] if out.strip() else ""
        try:
            results[name] = json.loads(last)
        except ValueError:
            results[name] = {"ran": 0, "error": f"runner crashed (exit {proc.returncode}):\n{out}\n{err[-4000:]}"}
    return results


@pytest.mark.parametrize("page", _PAGES, ids=[p.name for p in _PAGES])
def test_examples_run(page, example_results):
    result = example_results[page.name]
    assert result["error"] is None, result["error"]
    if result["ran"] == 0:
        pytest.skip(f"every example of {page.name} is skipped or needs a missing module")


def test_skipped_examples_are_explained_and_compile():
    for page in sorted(DOCS.rglob("*.md")):
        for line, code, skip, _ in _blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            compile(code, where, "exec")  # at least valid Python
            assert skip != "marked <!-- skip -->", f"{where}: give a reason, <!-- skip: why -->"


# ---------------------------------------------------------------------------------------------
# the fairchem key -> Equinox leaf table


def _resolve(root, path: str):
    obj = root
    for part in re.findall(r"[A-Za-z_][A-Za-z_0-9]*|\[\d+\]", path):
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    return obj


def key_table_markdown() -> str:
    """The key table of `docs/converting.md`, from the committed `uma_s_1p1` fixture (torch-free)."""
    import uma_eqx
    from uma_eqx.convert import key_table

    model = uma_eqx.load(FIXTURE)
    config = model.config
    # the fixture's head: `energyandforcehead`, a DatasetSpecificMoEWrapper around MLP_EFS_Head
    heads = {"energy_head_name": "energyandforcehead", "force_head_name": None, "head_wrapped": True}
    rows, seen = [], set()
    for entry in key_table(config, heads):
        if len(entry.keys) == 1:
            key = entry.keys[0]
        else:  # one tensor per dataset, concatenated in `config.datasets` order
            key = re.sub(rf"\.{re.escape(config.datasets[0])}\.", ".{dataset}.", entry.keys[0])
        key = re.sub(r"blocks\.\d+\.", "blocks.{i}.", key)
        path = re.sub(r"blocks\[\d+\]", "blocks[{i}]", entry.path)
        if (key, path) in seen:
            continue
        seen.add((key, path))
        shape = tuple(_resolve(model, entry.path).shape)
        rows.append(f"| `{key}` | `{path}` | `{shape}` |")
    header = [
        "| fairchem key (`ema_state_dict`) | Equinox leaf (path from `UMA`) | shape in the fixture |",
        "|---|---|---|",
    ]
    return "\n".join(header + rows)


def test_key_table_is_current():
    text = (DOCS / "converting.md").read_text()
    match = re.search(r"<!-- key-table:start -->\n(.*?)\n<!-- key-table:end -->", text, re.DOTALL)
    assert match is not None, "docs/converting.md lost its key-table markers"
    assert match.group(1).strip() == key_table_markdown().strip(), (
        "docs/converting.md's key table is stale: paste the output of `python tests/test_docs.py`"
    )


def test_config_key_policy_is_documented():
    from uma_eqx.convert import _config

    text = (DOCS / "converting.md").read_text()
    keys = set(_config._DIRECT) | set(_config._REQUIRED) | set(_config._IGNORED) | set(_config._TOP_LEVEL)
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"docs/converting.md does not mention the checkpoint config keys {missing}"


# ---------------------------------------------------------------------------------------------
# the strict mkdocs build


def _documented_objects(page: pathlib.Path) -> list[str]:
    return re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")  # mkdocs-material
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    pages = sorted((DOCS / "api").glob("*.md"))
    assert pages
    for page in pages:
        html_file = site / "api" / page.stem / "index.html"
        assert html_file.is_file(), f"no HTML page for {page.relative_to(ROOT)}"
        html = html_file.read_text()
        names = _documented_objects(page)
        assert names, f"{page.name} documents no object"
        for name in names:
            assert f'id="{name}"' in html, f"{name} is missing from {html_file.relative_to(site)}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--run-page"]:
        os.chdir(ROOT)
        print(json.dumps(_run_page((ROOT / sys.argv[2]).resolve())))
    else:
        print(key_table_markdown())
