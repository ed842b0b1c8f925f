"""Tests for figures.py: each figure command end to end on `tiny` + the synthetic sets (JSON structure and values,
resume without recomputing), the area resize of Fig. 3, the joint PCA colours of Fig. 5, and the error contract."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
import evaluate  # noqa: E402
import figures  # noqa: E402
from checkpoints import save_student  # noqa: E402
from pictures import pca_rgb  # noqa: E402
from student import load_backbone  # noqa: E402


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One synthetic folder, one-line templates, one text cache and a perturbed `tiny` student for every test."""
    base = tmp_path_factory.mktemp("figures")
    templates = base / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    model = load_backbone("tiny", "default", torch.device("cpu"))
    with torch.no_grad():
        for p in model.image_tower().parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_student(str(base / "student.pt"), model, {"note": "test"})
    common = ["--backbone", "tiny", "--device", "cpu", "--synthetic", str(base / "syn"), "--num-synthetic", "1"]
    common += ["--templates", str(templates), "--text-cache", str(base / "cache"), "--quiet"]
    return dict(base=base, common=common, student=str(base / "student.pt"))


def count_loads(monkeypatch) -> list:
    """The backbones figures.py loads: [(name, checkpoint)]."""
    import student

    loads, real = [], student.load_backbone
    monkeypatch.setattr(
        student, "load_backbone", lambda n, *a, **k: loads.append((n, k.get("checkpoint"))) or real(n, *a, **k)
    )
    return loads


def count_evaluations(monkeypatch) -> list:
    calls = []
    real = evaluate.evaluate_mode
    monkeypatch.setattr(evaluate, "evaluate_mode", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    return calls


def test_fig1_mean_of_six_equals_the_per_dataset_files_and_a_rerun_recomputes_nothing(shared, monkeypatch, capsys):
    out = shared["base"] / "f1"
    argv = ["fig1", *shared["common"], "--out", str(out), "--strides", "256,64,24", "--short-side", "48"]
    argv += ["--long-side", "96"]
    calls, loads = count_evaluations(monkeypatch), count_loads(monkeypatch)
    record = figures.main(argv)
    said = capsys.readouterr().out
    assert "estimated" in said and "skipping stride 256 > K = 128" in said
    assert len(calls) == 6 * 3  # six datasets x (pretrained, slide64, slide24)
    assert loads == [("tiny", None)]  # one load for the 6 evaluate.py runs and the time estimate
    assert [p["label"] for p in record["points"]] == ["pretrained", "slide64", "slide24"]
    assert [p["nd"] for p in record["points"]] == [False, False, True]  # 24 % 16 != 0
    assert record["points"][0]["paper"] == dict(seconds=0.48, miou=33.0) and record["points"][1]["paper"] is None
    assert figures.paper_point("SPAR (ours)") == dict(seconds=0.48, miou=43.6)
    est = record["estimate_seconds"]
    assert est["modes"]["slide24"] == est["modes"]["slide64"] > 0  # 48 x 96 images: one (padded) window each
    assert est["total"] >= sum(est["modes"].values())
    big = figures.estimate_seconds([(1024, 2048)], [64, 24], 128, 0.5)  # windows x seconds per window
    assert big["slide64"] == 15 * 31 * 0.5 and big["slide24"] == 39 * 81 * 0.5 and big["pretrained"] == 128 * 0.5
    for p in record["points"]:
        runs = [json.loads((out / "fig1" / f"{d}.json").read_text())["modes"][p["label"]] for d in figures.SIX]
        assert p["miou"] == pytest.approx(np.mean([100 * r["miou"] for r in runs]))
        assert p["seconds"] == pytest.approx(np.mean([r["seconds_per_image"] for r in runs]))
    assert json.loads((out / "fig1.json").read_text()) == json.loads(json.dumps(record))
    assert "| slide24 | ND |" in (out / "fig1.md").read_text() and (out / "fig1.png").stat().st_size > 1000
    calls.clear()
    again = figures.main(argv)  # resume: every (dataset, mode) is finished
    assert calls == [] and again["points"] == record["points"]


def test_checkpoint_names():
    named = figures.parse_named(["a/x.pt", "runs/distill-all/student.pt", "B=b.pt"], "--checkpoint", False, "SPAR")
    assert named == {"SPAR": "a/x.pt", "SPAR distill-all": "runs/distill-all/student.pt", "B": "b.pt"}
    with pytest.raises(figures.FigureError, match="takes NAME=PATH"):
        figures.parse_named(["VOC"], "--roots", False)  # no bare names but for checkpoints


def test_area_resize_keeps_the_ratio_within_one_patch_row():
    for H, W, side in [(1024, 2048, 512), (375, 500, 1024), (48, 96, 192), (333, 777, 1536)]:
        h, w = benchmarks.area_hw(H, W, side * side)
        assert abs(h * w - side * side) <= 16 * max(h, w)
        assert abs(h / w - H / W) < 2 / min(h, w)
        run = benchmarks.resized_hw(H, W, min(h, w), max(h, w))  # as evaluate.py runs it
        assert abs(run[0] - h) <= 1 and abs(run[1] - w) <= 1


def test_fig3_areas_skip_below_K_and_resume(shared, monkeypatch, capsys):
    out = shared["base"] / "f3"
    argv = ["fig3", *shared["common"], "--out", str(out), "--areas", "64,192", "--strides", "32"]
    argv += ["--checkpoint", f"SPAR ALL={shared['student']}"]
    calls, loads = count_evaluations(monkeypatch), count_loads(monkeypatch)
    record = figures.main(argv)
    assert loads == [("tiny", None), ("tiny", shared["student"])]  # once each for 2 areas x 2 results files
    said = capsys.readouterr().out
    assert "skipping slide32 at 64^2" in said and "skip: NaFlex: the siglip2-naflex-b16 baseline needs" in said
    assert record["skipped"] == [
        "slide32 at 64^2: the short side 45 px is below the 128 px window K",
        "NaFlex: the siglip2-naflex-b16 baseline needs its weights, --naflex-pretrained PATH (or 'none')",
    ]
    assert record["naflex"] is None and record["window"] == 128
    assert "- skipped: NaFlex" in (out / "fig3.md").read_text()
    assert set(record["results"]) == {"pretrained", "slide32", "SPAR ALL"}
    assert set(record["results"]["slide32"]) == {"192"} and set(record["results"]["SPAR ALL"]) == {"64", "192"}
    assert len(calls) == 5
    for side, size in record["run_size"].items():
        assert abs(size["area"] - int(side) ** 2) <= 16 * max(size["run_hw"])  # within one patch row
        assert size["run_hw"] == [size["short"], size["long"]] or abs(size["run_hw"][0] - size["short"]) <= 1
        settings = json.loads((out / "fig3" / f"cityscapes-{side}.json").read_text())["settings"]
        assert (settings["short_side"], settings["long_side"]) == (size["short"], size["long"])
        assert size["long"] == 2 * size["short"] or abs(size["long"] - 2 * size["short"]) <= 1
    for name, by_side in record["results"].items():
        for r in by_side.values():
            assert 0 <= r["miou"] <= 100 and r["seconds"] > 0 and r["images"] == 1
    assert record["paper"]["SPAR ALL † (paper)"]["miou"] == [29.7, 36.8, 40.9, 41.2, 37.4]
    assert "22.3" in (out / "fig3.md").read_text() and (out / "fig3.png").is_file()
    calls.clear()
    assert figures.main(argv)["results"] == record["results"] and calls == []


def test_fig3_naflex_line(shared, monkeypatch, tmp_path, capsys):
    """The NaFlex baseline (siglip2-naflex-b16, random weights) through evaluate.py at each area, its own patch grid,
    text included (offline, random weights: the stand-in tokenizer); the results files and the figure are real."""
    argv = ["fig3", *shared["common"], "--out", str(tmp_path), "--areas", "64,192", "--strides", "32"]
    argv += ["--naflex-pretrained", "none", "--text-cache", "none"]
    loads = count_loads(monkeypatch)
    record = figures.main(argv)
    assert "skip: NaFlex" not in capsys.readouterr().out and record["skipped"] == [
        "slide32 at 64^2: the short side 45 px is below the 128 px window K"
    ]
    assert set(record["results"]) == {"pretrained", "slide32", "NaFlex"}
    assert record["naflex"] == {"backbone": "siglip2-naflex-b16", "patches": "all"}
    for side, r in record["results"]["NaFlex"].items():
        assert 0 <= r["miou"] <= 100 and r["seconds"] > 0 and r["images"] == 1
        settings = json.loads((tmp_path / "fig3" / f"cityscapes-{side}-NaFlex.json").read_text())["settings"]
        assert settings["backbone"] == "siglip2-naflex-b16" and settings["naflex_patches"] is None
        assert [settings["short_side"], settings["long_side"]] == [
            record["run_size"][side][k] for k in ("short", "long")
        ]
    assert set(record["results"]["NaFlex"]) == {"64", "192"} and loads.count(("siglip2-naflex-b16", None)) == 1
    assert "| NaFlex |" in (tmp_path / "fig3.md").read_text()


def test_pca_colours_deterministic_and_fitted_jointly():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7, 12)), rng.normal(size=(4, 6, 12)) + 0.5
    view = pca_rgb([a, b])
    again = pca_rgb([torch.tensor(a), torch.tensor(b)])
    for x, y in zip(view.images, again.images):
        assert np.array_equal(x, y) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    swapped = pca_rgb([b, a])  # the fit does not depend on the panels' order, nor on the SVD's signs
    assert np.allclose(swapped.images[1], view.images[0], atol=1e-6)
    assert np.allclose(swapped.images[0], view.images[1], atol=1e-6)
    for c in view.components:  # the sign convention
        assert c[np.argmax(np.abs(c))] > 0
    for m, img in zip([a, b], view.images):  # ONE shared fit maps every panel
        shared = np.clip(((m - view.mean) @ view.components.T - view.low) / (view.high - view.low), 0, 1)
        assert np.allclose(img, shared, atol=1e-6)
    alone = pca_rgb([a])
    assert not np.allclose(alone.images[0], view.images[0])  # a joint fit differs from a per-panel one
    with pytest.raises(figures.UserError):
        pca_rgb([a, rng.normal(size=(3, 3, 5))])


def fig5_argv(shared, out, *more):
    argv = ["fig5", *shared["common"], "--out", str(out), "--dataset", "voc21", "--max-images", "1", "--stride", "32"]
    return argv + ["--short-side", "128", "--long-side", "160", *more]


def test_fig5_maps_and_pca(shared):
    out = shared["base"] / "f5"
    record = figures.main(fig5_argv(shared, out, "--checkpoint", shared["student"]))  # a bare PATH: named SPAR
    assert record["models"] == ["single pass", "teacher s=32", "SPAR"]
    (img,) = record["images"]
    assert len(img["grids"]) == 3 and all(g == img["grids"][0] for g in img["grids"])
    assert all(0 <= v <= 1 for v in img["pixel_accuracy"].values())
    assert np.array(img["pca_components"]).shape == (3, 128)
    assert (out / "fig5.png").stat().st_size > 1000


FIG5_COMPUTE = figures.fig5_compute


def count_fig5_pairs(monkeypatch, stop_after: int | None = None) -> list:
    """The (image, model) pairs fig5 computes; with `stop_after`, Ctrl-C when one more is asked for."""
    computed, real = [], FIG5_COMPUTE

    def compute(args, image, how, checkpoint, text):
        if stop_after is not None and len(computed) == stop_after:
            raise KeyboardInterrupt
        computed.append((how.mode, checkpoint))
        return real(args, image, how, checkpoint, text)

    monkeypatch.setattr(figures, "fig5_compute", compute)
    return computed


def test_fig5_resumes_from_its_cache_bit_identically_and_refuses_a_changed_checkpoint(shared, monkeypatch, tmp_path):
    out, student = tmp_path / "f5", tmp_path / "student.pt"
    shutil.copy(shared["student"], student)
    argv = fig5_argv(shared, out, "--max-images", "2", "--checkpoint", f"SPAR={student}")  # 2 images x 3 models:
    argv += ["--synthetic", str(tmp_path / "syn"), "--num-synthetic", "2"]  # a set of 2 (the last flags count)
    computed = count_fig5_pairs(monkeypatch, stop_after=4)
    with pytest.raises(SystemExit) as exc:  # Ctrl-C during the 5th pair
        figures.main(argv)
    assert exc.value.code == 130 and len(computed) == 4 and not (out / "fig5.json").exists()
    computed = count_fig5_pairs(monkeypatch)
    record = figures.main(argv)
    assert len(computed) == 2  # the 4 finished pairs came from the cache
    first = {s: (out / f"fig5.{s}").read_bytes() for s in ("json", "md", "png")}
    for s in first:
        (out / f"fig5.{s}").unlink()
    computed = count_fig5_pairs(monkeypatch)
    assert figures.main(argv) == record and computed == []  # all 6 pairs cached
    assert {s: (out / f"fig5.{s}").read_bytes() for s in first} == first  # bit-identical JSON, Markdown and PNG
    model = load_backbone("tiny", "default", torch.device("cpu"))
    with torch.no_grad():
        for p in model.image_tower().parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_student(str(student), model, {"note": "another student at the same path"})
    computed = count_fig5_pairs(monkeypatch)
    changed = figures.main(argv)
    assert computed == [("single", str(student))] * 2  # only SPAR's pairs, for both images
    assert changed["images"][0]["pca_components"] != record["images"][0]["pca_components"]


def test_fig5_window_changes_the_teacher_grid(shared, tmp_path):
    from teacher import Teacher

    record = figures.main(fig5_argv(shared, tmp_path, "--window", "64"))
    assert record["models"] == ["single pass", "teacher s=32 K=64"] and record["window"] == 64
    default = json.loads((shared["base"] / "f5" / "fig5.json").read_text())  # test_fig5_maps_and_pca's, K = 128
    assert default["window"] == 128
    (img,), (ref,) = record["images"], default["images"]
    tiny = load_backbone("tiny", "default", torch.device("cpu"))
    hw = tuple(16 * g for g in img["grids"][0])  # --short-side 128 --long-side 160: the run size, on the patch grid
    assert sorted(hw) == [128, 160]
    assert img["teacher_windows"] == Teacher(tiny, window=64, stride=32).num_windows(*hw) == 3 * 4
    assert ref["teacher_windows"] == Teacher(tiny, stride=32).num_windows(*hw) == 1 * 2
    assert img["grids"] == ref["grids"][:2]  # the same patch grid, stitched from other windows


@pytest.mark.parametrize(
    "window, message",
    [
        ("0", "window 0 must be a positive multiple of the patch size 16"),
        ("-32", "window -32 must be a positive multiple"),
        ("8", "window 8 must be a positive multiple"),  # smaller than one patch
        ("40", "window 40 must be a positive multiple"),
        ("512", "--window 512 is larger than the 146x128 px image; give a window of at most 146 px"),
    ],
)
def test_bad_window_is_one_error_line(shared, tmp_path, capsys, window, message):
    with pytest.raises(SystemExit) as exc:
        figures.main(fig5_argv(shared, tmp_path, "--window", window))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_ablate_trains_each_cell_once_and_tables_it(shared, monkeypatch):
    import distill

    out = shared["base"] / "ab"
    argv = ["ablate", *shared["common"], "--out", str(out), "--train", "blk_-1", "--train", "mlp_-1"]
    argv += ["--num-images", "2", "--strides", "64", "--epochs", "1", "--images", str(ROOT / "assets")]
    argv += ["--distill-args", "--aug-scale 0.1 --num-heldout 1 --eval-sizes 128 --pretrained none"]
    record = figures.main(argv)
    assert [r["name"] for r in record["rows"]] == ["blk_-1_s64_n2_e1", "mlp_-1_s64_n2_e1"]
    for r in record["rows"]:
        assert (out / "ablate" / r["name"] / "student.pt").is_file()
        assert r["heldout"][0]["after"]["mse"] > 0 and len(r["train_loss"]) == 1
    assert "| mlp_-1_s64_n2_e1 | mlp_-1 | 64 | 2 | 1 | 128 |" in (out / "ablate.md").read_text()
    trained = []
    monkeypatch.setattr(distill, "main", lambda argv: trained.append(argv))
    assert figures.main(argv)["rows"] == record["rows"] and trained == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fig1", "--strides", "0,24"], "--strides must be positive"),
        (["fig1", "--checkpoint", "nopath"], "--checkpoint SPAR: 'nopath' does not exist"),  # a bare PATH: SPAR
        (["fig1", "--checkpoint", "=x.pt"], "--checkpoint takes NAME=PATH"),
        (["fig1", "--roots", "VOC"], "--roots takes NAME=PATH"),
        (["fig3", "--naflex-patches", "0"], "--naflex-patches"),
        (["fig1", "--roots", "voc21=/nonexistent"], "does not exist"),
        (["fig1", "--datasets", "voc21,mnist"], "unknown mnist"),
        (["fig3", "--areas", "a,b"], "--areas must be comma-separated"),
        (["fig5", "--images", "x.jpg"], "--images needs --classes"),
    ],
)
def test_bad_input_is_one_error_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        figures.main([*argv, "--backbone", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_help_of_every_figure(capsys):
    for name in ("fig1", "fig3", "fig5", "ablate"):
        with pytest.raises(SystemExit) as exc:
            figures.main([name, "--help"])
        assert exc.value.code == 0 and "--out" in capsys.readouterr().out
