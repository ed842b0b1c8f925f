"""reproduce.py: Table 1 from checkpoints, end to end on the synthetic sets with fabricated authors' checkpoints,
resumed, with a missing dataset and a refused checkpoint; and the --timing mode on CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

import reproduce
from student import load_backbone
from teacher import Teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _run(args, tmp_path):
    return subprocess.run(
        [sys.executable, "reproduce.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


def _row(table: str, backbone: str, model: str, source: str) -> list[str]:
    """The cells (VOC21 ... C59, mean) of one table row."""
    for line in table.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if parts[:3] == [backbone, model, source]:
            return parts[3:]
    raise AssertionError(f"no row {backbone} / {model} / {source} in\n{table}")


def test_table1_end_to_end_on_synthetic_sets(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "--dataset",
            "cityscapes",
            "--make-synthetic",
            str(tmp_path / "cs"),
            "--num-synthetic",
            "2",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    # the authors' formats, fabricated from random weights (tiny stands in for both rows: a smoke test)
    state = load_backbone("tiny").model.state_dict()
    torch.save({"model." + k: v + 0.01 for k, v in state.items()}, tmp_path / "siglip2.pth")
    wrong = {"segmentor.net.model." + k: v for k, v in state.items() if "blocks.3." not in k}
    torch.save({"state_dict": wrong, "epoch": 3}, tmp_path / "maskclip.ckpt")
    out = tmp_path / "out"
    args = [
        "--cityscapes",
        str(tmp_path / "cs"),
        "--voc",
        str(tmp_path / "no-voc"),
        "--smoke-backbone",
        "tiny",
        "--siglip2-ckpt",
        str(tmp_path / "siglip2.pth"),
        "--maskclip-ckpt",
        str(tmp_path / "maskclip.ckpt"),
        "--pretrained",
        "none",
        "--short-side",
        "64",
        "--templates",
        str(tmp_path / "t.txt"),
        "--text-cache",
        str(tmp_path / "text"),
        "--out",
        str(out),
    ]
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "skip: VOC21 with siglip2-b16 (--voc folder" in proc.stdout and "does not exist)" in proc.stdout
    assert "skip: ADE with clip-b16 (no --ade given)" in proc.stdout
    assert "Traceback" not in proc.stderr
    refused = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: CS with clip-b16")]
    assert (
        len(refused) == 1
        and "authors' Lightning .ckpt (state_dict keys 'segmentor.net.model.*') but does not fit tiny" in refused[0]
    ), proc.stderr[-2000:]
    assert "missing keys (visual.trunk.blocks.3." in refused[0]

    table = (out / "table1.md").read_text()
    result = json.loads((out / "siglip2-b16" / "cityscapes-spar.json").read_text())
    assert result["settings"]["checkpoint"] and result["settings"]["backbone"] == "tiny"
    for model, mode, paper in (("pre-trained, single pass", "pretrained", 23.5), ("SPAR, single pass", "single", 38.4)):
        ours = 100 * result["modes"][mode]["miou"]
        cells = _row(table, "SigLIP2 ViT-B/16", model, "ours (ours − paper)")
        assert cells[2] == f"{ours:.1f} ({ours - paper:+.1f})"  # CS column
        assert cells[:2] == ["", ""] and cells[3:] == ["", "", "", ""]  # not evaluated, no mean
        assert _row(table, "SigLIP2 ViT-B/16", model, "paper")[2] == f"{paper:.1f}"
    assert _row(table, "OpenCLIP ViT-B/16 (MaskCLIP)", "SPAR, single pass", "ours (ours − paper)") == [""] * 7
    assert _row(table, "OpenCLIP ViT-B/16 (MaskCLIP)", "SPAR, single pass", "paper")[-1] == "34.4"
    assert "smoke test" in table and "NOT comparable" in table

    # resumable: the finished run is not evaluated again, the table keeps its cells
    again = _run(args[:-2] + ["--backbones", "siglip2-b16", "--out", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done already: CS with siglip2-b16" in again.stdout and "evaluate.py --dataset" not in again.stdout
    assert _row(
        (out / "table1.md").read_text(), "SigLIP2 ViT-B/16", "SPAR, single pass", "ours (ours − paper)"
    ) == _row(table, "SigLIP2 ViT-B/16", "SPAR, single pass", "ours (ours − paper)")


def test_timing_quick_on_cpu(tmp_path, capsys):
    assert (
        reproduce.main(["--timing", "--quick", "--smoke-backbone", "tiny", "--device", "cpu", "--out", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "timing.json").read_text())
    assert record["precision"] == "fp32" and record["quick"] and len(record["rows"]) == 4  # 2 rows x 2 sizes
    for row in record["rows"]:
        assert row["single_s"] > 0 and row["teacher_s"] > 0
        assert ("extrapolated from 2 of" in row["teacher_how"]) == (row["windows"] > 2)
    cs = record["rows"][1]
    assert cs["datasets"] == ["cityscapes"] and cs["windows"] == Teacher(load_backbone("tiny")).num_windows(128, 256)
    line = [ln.split() for ln in out.splitlines() if ln.split()[1:3] == ["cityscapes", "500"]][0]
    assert line[3:] == [f"{500 * cs['single_s'] / 60:.1f}", f"{500 * cs['teacher_s'] / 60:.1f}"]  # split minutes


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backbones", "vit-huge"], "unknown row backbone 'vit-huge'"),
        (
            ["--siglip2-ckpt", "/nonexistent/spar.pth"],
            "checkpoint '/nonexistent/spar.pth' (--siglip2-ckpt) does not exist",
        ),
        (["--max-images", "0"], "--max-images must be at least 1"),
    ],
)
def test_bad_arguments_are_one_sentence(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(args + ["--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_timing_cells_show_a_dash_where_there_is_no_teacher():
    """The NaFlex baseline has no teacher time (null in timing.json, which strict JSON parsers read): a dash."""
    assert reproduce.number(None, 10, 2) == " " * 9 + "—" and reproduce.number(1.234, 6, 2) == "  1.23"
    assert reproduce.number(0.0, 6, 0) == "     0"  # a zero is a number, not a missing teacher
