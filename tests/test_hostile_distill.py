"""Hostile input, part 3 (issue 21), distill.py: a --resume without its settings.json is judged by the caches'
own metadata before any file is touched; a diverging run stops with one error line and keeps its last good
checkpoint."""

import os
import shutil
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402

BASE = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--num-heldout", "1", "--eval-sizes", "192"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_images")
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        with Image.open(os.path.join(ROOT, "assets", f"{name}.jpg")) as im:
            im.convert("RGB").resize((256, 192) if i % 2 else (192, 256), Image.BILINEAR).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_run") / "A"
    distill.main(BASE + ["--images", str(images), "--out", str(out), "--epochs", "1"])
    return out


def snapshot(folder):
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["corrupt", "missing and no resume.pt"])
def test_resume_without_settings_refuses_a_changed_stride_before_touching_files(
    finished, images, tmp_path, capsys, damage
):
    out = tmp_path / "B"
    shutil.copytree(finished, out)
    if damage == "corrupt":
        (out / "settings.json").write_text("{not json")
    else:
        os.remove(out / "settings.json")
        os.remove(out / "resume.pt")
    before = snapshot(out / "targets")
    with pytest.raises(SystemExit) as exc:
        distill.main(BASE + ["--images", str(images), "--out", str(out), "--epochs", "1", "--resume", "--stride", "32"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "stride" in err
    assert snapshot(out / "targets") == before  # no target recomputed


def test_a_diverging_resumed_run_keeps_the_last_good_checkpoint(finished, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "C"
    shutil.copytree(finished, out)
    kept = {name: (out / name).read_bytes() for name in ("student.pt", "resume.pt")}
    real = distill.train_step

    def diverging(model, *a, **k):
        loss = real(model, *a, **k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(float("nan"))
        return loss

    monkeypatch.setattr(distill, "train_step", diverging)
    with pytest.raises(SystemExit) as exc:
        distill.main(BASE + ["--images", str(images), "--out", str(out), "--epochs", "3", "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "diverged in epoch 2" in err
    assert "keeps the last good checkpoint" in err
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_lr_1e4_stops_with_one_error_line_and_no_nan_checkpoint(finished, images, tmp_path, capsys):
    out = tmp_path / "D"
    os.makedirs(out)
    for sub in ("augment", "heldout", "targets"):  # the same images and teacher: only training runs
        shutil.copytree(finished / sub, out / sub)
    with pytest.raises(SystemExit) as exc:
        distill.main(BASE + ["--images", str(images), "--out", str(out), "--epochs", "2", "--lr", "1e4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "diverged" in err and "--lr" in err
    assert "Traceback" not in err
    if (out / "student.pt").exists():  # an epoch finished before the divergence: its weights are all finite
        tower = torch.load(out / "student.pt", weights_only=True)["image_tower"]
        assert all(torch.isfinite(v).all() for v in tower.values() if v.is_floating_point())
        assert "keeps the last good checkpoint" in err
