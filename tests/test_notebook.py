"""The walkthrough notebook runs top to bottom (on the synthetic data, tiny settings), so it can
never rot."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "walkthrough.ipynb"


def test_walkthrough_runs_top_to_bottom(monkeypatch, tmp_path):
    monkeypatch.setenv("WALKTHROUGH_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "images:" in text and "words" in text
    scores = [o for o in outputs if o.output_type == "execute_result" and "CIDEr" in str(o.get("data", {}))]
    assert scores, "the last cell shows the scores"
