"""Tests for evaluate.py: the mIoU metric on hand-computed cases, every dataset reader on small folders written
here in the real layouts (ignore label, VOC20 / Context59 / ADE label shift, Cityscapes labelIds -> trainIds),
clear errors for mis-laid folders, and the CLI end to end on the `tiny` backbone (table, JSON, plot, resume)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
import evaluate  # noqa: E402
import segment  # noqa: E402
from benchmarks import DatasetError  # noqa: E402
from evaluate import confusion, miou  # noqa: E402

FAST = ["--backbone", "tiny", "--short-side", "48", "--long-side", "96"]


@pytest.fixture
def fast_args(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    return FAST + ["--templates", str(templates), "--text-cache", str(tmp_path / "cache")]


# --------------------------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.a6
def test_miou_all_correct_and_all_wrong():
    label = torch.tensor([[0, 1], [2, 2]])
    mean, per_class = miou(confusion(label, label, 4))
    assert mean == 1.0 and np.isnan(per_class[3])  # class 3: empty union
    mean, per_class = miou(confusion(torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2), 3))
    assert mean == 0.0 and per_class.tolist()[:2] == [0.0, 0.0] and np.isnan(per_class[2])


@pytest.mark.a6
def test_miou_hand_computed_with_ignore_and_absent_classes():
    label = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])  # the 2 on the ignored pixel must not count
    conf = confusion(pred, label, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    mean, per_class = miou(conf)
    # IoU0 = 1 / (2 + 2 - 1), IoU1 = 2 / (2 + 3 - 2), IoU2 = 0 / 1, class 3 absent everywhere -> left out
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert np.isnan(per_class[3]) and mean == pytest.approx(1 / 3)
    # a class that is predicted but absent from the labels counts as IoU 0
    mean, per_class = miou(confusion(torch.tensor([0, 3]), torch.tensor([0, 0]), 4))
    assert mean == pytest.approx(0.25) and per_class[3] == 0.0
    # everything ignored: no classes, NaN
    assert math.isnan(miou(confusion(pred, torch.full_like(label, 255), 4))[0])


@pytest.mark.a6
def test_confusion_accumulates_and_validates():
    g = torch.Generator().manual_seed(0)
    label, pred = torch.randint(0, 5, (2, 30, 40), generator=g), torch.randint(0, 5, (2, 30, 40), generator=g)
    label[0, :5] = 255
    assert torch.equal(confusion(pred[0], label[0], 5) + confusion(pred[1], label[1], 5), confusion(pred, label, 5))
    assert confusion(pred, label, 5).sum() == (label != 255).sum()
    assert torch.equal(confusion(pred.numpy(), label.numpy(), 5), confusion(pred, label, 5))
    with pytest.raises(ValueError, match="label values"):
        confusion(torch.tensor([0]), torch.tensor([7]), 5)


# --------------------------------------------------------------------------------------------------------------
# readers, on folders written here in each dataset's layout
# --------------------------------------------------------------------------------------------------------------

VOC_PALETTE = sum(([k, 255 - k, (7 * k) % 256] for k in range(256)), [])


def write_pair(image_path: Path, label_path: Path, label: np.ndarray, palette: bool = False):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(label.shape + (3,), 128, dtype=np.uint8)).save(image_path)
    lb = Image.fromarray(label.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        lb.putpalette(VOC_PALETTE)
    lb.save(label_path)


RAW = np.array([[0, 5, 20, 255], [0, 1, 1, 255]], dtype=np.uint8)


def voc_tree(
    root: Path,
    year="VOC2012",
    label_dir="SegmentationClass",
    split="ImageSets/Segmentation/val.txt",
    raw=RAW,
    palette=True,
):
    base = root / "VOCdevkit" / year
    for stem in ("b_img", "a_img"):  # split order must be kept, not sorted
        write_pair(base / "JPEGImages" / f"{stem}.jpg", base / label_dir / f"{stem}.png", raw, palette)
    (base / split).parent.mkdir(parents=True, exist_ok=True)
    (base / split).write_text("b_img\na_img\n")
    return base


def labels_of(name, root):
    samples = benchmarks.dataset_samples(name, root)
    return samples, [benchmarks.read_sample(s)[1].numpy() for s in samples]


def test_voc21_and_voc20_readers(tmp_path):
    base = voc_tree(tmp_path)
    samples, labels = labels_of("voc21", tmp_path)
    assert [Path(s.image).stem for s in samples] == ["b_img", "a_img"]
    assert labels[0].tolist() == RAW.tolist()  # palette indices as is
    _, labels = labels_of("voc20", tmp_path)  # background -> ignore, -1
    assert labels[0].tolist() == [[255, 4, 19, 255], [255, 0, 0, 255]]
    assert len(benchmarks.dataset_samples("voc21", base)) == 2  # root may be VOC2012 itself
    assert len(benchmarks.dataset_samples("voc21", tmp_path / "VOCdevkit")) == 2


def test_context60_and_context59_readers(tmp_path):
    raw = np.array([[0, 1, 59], [30, 0, 255]], dtype=np.uint8)
    voc_tree(tmp_path, "VOC2010", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt", raw, False)
    _, labels = labels_of("context60", tmp_path)
    assert labels[1].tolist() == raw.tolist()
    _, labels = labels_of("context59", tmp_path)
    assert labels[1].tolist() == [[255, 0, 58], [29, 255, 255]]


def test_cityscapes_train_ids_and_label_ids_mapping(tmp_path):
    root = tmp_path / "data" / "cityscapes"
    img, gt = root / "leftImg8bit" / "val" / "lindau", root / "gtFine" / "val" / "lindau"
    train = np.array([[0, 18, 255], [10, 13, 5]], dtype=np.uint8)
    write_pair(
        img / "lindau_000000_000019_leftImg8bit.png", gt / "lindau_000000_000019_gtFine_labelTrainIds.png", train
    )
    ids = np.array([[7, 26, 33, 0, 1], [24, 4, 23, 34, 17]], dtype=np.uint8)  # only labelIds here
    write_pair(img / "lindau_000001_000019_leftImg8bit.png", gt / "lindau_000001_000019_gtFine_labelIds.png", ids)
    _, labels = labels_of("cityscapes", root)
    assert labels[0].tolist() == train.tolist()
    assert labels[1].tolist() == [[0, 13, 18, 255, 255], [11, 255, 10, 255, 5]]
    assert len(benchmarks.dataset_samples("cityscapes", tmp_path / "data")) == 2  # root may hold cityscapes/


def test_ade20k_reader_shifts_labels(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150], [75, 0, 2]], dtype=np.uint8)
    write_pair(
        base / "images" / "validation" / "ADE_val_00000001.jpg",
        base / "annotations" / "validation" / "ADE_val_00000001.png",
        raw,
    )
    _, labels = labels_of("ade20k", tmp_path)
    assert labels[0].tolist() == [[255, 0, 149], [74, 255, 1]]


def test_missing_and_mislaid_folders_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        benchmarks.dataset_samples("voc21", tmp_path / "nowhere")
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)  # VOCdevkit level missing
    with pytest.raises(DatasetError) as exc:
        benchmarks.dataset_samples("voc21", tmp_path)
    msg = str(exc.value)
    assert f"'{tmp_path}/VOC2012/ImageSets/Segmentation/val.txt'" in msg and "contains: JPEGImages/" in msg
    assert "ROOT/VOCdevkit/VOC2012/" in msg  # and the full layout
    with pytest.raises(DatasetError, match="ADEChallengeData2016/images/validation"):
        benchmarks.dataset_samples("ade20k", tmp_path)
    base = voc_tree(tmp_path / "v")
    (base / "SegmentationClass" / "a_img.png").unlink()
    with pytest.raises(DatasetError, match="a_img.png"):
        benchmarks.dataset_samples("voc21", tmp_path / "v")


def test_colour_rendered_label_is_rejected(tmp_path):
    base = voc_tree(tmp_path)
    Image.new("RGB", (4, 2)).save(base / "SegmentationClass" / "a_img.png")
    samples = benchmarks.dataset_samples("voc21", tmp_path)
    with pytest.raises(DatasetError, match="single-channel"):
        benchmarks.read_sample(samples[1])


@pytest.mark.parametrize("name", ["voc21", "voc20", "context60", "context59", "cityscapes", "ade20k"])
def test_make_synthetic_is_readable(tmp_path, name):
    benchmarks.make_synthetic(name, tmp_path, num_images=2)
    samples = benchmarks.dataset_samples(name, tmp_path)
    assert len(samples) == 2
    image, label = benchmarks.read_sample(samples[0])
    assert image.shape[1:] == label.shape and image.dtype == torch.uint8
    valid = label[label != 255]
    assert valid.numel() > 0 and valid.max() < benchmarks.DATASETS[name].num_classes


def test_parse_modes():
    assert evaluate.parse_modes("single, slide24,slide,pretrained") == [
        ("single", "single", 0),
        ("slide24", "slide", 24),
        ("slide24", "slide", 24),
        ("pretrained", "pretrained", 0),
    ]
    for bad in ("slide0", "sliding", ""):
        with pytest.raises(ValueError):
            evaluate.parse_modes(bad)


# --------------------------------------------------------------------------------------------------------------
# CLI end to end on the tiny backbone
# --------------------------------------------------------------------------------------------------------------


def test_cli_voc21_table_json_plot_and_resume(tmp_path, fast_args, capsys, monkeypatch):
    data = tmp_path / "voc"
    evaluate.main(["--dataset", "voc21", "--make-synthetic", str(data)])
    out = tmp_path / "res.json"
    evaluate.main(
        ["--dataset", "voc21", "--root", str(data), "--modes", "single,slide32", "--out", str(out)] + fast_args
    )
    stdout = capsys.readouterr().out
    assert "mIoU" in stdout and "s/image" in stdout
    assert any(line.startswith("single ") for line in stdout.splitlines())
    assert any(line.startswith("slide32 ") for line in stdout.splitlines())
    result = json.loads(out.read_text())
    assert result["classes"][0] == "background" and len(result["classes"]) == 21
    labels = [benchmarks.read_sample(s)[1] for s in benchmarks.dataset_samples("voc21", data)]
    for mode in ("single", "slide32"):
        r = result["modes"][mode]
        assert r["images_done"] == 3 and 0 <= r["miou"] <= 1 and r["seconds_per_image"] > 0
        assert np.array(r["confusion"]).sum() == sum(int((lb != 255).sum()) for lb in labels)
        assert r["miou"] == pytest.approx(miou(torch.tensor(r["confusion"]))[0])
    with Image.open(out.with_suffix(".png")) as plot:
        assert plot.size[0] > 200

    # a finished run is not recomputed
    with monkeypatch.context() as m:
        m.setattr(evaluate, "segment", lambda *a, **k: pytest.fail("recomputed a finished mode"))
        evaluate.main(
            ["--dataset", "voc21", "--root", str(data), "--modes", "single,slide32", "--out", str(out)] + fast_args
        )
    assert "resuming" in capsys.readouterr().out


def test_cli_interrupted_run_resumes_to_the_same_result(tmp_path, fast_args, capsys, monkeypatch):
    data = benchmarks.make_synthetic("context60", tmp_path / "ctx", num_images=3)
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    args = ["--dataset", "context60", "--root", str(data), "--modes", "single", "--save-every", "100"] + fast_args
    evaluate.main(args + ["--out", str(full)])
    real, calls = evaluate.segment, []

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(evaluate, "segment", interrupt_third)
        with pytest.raises(SystemExit) as exc:
            evaluate.main(args + ["--out", str(part)])
    assert exc.value.code == 130 and "resumes" in capsys.readouterr().err  # Ctrl-C: 130
    assert json.loads(part.read_text())["modes"]["single"]["images_done"] == 2
    evaluate.main(args + ["--out", str(part)])
    a, b = (json.loads(p.read_text())["modes"]["single"] for p in (full, part))
    assert a["confusion"] == b["confusion"] and b["images_done"] == 3


def test_cli_errors(tmp_path, fast_args, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "cityscapes", "--root", str(tmp_path)] + fast_args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "leftImg8bit/val" in err and "Traceback" not in err
    benchmarks.make_synthetic("ade20k", tmp_path / "ade", num_images=1)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "ade20k", "--root", str(tmp_path / "ade"), "--modes", "fast"] + fast_args)
    assert exc.value.code == 2 and "unknown mode" in capsys.readouterr().err


def test_cli_checkpoint_single_vs_pretrained(tmp_path, fast_args):
    from checkpoints import CHECKPOINT_FORMAT
    from student import load_backbone

    student = load_backbone("tiny", None)
    with torch.no_grad():
        for p in student.image_tower().parameters():  # a "distilled" student: other weights
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ckpt = tmp_path / "student.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "backbone": "tiny",
            "settings": {},
            "image_tower": student.image_tower().state_dict(),
        },
        ckpt,
    )
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=2)
    args = ["--dataset", "voc20", "--root", str(data)] + fast_args
    evaluate.main(args + ["--modes", "single,pretrained", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.json")])
    evaluate.main(args + ["--modes", "single", "--out", str(tmp_path / "b.json")])
    with_ckpt = json.loads((tmp_path / "a.json").read_text())["modes"]
    without = json.loads((tmp_path / "b.json").read_text())["modes"]
    assert with_ckpt["pretrained"]["confusion"] == without["single"]["confusion"]  # base weights, text shared
    assert with_ckpt["single"]["confusion"] != without["single"]["confusion"]  # the student's image tower


# --------------------------------------------------------------------------------------------------------------
# the paper's protocol: per-backbone settings, protocols, slide modes, precision
# --------------------------------------------------------------------------------------------------------------


def test_settings_are_per_backbone_and_dataset():
    clip, siglip = benchmarks.settings_for("voc21", "clip-b16"), benchmarks.settings_for("voc21", "siglip2-b16")
    assert (clip["prob_thd"], clip["area_thd"], clip["logit_scale"]) == (0.1, 0.1, 65.0)  # the authors' OpenCLIP
    assert (siglip["prob_thd"], siglip["area_thd"], siglip["logit_scale"]) == (0.0, 0.0, 65.0)
    assert benchmarks.settings_for("context60", "clip-b16")["prob_thd"] == 0.1
    assert benchmarks.settings_for("voc20", "clip-b16")["area_thd"] == 0.0  # VOC21 only
    assert benchmarks.settings_for("cityscapes", "tiny")["short_side"] == 1024


def test_cli_passes_settings_protocol_and_precision_to_segment(tmp_path, fast_args, monkeypatch):
    data = benchmarks.make_synthetic("voc21", tmp_path / "voc", num_images=1)
    monkeypatch.setitem(benchmarks.BACKBONE_SETTINGS, ("tiny", "voc21"), dict(prob_thd=0.1, area_thd=0.1))
    seen, real = [], evaluate.segment
    monkeypatch.setattr(evaluate, "segment", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    args = ["--dataset", "voc21", "--root", str(data), "--modes", "single"] + fast_args
    evaluate.main(args + ["--out", str(tmp_path / "a.json")])
    ((a, k),) = seen
    how = a[3]  # the SegmentSettings
    assert how.prob_thd == 0.1 and how.area_thd == 0.1 and how.protocol == "paper" and how.amp is False
    settings = json.loads((tmp_path / "a.json").read_text())["settings"]
    assert settings["protocol"] == "paper" and settings["amp"] is False and settings["area_thd"] == 0.1
    seen.clear()
    evaluate.main(args + ["--protocol", "aligned", "--amp", "--area-thd", "0", "--out", str(tmp_path / "b.json")])
    ((a, k),) = seen
    how = a[3]
    assert how.area_thd == 0.0 and how.protocol == "aligned" and how.amp is True


def test_parse_modes_feature_and_logit_averaging():
    assert evaluate.parse_modes("slide24,slidelogit48,slidelogit") == [
        ("slide24", "slide", 24),
        ("slidelogit48", "slidelogit", 48),
        ("slidelogit24", "slidelogit", 24),
    ]
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate.parse_modes("slidelogits4")


@pytest.mark.parametrize("name", ["voc21", "cityscapes"])
def test_both_protocols_on_the_synthetic_sets(tmp_path, fast_args, capsys, name):
    """Report paper vs aligned for single / slide / slidelogit (random tiny weights: plumbing, not accuracy)."""
    data = benchmarks.make_synthetic(name, tmp_path / name, num_images=2)
    res = {}
    for protocol in segment.PROTOCOLS:
        out = tmp_path / f"{protocol}.json"
        evaluate.main(
            [
                "--dataset",
                name,
                "--root",
                str(data),
                "--modes",
                "single,slide32,slidelogit32",
                "--protocol",
                protocol,
                "--out",
                str(out),
            ]
            + fast_args
        )
        res[protocol] = json.loads(out.read_text())["modes"]
    capsys.readouterr()
    with capsys.disabled():
        print(
            f"\n{name} (synthetic, random tiny, 2 images) mIoU %: "
            + "; ".join(
                f"{m} paper {100 * res['paper'][m]['miou']:.2f} / aligned {100 * res['aligned'][m]['miou']:.2f}"
                for m in ("single", "slide32", "slidelogit32")
            )
        )
    for m in ("single", "slide32", "slidelogit32"):
        for p in segment.PROTOCOLS:
            assert res[p][m]["images_done"] == 2 and 0 <= res[p][m]["miou"] <= 1
        assert np.sum(res["paper"][m]["confusion"]) == np.sum(res["aligned"][m]["confusion"])  # same pixels
    settings = {p: json.loads((tmp_path / f"{p}.json").read_text())["settings"] for p in segment.PROTOCOLS}
    assert settings["paper"]["protocol"] == "paper" and settings["aligned"]["protocol"] == "aligned"


# --------------------------------------------------------------------------------------------------------------
# hostile input: one error line and exit 2 (or a warning), never a traceback
# --------------------------------------------------------------------------------------------------------------


def test_label_values_outside_the_classes_are_counted_and_named(tmp_path, fast_args, capsys):
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for stem, value in (("a", 1), ("b", 40)):  # b.png: 2000 pixels of a value VOC21 lacks
        write_pair(
            base / "JPEGImages" / f"{stem}.jpg",
            base / "SegmentationClass" / f"{stem}.png",
            np.full((40, 50), value, np.uint8),
            palette=True,
        )
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    root = tmp_path / "voc"
    n, example = benchmarks.out_of_range(np.array([0, 20, 21, 40, 255, 255], np.uint8), benchmarks.lut_identity(21))
    assert (n, example) == (2, 21)
    assert benchmarks.out_of_range(np.array([0, 150, 255], np.uint8), benchmarks.lut_reduce_zero(150)) == (0, None)
    out = tmp_path / "r.json"
    evaluate.main(["--dataset", "voc21", "--root", str(root), "--out", str(out)] + fast_args)
    err = capsys.readouterr().err
    assert "warning" in err and "b.png" in err and "2000 pixel" in err and "a.png" not in err
    assert json.loads(out.read_text())["modes"]["single"]["out_of_range_pixels"] == 2000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "GPU"),
        (["--device", "bogus"], "unknown device"),
        (["--batch-size", "0", "--modes", "slide"], "--batch-size"),
        (["--modes", "slide4000"], "window"),
        (["--workers", "-1"], "--workers"),
        (["--prob-thd", "2"], "--prob-thd"),
    ],
)
def test_cli_bad_numbers_and_devices(tmp_path, fast_args, capsys, extra, message):
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=1)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(
            ["--dataset", "voc20", "--root", str(data), "--out", str(tmp_path / "r.json")] + fast_args + extra
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_cli_results_json_of_the_wrong_shape_is_refused(tmp_path, fast_args, capsys):
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=1)
    out = tmp_path / "r.json"
    out.write_text("[1, 2, 3]")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "voc20", "--root", str(data), "--out", str(out)] + fast_args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not a results file" in err and "Traceback" not in err
    assert out.read_text() == "[1, 2, 3]"  # nothing overwritten


def test_ctrl_c_while_loading_exits_130(tmp_path, fast_args, capsys, monkeypatch):
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "load_backbone", interrupted)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "voc20", "--root", str(data)] + fast_args)
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
