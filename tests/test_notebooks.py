"""The notebooks in ``notebooks/``: stored stripped, public API only, and they run top to bottom offline.

The execution tests start a fresh ``python3`` kernel per notebook with its working directory in a
temporary folder, so nothing is written into the repository. ``01``-``03`` run in order in one
folder (``03_solvers`` then reads the influence matrix and checkpoint that ``02`` saved); ``03`` also
runs alone in an empty folder, where it falls back to its built-in matrix and a synthetic target.
The suite runs them at the smaller sizes of ``SUITE_PARAMETERS``, set after the tagged parameters
cell as papermill would: every cell runs, on less data and fewer steps.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import nbformat
import pytest

import tikmix_hf
import tikmix_hf.influence

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_group_influence.ipynb", "03_solvers.ipynb"]  # 03 reads what 02 saved
CELL_TIMEOUT_S = 600
#: Each notebook's parameters for the suite: every stage, plot and check still happens, on less work.
SUITE_PARAMETERS = {
    "01_quickstart": {"MAX_STEPS": 60, "STAGE_STEPS": 15},
    "02_group_influence": {"TRAIN_STEPS": 20, "N_MIXTURES": 6, "FIDELITY_STEPS": 8},
    "03_solvers": {"N_CANDIDATES": 48, "ROUNDS": 4, "SAMPLES": 500},
}

# Besides the standard library, the notebooks may import only these.
ALLOWED_TOP_LEVEL = {"tikmix_hf", "transformers", "torch", "numpy", "matplotlib", "scipy"}
ALLOWED_TIKMIX_MODULES = {"tikmix_hf", "tikmix_hf.demo.corpora", "tikmix_hf.testing", "tikmix_hf.influence"}
# Any "tikmix_hf.<name>" in code (an import or an attribute path) must name the demo corpora or the testing module,
# or the influence layer, whose package exports its own public functions (TiKMiX-M's look-ahead among them).
PRIVATE_PATH = re.compile(r"\btikmix_hf\.(?!demo\.corpora\b|testing\b|influence\b(?!\.))\w+")


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _python(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked out, so ``ast`` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


@pytest.fixture(autouse=True)
def _offline_kernel_env(monkeypatch):
    # The kernel is a child process and inherits these.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_the_three_notebooks_are_there():
    assert set(EXPECTED) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_stripped_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has stored outputs; strip them"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), (
        f"{path.name}: the first code cell must be tagged 'parameters'"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    public = set(tikmix_hf.__all__)
    for index, source in enumerate(_code_cells(nb)):
        code = _python(source)
        assert not PRIVATE_PATH.search(code), (
            f"{path.name} code cell {index} reaches into {PRIVATE_PATH.search(code).group()}; "
            "use the public API (from tikmix_hf import ...), tikmix_hf.demo.corpora or tikmix_hf.testing"
        )
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name} code cell {index}: relative import"
                modules = [node.module]
                if node.module in ("tikmix_hf", "tikmix_hf.influence"):
                    names = {alias.name for alias in node.names}
                    exported = public if node.module == "tikmix_hf" else set(tikmix_hf.influence.__all__)
                    assert names <= exported, f"{path.name} imports non-public {sorted(names - exported)}"
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, (
                    f"{path.name} code cell {index} imports {module}"
                )
                if top == "tikmix_hf":
                    assert module in ALLOWED_TIKMIX_MODULES, f"{path.name} imports {module}"


def _execute(path: Path, cwd: Path):
    """Run ``path`` in a fresh kernel with working directory ``cwd``; raise on any cell error."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    parameters = next(cell for cell in nb.cells if cell.cell_type == "code")
    for name, value in SUITE_PARAMETERS.get(path.stem, {}).items():
        assert re.search(rf"^{name} = ", parameters.source, re.M), f"{path.name} has no parameter {name}"
        parameters.source += f"\n{name} = {value!r}"
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _outputs(nb) -> tuple[str, int]:
    """All stream and text output, and the number of figures."""
    text, figures = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text.append(output.text)
            elif "image/png" in output.get("data", {}):
                figures += 1
            elif "text/plain" in output.get("data", {}):
                text.append(output.data["text/plain"])
    return "".join(text), figures


@pytest.mark.slow
def test_notebooks_run_in_order_offline(tmp_path):
    figures = {}
    for path in NOTEBOOKS:
        text, figures[path.stem] = _outputs(_execute(path, tmp_path))
        if path.stem == "03_solvers":
            # 02 ran in the same folder: 03 used its matrix and its checkpoint.
            assert "tikmix_notebooks/influence.json" in text
            assert "recomputed S matches the saved one: True" in text
            assert "measured one-step look-ahead" in text
    assert (tmp_path / "tikmix_notebooks" / "influence.json").is_file()
    expected_figures = {"01_quickstart": 1, "02_group_influence": 2, "03_solvers": 2}
    assert {name: figures[name] for name in expected_figures} == expected_figures
    assert not any(NOTEBOOK_DIR.glob("tikmix_notebooks")), "a notebook wrote into the repository"


@pytest.mark.slow
def test_solver_notebook_runs_standalone(tmp_path):
    text, figures = _outputs(_execute(NOTEBOOK_DIR / "03_solvers.ipynb", tmp_path))
    assert "the built-in matrix" in text
    assert "synthetic concave target" in text
    assert figures == 2
    assert not any(tmp_path.iterdir()), "03_solvers wrote files although it only reads"
