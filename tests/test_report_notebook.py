"""The review notebooks run top to bottom against real results, so they cannot rot: committed without outputs,
executed here with nbclient (synthetic studies always; the real CPU sweep when conftest provides `sweep_results`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from test_report import ROOT, results_for, synthetic_results  # noqa: F401  (the fixture, for results_for)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: strip outputs"


def test_notebook_uses_only_the_public_api() -> None:
    source = "\n".join("".join(c["source"]) for nb in NOTEBOOKS for c in json.loads(nb.read_text())["cells"])
    assert "from harness.report import" in source
    for forbidden in ("read_csv", "json.load", "trials.csv", "confirm.json", "sqlite3", "harness.report.load",
                      "harness.report.figures"):
        assert forbidden not in source, forbidden


@pytest.mark.parametrize("source", ["synthetic", "sweep"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, source: str, request: pytest.FixtureRequest,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    results = results_for(request, source)
    monkeypatch.setenv("VLLM_TUNE_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # history, two Pareto views, importances, slices, latency, memory; plus the comparison when there are several
    # studies (the synthetic results; the real sweep is one study)
    assert len(images) >= (8 if source == "synthetic" else 7)
    text = "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "study" in text and "outcome" in text
