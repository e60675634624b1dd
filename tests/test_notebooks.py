"""The stored notebooks: executed at teaching sizes by notebooks/execute.py, fresh (their
code is what produced their outputs), small enough to store, and skipped teaching cells in
CI (nbmake runs the small defaults)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("execute", NOTEBOOKS / "execute.py")
execute = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execute)

PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_stored_outputs_come_from_the_code_as_it_is(path):
    nb = nbformat.read(path, as_version=4)
    stored = nb.metadata.get("ntk_tickets", {}).get("code_sha256")
    assert stored == execute.code_sha256(nb), (
        f"{path.name}: its code changed after its outputs were made (or it was never "
        f"executed); run: .uv/bin/uv run --frozen python notebooks/execute.py {path.name}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{path.name}: a code cell was not run"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        f"{path.name}: no figure stored")
    assert path.stat().st_size < 2**20, f"{path.name} is above 1 MB"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_teaching_cell_follows_the_parameters_and_is_skipped_in_ci(path):
    nb = nbformat.read(path, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    first = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert tags[first + 1] == [execute.INJECTED, execute.SKIP]
    assert sum(execute.INJECTED in t for t in tags) == 1


def test_injection_replaces_the_old_cell_and_the_hash_follows_the_code():
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("N = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("N")]
    nb.metadata["ntk_tickets"] = {"teaching_parameters": {"N": 100, "W": [1, 2]}}
    once = execute.with_teaching_parameters(nb)
    twice = execute.with_teaching_parameters(once)
    assert [c.source.splitlines()[6:8] for c in twice.cells if c.cell_type == "code"][1] == [
        "N = 100", "W = [1, 2]"]
    assert len(twice.cells) == 4
    before = execute.code_sha256(twice)
    twice.cells[-1].source = "N + 1"
    assert execute.code_sha256(twice) != before
    twice.cells[0].source = "# a markdown edit changes no output"
    twice.cells[-1].source = "N"
    assert execute.code_sha256(twice) == before
