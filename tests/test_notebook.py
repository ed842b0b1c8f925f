"""The tutorial notebook `notebooks/tour.ipynb` runs top to bottom on the offline `tiny` backbone (any cell error
fails the test, so it cannot rot), and is kept in git without outputs."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(NOTEBOOK)], cwd=ROOT, capture_output=True)
    if tracked.returncode == 0:  # the committed version, not only the working copy
        blob = subprocess.run(["git", "show", "HEAD:notebooks/tour.ipynb"], cwd=ROOT, capture_output=True, text=True)
        if blob.returncode == 0:
            committed = nbformat.reads(blob.stdout, as_version=4)
            assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")


@pytest.fixture
def fake_miniature(tmp_path):
    """A run folder shaped like `miniature.py`'s (tiny.pt + results.json + a student), with random weights, so that
    the notebook's last section runs too without minutes of training."""
    from checkpoints import save_student
    from files import save_torch, write_json
    from student import load_backbone

    bb = load_backbone("tiny", None)
    save_torch(tmp_path / "tiny.pt", {k: v.detach().cpu() for k, v in bb.model.state_dict().items()})
    save_student(str(tmp_path / "student.pt"), bb, {"note": "random weights, for the notebook test"})
    write_json(tmp_path / "results.json", {"student_checkpoint": str(tmp_path / "student.pt")})
    return tmp_path


def test_notebook_runs_top_to_bottom(fake_miniature, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPAR_MINIATURE", str(fake_miniature))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "cosine(single, teacher) per patch" in text and "label map in" in text
    assert "SPAR student: yes" in text  # the miniature section ran with its three models
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # grid, cosine, PCA, segmentation, miniature
    print(f"notebook ran in {seconds:.1f} s (goal < 60 s on a CPU; a time, not a test: it depends on the load)")
