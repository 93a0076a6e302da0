"""The Colab quickstart runs top to bottom on the CPU (nbclient, a real Jupyter kernel)."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "colab_quickstart.ipynb"


def test_colab_quickstart_runs_on_the_cpu(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    settings = notebook.cells[next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code")]
    assert "\nSFT_STEPS = 3\n" in settings.source
    # One SFT step (a 135M model's forward and backward on the CPU) proves the cell runs as well as three.
    settings.source = settings.source.replace("\nSFT_STEPS = 3\n", "\nSFT_STEPS = 1\n")
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = "".join(out.get("text", "") for cell in code_cells for out in cell.get("outputs", []))
    assert "8 devices: cpu" in outputs
    assert "Paris" in outputs and "Berlin" in outputs
    assert "loss by step: [(1," in outputs
    assert (tmp_path / "runs" / "notebook-sft" / "metrics.jsonl").is_file()
