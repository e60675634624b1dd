"""Executes the notebooks at teaching sizes and stores them with their outputs.

Run: ``.uv/bin/uv run --frozen python notebooks/execute.py [NOTEBOOK ...]`` (every notebook
when none is named; 28 minutes on 2 CPU cores for all, measured with a
preset running alongside: 96, 107, 147, 675, 92, 519 and 19 s).

Each notebook's first code cell (tagged ``parameters``) holds small defaults, which the test
command runs in CI. Its teaching sizes live in the notebook's metadata
(``ntk_tickets.teaching_parameters``); this script writes them into a cell right after the
parameters cell, tagged ``injected-parameters`` and ``skip-execution`` (so CI, through
nbmake, skips it and keeps running the small defaults), executes the whole notebook with
that cell, and stores the outputs (figures as PNG at 72 dpi) and the SHA-256 of the code
cells that produced them (``ntk_tickets.code_sha256``). ``tests/test_notebooks.py`` fails
when a notebook's code no longer matches that hash: run this script on it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pprint
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
INJECTED = "injected-parameters"
SKIP = "skip-execution"
DPI = 72


def code_sha256(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the sources of the code cells, in order (the injected cell included)."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def injected_source(parameters: dict) -> str:
    lines = ["# Teaching sizes, injected by notebooks/execute.py: the stored outputs come from",
             "# these values. CI skips this cell (tag skip-execution) and runs the small",
             "# defaults above.",
             "import matplotlib", "", f"matplotlib.rcParams['figure.dpi'] = {DPI}"]
    for name, value in parameters.items():
        text = pprint.pformat(value, width=96 - len(name), compact=True)
        lines.append(f"{name} = " + text.replace("\n", "\n" + " " * (len(name) + 3)))
    return "\n".join(lines)


def with_teaching_parameters(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` with its injected cell (replacing an earlier one) after the parameters cell."""
    nb.cells = [c for c in nb.cells if INJECTED not in c.metadata.get("tags", [])]
    parameters = nb.metadata.get("ntk_tickets", {}).get("teaching_parameters", {})
    first = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(injected_source(parameters))
    cell.metadata["tags"] = [INJECTED, SKIP]
    nb.cells.insert(first + 1, cell)
    return nb


def execute(path: Path) -> float:
    """Executes one notebook at teaching sizes in place; returns its seconds."""
    from nbclient import NotebookClient

    nb = with_teaching_parameters(nbformat.read(path, as_version=4))
    start = time.perf_counter()
    NotebookClient(nb, timeout=3600, kernel_name="python3", skip_cells_with_tag="",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata.setdefault("ntk_tickets", {})["code_sha256"] = code_sha256(nb)
    nbformat.write(nb, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        default=sorted(HERE.glob("[0-9][0-9]_*.ipynb")))
    for path in parser.parse_args().notebooks:
        seconds = execute(path)
        size = path.stat().st_size / 2**20
        print(f"{path.name}: {seconds:.0f} s, {size:.2f} MB", flush=True)
        if size > 1.0:
            sys.exit(f"{path.name} is {size:.2f} MB, above the 1 MB limit: lower its figures")


if __name__ == "__main__":
    main()
