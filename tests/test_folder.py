"""Folder inference of segment.py (`DIR --out OUTDIR`) and the dense-feature export (`--save-features`), on the
offline `tiny` backbone: one output per good image, a `skip:` line per bad one, resumable, Ctrl-C safe."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import segment  # noqa: E402
from student import load_backbone  # noqa: E402

GOOD = {"img1.png": (48, 64), "img2.jpg": (40, 72), "sub/img3.png": (64, 48), "img10.png": (48, 64)}  # (H, W)


@pytest.fixture
def folder(tmp_path):
    """Four good images (one in a subfolder), a corrupt .jpg, an empty .png and a text file."""
    rng = np.random.default_rng(0)
    d = tmp_path / "photos"
    for name, (h, w) in GOOD.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image\n")
    return d


def args(src, out, *extra, template_file):
    return [str(src), "--out", str(out), "--backbone", "tiny", "--pretrained", "none", "--short-side", "0"] + [
        "--templates",
        str(template_file),
        "--text-cache",
        "none",
        *extra,
    ]


@pytest.fixture
def templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n")
    return path


@pytest.fixture
def calls(monkeypatch):
    """Counts the per-image work of segment.py (each call writes one image's outputs)."""
    real, seen = segment.write_outputs, []

    def counting(*a, **k):
        seen.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(segment, "write_outputs", counting)
    return seen


def outputs_of(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*.png"))}


def test_folder_writes_one_output_per_good_image_and_a_skip_line_per_bad_one(folder, templates, tmp_path, capsys):
    out = tmp_path / "segs"
    segment.main(args(folder, out, "--classes", "a, b, c", template_file=templates))
    cap = capsys.readouterr()
    for name, (h, w) in GOOD.items():
        stem = out / Path(name).with_suffix("")
        with Image.open(stem.with_suffix(".png")) as mask:
            assert mask.size == (w, h) and mask.mode == "P" and np.asarray(mask).max() < 3
        assert (stem.parent / f"{stem.name}_overlay.png").is_file()
    assert len(outputs_of(out)) == 2 * len(GOOD)  # mask + overlay per good image, nothing for the bad ones
    skips = [line for line in cap.err.splitlines() if line.startswith("skip: ")]
    assert len(skips) == 2 and any("corrupt.jpg" in s for s in skips) and any("empty.png" in s for s in skips)
    assert "notes.txt" not in cap.err and "Traceback" not in cap.err
    assert "4 images in" in cap.out and "2 skipped" in cap.out
    assert json.loads((out / "segment.json").read_text())["classes"] == [["a"], ["b"], ["c"]]


def test_rerun_does_nothing_new(folder, templates, tmp_path, capsys, calls):
    out = tmp_path / "segs"
    segment.main(args(folder, out, "--classes", "a, b", template_file=templates))
    assert len(calls) == len(GOOD) + 2  # the two bad images were tried once
    before = outputs_of(out)
    capsys.readouterr()
    segment.main(args(folder, out, "--classes", "a, b", template_file=templates))
    cap = capsys.readouterr()
    assert len(calls) == len(GOOD) + 2  # no image touched again, the model not even loaded
    assert outputs_of(out) == before  # same files, same mtimes
    assert "nothing to do" in cap.out and cap.err.count("skip: ") == 2  # the skips are still reported


def test_other_settings_in_the_same_folder_are_refused(folder, templates, tmp_path, capsys):
    out = tmp_path / "segs"
    segment.main(args(folder, out, "--classes", "a, b", template_file=templates))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        segment.main(args(folder, out, "--classes", "a, b", "--logit-scale", "50", template_file=templates))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "other settings" in err and "settings differ" in err


def test_interrupted_run_keeps_finished_outputs_and_a_rerun_finishes(folder, templates, tmp_path, capsys, calls):
    out = tmp_path / "segs"
    real = segment.write_outputs

    def interrupt_third(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    segment.write_outputs = interrupt_third  # restored by the `calls` monkeypatch
    with pytest.raises(SystemExit) as exc:
        segment.main(args(folder, out, "--classes", "a, b", template_file=templates))
    assert exc.value.code == 130 and "finished outputs are kept" in capsys.readouterr().err
    kept = outputs_of(out)
    assert 0 < len(kept) < 2 * len(GOOD) and len(kept) % 2 == 0  # whole images only
    for p in kept:
        with Image.open(out / p) as im:
            im.load()  # every finished file is complete
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]
    n_before = len(calls)
    segment.write_outputs = real
    segment.main(args(folder, out, "--classes", "a, b", template_file=templates))
    assert {k: v for k, v in outputs_of(out).items() if k in kept} == kept  # finished images not redone
    assert len(outputs_of(out)) == 2 * len(GOOD)
    assert "Traceback" not in capsys.readouterr().err
    assert n_before == 3


def test_save_features_folder_and_single_image(folder, templates, tmp_path, capsys):
    tiny = load_backbone("tiny", None)
    out = tmp_path / "feats"
    segment.main(args(folder, out, "--save-features", template_file=templates))  # features only: no classes
    for name, (h, w) in GOOD.items():
        rec = torch.load(out / Path(name).with_suffix(".pt"), weights_only=True)
        grid = tiny.grid_size(h, w)
        assert rec["features"].dtype == torch.float16 and rec["features"].shape == (*grid, tiny.dim)
        assert rec["grid"] == list(grid) and rec["image_size"] == [h, w] and rec["run_size"] == [h, w]
        assert rec["backbone"] == "tiny" and rec["mode"] == "single" and rec["patch_size"] == tiny.patch_size
    assert not list(out.rglob("*.png"))
    img, single = folder / "img1.png", tmp_path / "one" / "x.png"
    segment.main(args(img, single, "--save-features", "--classes", "a, b", "--mode", "slide", template_file=templates))
    rec = torch.load(single.with_suffix(".pt"), weights_only=True)
    assert rec["mode"] == "slide" and rec["features"].shape == (*tiny.grid_size(48, 64), tiny.dim)
    assert single.is_file() and (single.parent / "x_overlay.png").is_file() and "x.pt" in capsys.readouterr().out


def test_folder_refusals_before_any_work(folder, templates, tmp_path, capsys):
    Image.new("RGB", (64, 48)).save(folder / "img1.jpg")  # img1.png and img1.jpg -> the same img1.png
    with pytest.raises(SystemExit) as exc:
        segment.main(args(folder, tmp_path / "o", "--classes", "a", template_file=templates))
    assert exc.value.code == 2 and "would both write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        segment.main(args(folder, tmp_path / "o2", "--save-features", "--mode", "slidelogit", template_file=templates))
    assert exc.value.code == 2 and "slidelogit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        segment.main([str(folder), "--backbone", "tiny", "--classes", "a"])
    assert exc.value.code == 2 and "needs --out" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o2")
