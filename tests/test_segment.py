"""Tests for segment.py: class lists, text embeddings and their cache, (E4) logits, upsampling with the padded
patch grid, synonyms, and the CLI on the offline `tiny` backbone."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
import pictures  # noqa: E402
import segment  # noqa: E402
import textcache  # noqa: E402
from benchmarks import DatasetError  # noqa: E402
from segment import ClassText, SegmentError, SegmentSettings  # noqa: E402
from student import load_backbone  # noqa: E402

TEMPLATES = ["a photo of a {}.", "{}"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", None)


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# class lists
# --------------------------------------------------------------------------------------------------------------


def test_parse_classes_commas_and_semicolons():
    assert segment.parse_classes("road, car, person, sky") == [["road"], ["car"], ["person"], ["sky"]]
    assert segment.parse_classes("road; car, truck; sky") == [["road"], ["car", "truck"], ["sky"]]
    with pytest.raises(DatasetError, match="empty"):
        segment.parse_classes(" , ,")


def test_read_paper_class_files():
    voc21 = benchmarks.read_class_file(ROOT / "data" / "classes" / "voc21.txt")
    assert len(voc21) == 21 and len(voc21[0]) == 26 and voc21[0][0] == "sky"  # background = 26 stuff names
    assert voc21[15][0] == "person" and len(voc21[15]) == 7
    assert len(benchmarks.read_class_file(ROOT / "data" / "classes" / "ade20k.txt")) == 150
    assert len(benchmarks.read_templates()) == 80
    with pytest.raises(DatasetError, match="cannot read class file"):
        benchmarks.read_class_file(ROOT / "no_such_file.txt")


# --------------------------------------------------------------------------------------------------------------
# text embeddings
# --------------------------------------------------------------------------------------------------------------


def test_text_embeddings_average_normalised_templates(tiny, tmp_path):
    text = segment.text_embeddings(tiny, [["cat"], ["dog", "puppy"]], TEMPLATES, cache_dir=tmp_path)
    assert text.names == ["cat", "dog"] and text.queries == ["cat", "dog", "puppy"]
    assert text.query_class.tolist() == [0, 1, 1]
    assert text.embeddings.shape == (3, tiny.dim)
    with torch.inference_mode():
        raw = tiny.encode_text([t.format("puppy") for t in TEMPLATES])  # (T, C)
    expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
    assert torch.allclose(text.embeddings[2], expected, atol=1e-5)
    assert torch.allclose(text.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_text_cache_on_disk_and_its_key(tiny, tmp_path, monkeypatch):
    classes = [["road"], ["sky"]]
    first = segment.text_embeddings(tiny, classes, TEMPLATES, cache_dir=tmp_path).embeddings
    files = list(tmp_path.glob("tiny-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))  # written atomically

    textcache._MEMORY_CACHE.clear()
    with monkeypatch.context() as m:  # the disk cache is used
        m.setattr(tiny, "encode_text", lambda *a, **k: pytest.fail("text encoder called despite the cache"))
        again = segment.text_embeddings(tiny, classes, TEMPLATES, cache_dir=tmp_path).embeddings
    assert torch.equal(first, again)

    visual = next(tiny.model.visual.parameters())
    text_w = tiny.model.text.text_projection
    try:
        visual.data.add_(1.0)  # a distilled image tower shares the text cache ...
        assert textcache._cache_key(tiny, ["road"], TEMPLATES) == textcache._cache_key(tiny, ["road"], TEMPLATES)
        key = textcache._cache_key(tiny, ["road"], TEMPLATES)
        text_w.data.add_(1.0)  # ... other text weights (e.g. random vs real) never do
        assert textcache._cache_key(tiny, ["road"], TEMPLATES) != key
        segment.text_embeddings(tiny, classes, TEMPLATES, cache_dir=tmp_path)
        assert len(list(tmp_path.glob("tiny-*.pt"))) == 2
    finally:
        visual.data.sub_(1.0)
        text_w.data.sub_(1.0)
        textcache._MEMORY_CACHE.clear()
    assert textcache._cache_key(tiny, ["road"], TEMPLATES) != textcache._cache_key(tiny, ["road"], TEMPLATES[:1])


# --------------------------------------------------------------------------------------------------------------
# logits, upsampling, synonyms
# --------------------------------------------------------------------------------------------------------------


def test_upsample_logits_crops_the_padding_for_odd_sizes():
    p, (H, W) = 16, (37, 53)
    h, w = -(-H // p), -(-W // p)  # 3 x 4 patch grid
    cols = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w)
    out = segment.upsample_logits(cols, p, (H, W), protocol="aligned")
    assert out.shape == (1, 1, H, W)
    # bilinear on the padded (h*p) x (w*p) canvas: pixel x sits at patch coordinate (x + 0.5) / p - 0.5
    x = torch.arange(W, dtype=torch.float32)
    expected = ((x + 0.5) / p - 0.5).clamp(0, w - 1)
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-5)
    stretched = F.interpolate(cols, size=(H, W), mode="bilinear", align_corners=False)
    assert not torch.allclose(out, stretched, atol=1e-2)  # not a plain stretch
    # a resized input goes back to the original size after the crop
    assert segment.upsample_logits(cols, p, (H, W), (20, 29)).shape == (1, 1, 20, 29)


def test_upsample_logits_paper_is_one_resize_of_the_padded_grid():
    """protocol 'paper': the 3 x 4 grid of a padded 37 x 53 input goes straight to the label size, in ONE bilinear
    resize (checked against the loop reference), so it differs from the aligned crop-then-resize."""
    from tests.reference import bilinear_resize

    p, (H, W), out_hw = 16, (37, 53), (50, 71)  # model input 37 x 53, label 50 x 71
    grid = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    out = segment.upsample_logits(grid, p, (H, W), out_hw, protocol="paper")
    ref = bilinear_resize(grid[0].permute(1, 2, 0).double().numpy(), *out_hw)
    assert out.shape == (1, 2, *out_hw)
    assert np.allclose(out[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    aligned = segment.upsample_logits(grid, p, (H, W), out_hw, protocol="aligned")
    assert not torch.allclose(out, aligned, atol=1e-2)


def test_upsample_logits_aligned_floor_grid_extends_the_last_column():
    """A floor grid (OpenCLIP: 37 x 53 -> 2 x 3 patches) leaves a < 16 px strip unseen; 'aligned' keeps the seen
    pixels where they are and repeats the edge over the strip, 'paper' stretches the grid over everything."""
    p, (H, W) = 16, (37, 53)
    cols = torch.arange(3, dtype=torch.float32).expand(1, 1, 2, 3)
    out = segment.upsample_logits(cols, p, (H, W), protocol="aligned")
    x = torch.arange(W, dtype=torch.float32)
    expected = ((x + 0.5) / p - 0.5).clamp(0, 2)  # seen part, then edge
    assert out.shape == (1, 1, H, W) and torch.allclose(out[0, 0, 5], expected, atol=1e-5)
    paper = segment.upsample_logits(cols, p, (H, W), protocol="paper")
    assert torch.allclose(paper[0, 0, 5], ((x + 0.5) * 3 / W - 0.5).clamp(0, 2), atol=1e-5)


def test_resize_image_paper_has_no_antialias_aligned_has():
    """'paper' shrinks like OpenCV INTER_LINEAR (plain bilinear, loop reference); 'aligned' anti-aliases."""
    from tests.reference import bilinear_resize

    img = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(2))
    paper = benchmarks.resize_image(img, (17, 25), antialias=False)
    ref = bilinear_resize(img[0].permute(1, 2, 0).double().numpy(), 17, 25)
    assert np.allclose(paper[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    aligned = benchmarks.resize_image(img, (17, 25), antialias=True)
    assert not torch.allclose(paper, aligned, atol=1e-3)
    assert aligned.std() < paper.std()  # smoothed: less aliasing


def area_thd_reference(probs: np.ndarray, area_thd: float) -> np.ndarray:
    """The authors' rule with loops: (K, H, W) probabilities -> (K, H, W) with small classes zeroed."""
    K = probs.shape[0]
    a = probs.argmax(0)
    n = [int((a == k).sum()) for k in range(K)]
    total = sum(n[1:])
    out = probs.copy()
    for k in range(1, K):
        if not n[k] > area_thd * total:
            out[k] = 0
    return out


def test_area_thd_on_a_crafted_probability_map():
    """Class 1 wins 60 pixels, class 2 wins 30, class 3 wins 10 (of 100 foreground), class 4 none: with
    area_thd 0.1 classes 3 (10 <= 10) and 4 are dropped, 1 and 2 stay; class 0 is never dropped."""
    K, H, W = 5, 10, 12
    win = np.zeros((H, W), dtype=int)  # 20 background pixels, then 60 / 30 / 10
    flat = win.reshape(-1)
    flat[20:80], flat[80:110], flat[110:120] = 1, 2, 3
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.2, (K, H, W))
    probs[win, np.arange(H)[:, None], np.arange(W)] = 0.5  # the argmax map is `win`
    probs[4] = 0.45  # runner-up, never first
    probs[2, 0, 0] = 0.49  # runner-up in a pixel of 0
    got = segment.drop_small_classes(torch.from_numpy(probs)[None], 0.1)[0].numpy()
    assert np.allclose(got, area_thd_reference(probs, 0.1))
    labels = got.argmax(0)
    assert (got[3] == 0).all() and (got[4] == 0).all() and (got[1] > 0).any() and (got[2] > 0).any()
    assert set(np.unique(labels[win == 3])) <= {0, 1, 2}  # class 3's pixels move on
    assert (labels[win == 1] == 1).all() and (labels[win == 2] == 2).all()
    # end to end through segment(): the same map as cosine logits; then prob_thd after the argmax
    e = torch.eye(K)
    text = ClassText([str(k) for k in range(K)], [str(k) for k in range(K)], torch.arange(K), e)
    feats = torch.from_numpy(np.log(probs)).float().permute(1, 2, 0)[None]  # cosine keeps each pixel's class order
    settings = SegmentSettings(logit_scale=1.0, area_thd=0.1, protocol="paper")
    seg = segment.segment(FixedBackbone(feats, patch=1), torch.rand(1, 3, H, W), text, settings)
    assert not (seg.labels == 3).any() and not (seg.labels == 4).any() and (seg.labels[0][win == 1] == 1).all()
    plain = segment.segment(
        FixedBackbone(feats, patch=1), torch.rand(1, 3, H, W), text, SegmentSettings(logit_scale=1.0)
    )
    assert (plain.labels[0][win == 3] == 3).all()


def test_slidelogit_averages_per_window_cosine_logits(tiny, tmp_path):
    """slidelogit = cosine logits per window, stitched (loop reference); slide = features stitched, then cosine."""
    from tests.reference import teacher_reference

    text = segment.text_embeddings(tiny, [["a"], ["b"], ["c"]], TEMPLATES, cache_dir=tmp_path)
    image = torch.rand(1, 3, 150, 170, generator=torch.Generator().manual_seed(3))
    x = tiny.normalize(image)
    emb = text.embeddings.double().numpy()

    def window_logits(crop):
        with torch.inference_mode():
            f = tiny.dense(torch.from_numpy(crop)[None].float())[0].double().numpy()
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        return f @ emb.T

    ref = teacher_reference(window_logits, x[0].numpy(), tiny.window, 24, 16, 2)  # (h, w, Q)
    teacher = segment.window_teacher(tiny, SegmentSettings("slidelogit", stride=24, batch_size=5), text)
    with torch.inference_mode():
        got = teacher(x)[0].double().numpy()
    assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-4)
    seg_logit = segment.segment(
        tiny, image, text, SegmentSettings("slidelogit", 24, logit_scale=1.0), return_logits=True
    )
    seg_feat = segment.segment(tiny, image, text, SegmentSettings("slide", 24, logit_scale=1.0), return_logits=True)
    assert seg_logit.labels.shape == seg_feat.labels.shape == (1, 150, 170)
    assert not torch.allclose(seg_logit.logits, seg_feat.logits, atol=1e-4)  # two different modes
    with pytest.raises(SegmentError, match="slidelogit"):
        teacher = segment.window_teacher(tiny, SegmentSettings("slide"))
        segment.segment(tiny, image, text, SegmentSettings("slidelogit"), teacher=teacher)


def test_segment_runs_fp32_unless_amp(tiny, tmp_path, monkeypatch):
    """fp32 by default (the authors evaluate in fp32); amp=True asks for autocast ('auto') in the single pass and
    the teacher alike."""
    import teacher as teacher_mod

    asked = []
    real = teacher_mod.autocast

    def spy(device, precision="auto"):
        asked.append(precision)
        return real(device, precision)

    monkeypatch.setattr(teacher_mod, "autocast", spy)
    monkeypatch.setattr(segment, "autocast", spy)
    text = segment.text_embeddings(tiny, [["a"], ["b"]], TEMPLATES, cache_dir=tmp_path)
    image = torch.rand(1, 3, 40, 40)
    for mode in ("single", "slide", "slidelogit"):
        asked.clear()
        segment.segment(tiny, image, text, SegmentSettings(mode, 64))
        assert asked and set(asked) == {"fp32"}, mode
        asked.clear()
        segment.segment(tiny, image, text, SegmentSettings(mode, 64, amp=True))
        assert asked and set(asked) == {"auto"}, mode


class FixedBackbone(torch.nn.Module):
    """A stand-in backbone whose dense features are given: tests the head of (E4) exactly."""

    def __init__(self, feats, patch=16):
        super().__init__()
        self.feats, self.patch_size, self.window, self.dim = feats, patch, 64, feats.shape[-1]
        self.register_buffer("_dev", torch.zeros(0))

    @property
    def device(self):
        return self._dev.device

    def normalize(self, x):
        return x

    def dense(self, x):
        return self.feats


@pytest.mark.a6
def test_synonyms_collapse_to_their_class_with_max_not_sum():
    e = torch.eye(4)[:3]  # queries q0 (class 0), q1, q2 (class 1)
    text = ClassText(["a", "b"], ["a", "b1", "b2"], torch.tensor([0, 1, 1]), e)
    feats = torch.stack([e[0], e[2], e[1], e[0] * 1.0 + e[1] * 0.9 + e[2] * 0.9]).view(1, 2, 2, 4)
    seg = segment.segment(
        FixedBackbone(feats), torch.rand(1, 3, 32, 32), text, SegmentSettings(logit_scale=10), return_logits=True
    )
    labels = seg.labels[0]
    assert labels.shape == (32, 32) and seg.logits.shape == (1, 2, 32, 32)
    assert labels[0, 0] == 0 and labels[0, -1] == 1 and labels[-1, 0] == 1  # b2 and b1 both -> class 1
    # q0 alone beats each synonym of class 1, although their summed probability is larger: max, not sum
    assert labels[-1, -1] == 0
    assert set(labels.unique().tolist()) <= {0, 1}


def test_prob_thd_sends_unsure_pixels_to_class_zero():
    e = torch.eye(3)
    text = ClassText(["a", "b", "c"], ["a", "b", "c"], torch.arange(3), e)
    feats = torch.stack([e[1], e[1] + e[2], e[2], e[1]]).view(1, 2, 2, 3)
    backbone = FixedBackbone(feats)
    plain = segment.segment(backbone, torch.rand(1, 3, 32, 32), text, SegmentSettings(logit_scale=5)).labels[0]
    thd = segment.segment(
        backbone, torch.rand(1, 3, 32, 32), text, SegmentSettings(logit_scale=5, prob_thd=0.6)
    ).labels[0]
    assert plain[0, 0] == 1 and thd[0, 0] == 1  # confident pixel keeps its class
    assert plain[0, 24] in (1, 2) and thd[0, 24] == 0  # a 50/50 pixel falls back to class 0


def test_segment_tiny_any_size_single_and_slide(tiny, tmp_path):
    text = segment.text_embeddings(tiny, [["a"], ["b"], ["c"]], TEMPLATES, cache_dir=tmp_path)
    image = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    for mode, kwargs in (("single", {}), ("slide", {"stride": 32}), ("single", {"short_side": 64})):
        seg = segment.segment(tiny, image, text, SegmentSettings(mode, **kwargs), return_logits=True)
        assert seg.labels.shape == (1, 37, 53), mode
        assert seg.logits.shape == (1, 3, 37, 53), mode
        assert torch.equal(seg.labels, seg.logits.argmax(1)), mode
    all_zero = segment.segment(tiny, image, text, SegmentSettings(prob_thd=1.01)).labels
    assert (all_zero == 0).all()
    with pytest.raises(SegmentError, match="smaller than one") as exc:
        segment.segment(tiny, torch.rand(1, 3, 8, 300), text)
    assert str(exc.value).endswith("there is nothing to segment.")  # the image itself: no advice to resize it
    with pytest.raises(SegmentError, match="resized to 14x2048") as exc:  # 20 x 3000, the long side capped
        segment.segment(tiny, torch.rand(1, 3, 20, 3000), text, SegmentSettings(short_side=672, long_side=2048))
    assert "--long-side (0: no cap)" in str(exc.value)


def test_resized_hw_keeps_ratio():
    assert benchmarks.resized_hw(375, 500, 672, 2048) == (672, 896)
    assert benchmarks.resized_hw(1024, 2048, 1024, 2048) == (1024, 2048)
    assert benchmarks.resized_hw(300, 3000, 672, 2048) == (205, 2048)  # long side capped
    assert benchmarks.resized_hw(37, 53, None, None) == (37, 53)
    assert benchmarks.resized_hw(37, 53, None, 2048) == (37, 53)  # a cap never enlarges
    assert benchmarks.resized_hw(3000, 6000, 0, 2048) == (1024, 2048)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def test_cli_bundled_image_writes_mask_of_its_size(tmp_path, template_file, capsys):
    out = tmp_path / "seg" / "x.png"
    segment.main(
        [
            str(ROOT / "assets" / "chelsea.jpg"),
            "--backbone",
            "tiny",
            "--classes",
            "a, b, c",
            "--templates",
            template_file,
            "--text-cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    with Image.open(ROOT / "assets" / "chelsea.jpg") as src, Image.open(out) as mask:
        assert mask.size == src.size and mask.mode == "P"
        labels = np.asarray(mask)
    assert labels.max() < 3
    with Image.open(tmp_path / "seg" / "x_overlay.png") as overlay:
        assert overlay.size[0] > overlay.size[1]  # image | overlay | legend
    shares = [float(line.split()[-2]) for line in stdout.splitlines() if line.strip().endswith("%")]
    assert len(shares) == 3 and abs(sum(shares) - 100) < 0.1
    assert "segmentation" in stdout and " s " in stdout


def test_cli_without_out_writes_under_runs_not_beside_the_user(tmp_path, template_file, monkeypatch, capsys):
    """No --out: runs/segment/<image stem>.png (runs/ is git-ignored), never seg.png in the current folder."""
    monkeypatch.chdir(tmp_path)
    image = str(ROOT / "assets" / "chelsea.jpg")
    segment.main(
        [image, "--backbone", "tiny", "--classes", "a, b", "--templates", template_file, "--text-cache", "none"]
    )
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert made == ["runs/segment/chelsea.png", "runs/segment/chelsea_overlay.png"]
    assert "wrote runs/segment/chelsea.png" in capsys.readouterr().out


def test_cli_odd_size_slide_and_class_file(tmp_path, template_file, capsys):
    img = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(img)
    classes = tmp_path / "classes.txt"
    classes.write_text("road\ncar, truck\n\nsky\n")
    out = tmp_path / "odd_seg.png"
    segment.main(
        [
            str(img),
            "--backbone",
            "tiny",
            "--class-file",
            str(classes),
            "--mode",
            "slide",
            "--stride",
            "48",
            "--short-side",
            "0",
            "--templates",
            template_file,
            "--text-cache",
            "none",
            "--out",
            str(out),
        ]
    )
    with Image.open(out) as mask:
        assert mask.size == (70, 45)
        assert np.asarray(mask).max() < 3  # truck -> class 1
    assert "(run at 45x70)" in capsys.readouterr().out  # --short-side 0: as is (H x W: 45 high, 70 wide)


def test_cli_errors_are_one_sentence(tmp_path, template_file, capsys):
    base = [
        "--backbone",
        "tiny",
        "--templates",
        template_file,
        "--text-cache",
        "none",
        "--out",
        str(tmp_path / "x.png"),
    ]
    with pytest.raises(SystemExit) as exc:
        segment.main([str(ROOT / "assets" / "coffee.jpg"), "--classes", " , "] + base)
    assert exc.value.code == 2 and "class list is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        segment.main([str(tmp_path / "missing.jpg"), "--classes", "a"] + base)
    assert exc.value.code == 2 and "cannot read image" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(SystemExit) as exc:
        segment.main([str(bad), "--classes", "a"] + base)
    assert exc.value.code == 2 and "cannot read image" in capsys.readouterr().err
    tiny_img = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5)).save(tiny_img)
    with pytest.raises(SystemExit) as exc:
        segment.main([str(tiny_img), "--classes", "a", "--short-side", "0"] + base)
    assert exc.value.code == 2 and "smaller than one" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------------------
# hostile input: one error line and exit 2 BEFORE any work, or success
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "{tmp}/x.jpg"], "must end in .png"),
        (["--out", "{tmp}/noext"], "must end in .png"),
        (["--out", "{tmp}/afile/x.png"], "a file stands where a folder is needed"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "GPU"),
        (["--device", "bogus"], "unknown device"),
        (["--short-side", "-5"], "--short-side"),
        (["--batch-size", "0", "--mode", "slide"], "--batch-size"),
        (["--classes", "cat, cat, dog"], "given for two classes"),
        (["--classes", "cat; dog, Cat"], "given for two classes"),
    ],
)
def test_cli_bad_arguments_fail_before_any_work(tmp_path, template_file, capsys, monkeypatch, extra, message):
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr(segment, "load_backbone", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    args = [
        str(ROOT / "assets" / "coffee.jpg"),
        "--backbone",
        "tiny",
        "--templates",
        template_file,
        "--text-cache",
        "none",
        "--classes",
        "a, b",
        "--out",
        str(tmp_path / "x.png"),
    ]
    with pytest.raises(SystemExit) as exc:
        segment.main(args + [e.format(tmp=tmp_path) for e in extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "templates.txt"]  # nothing written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--short-side", "3"], "smaller than one 16 px patch"),  # would run at 3 x 3: 100 % one class
        (["--mode", "slide", "--stride", "500"], "window"),  # > K: pixels no window sees
        (["--mode", "slidelogit", "--stride", "500"], "window"),
    ],
)
def test_cli_sizes_that_give_silently_wrong_results_are_refused(tmp_path, template_file, capsys, extra, message):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as exc:
        segment.main(
            [
                str(ROOT / "assets" / "coffee.jpg"),
                "--backbone",
                "tiny",
                "--templates",
                template_file,
                "--text-cache",
                "none",
                "--classes",
                "a, b",
                "--out",
                str(out),
            ]
            + extra
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_non_utf8_image_name_writes_mask_and_overlay(tmp_path, template_file, capsys):
    name = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes, not UTF-8
    img = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    out = tmp_path / os.fsdecode(b"m\xe9.png")
    segment.main(
        [
            str(img),
            "--backbone",
            "tiny",
            "--templates",
            template_file,
            "--text-cache",
            "none",
            "--classes",
            "a, b",
            "--short-side",
            "0",
            "--mode",
            "slidelogit",
            "--stride",
            "32",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    with Image.open(out) as mask:
        assert mask.size == (60, 40) and mask.mode == "P"
    assert pictures.overlay_path(out).is_file()
    assert "\ufffd" in stdout and "mode slidelogit, stride 32" in stdout
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]  # atomic: no leftovers


def test_prob_thd_sees_the_softmax_over_all_queries_before_the_synonym_max():
    """Two equally good synonyms share the probability: softmax over ALL queries first (~0.5 each), then the max
    over the class's synonyms.  With prob_thd 0.6 such a pixel goes to class 0 (a softmax taken after the max would
    give ~1.0 and keep class 1).  Checked against the softmax / max written out in numpy."""
    e = torch.eye(3)
    emb = torch.stack([e[0], e[1], e[1]])  # q0 -> class 0; q1, q2: two identical synonyms of class 1
    text = ClassText(["a", "b"], ["a", "b1", "b2"], torch.tensor([0, 1, 1]), emb)
    feats = torch.stack([e[1], e[0], e[1] + 0.2 * e[0], e[0] + 0.1 * e[2]]).view(1, 2, 2, 3)
    settings = SegmentSettings(logit_scale=40.0, prob_thd=0.6, protocol="paper")
    seg = segment.segment(FixedBackbone(feats, patch=1), torch.rand(1, 3, 2, 2), text, settings).labels[0]
    f = feats[0].double().numpy() / np.linalg.norm(feats[0].double().numpy(), axis=-1, keepdims=True)
    z = 40.0 * f @ emb.double().numpy().T  # (2, 2, Q)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # softmax over the three queries
    per_class = np.stack([p[..., 0], p[..., 1:].max(-1)], -1)  # then the max over class 1's synonyms
    expected = np.where(per_class.max(-1) < 0.6, 0, per_class.argmax(-1))
    assert per_class[0, 0, 1] == pytest.approx(0.5, abs=1e-6)  # the pixel that decides
    assert expected[0, 0] == 0 and expected[0, 1] == 0
    assert seg.tolist() == expected.tolist()
    plain = segment.segment(
        FixedBackbone(feats, patch=1), torch.rand(1, 3, 2, 2), text, SegmentSettings(logit_scale=40.0)
    )
    assert plain.labels[0, 0, 0] == 1  # without the threshold the synonyms' class wins


def test_area_thd_counts_only_foreground_and_never_drops_class_zero():
    """A map where each wrong formula changes the labels: class 0 wins 10 pixels, classes 1/2/3 win 60/16/14 of the
    90 foreground pixels.  area_thd 0.15: the bar is 0.15 * 90 = 13.5, so every class stays.  Counting the 10
    background pixels in the total (bar 15) would drop class 3; a rule that may drop class 0 (10 <= 13.5) would
    move class 0's pixels to their runner-up."""
    K, H, W = 4, 10, 10
    win = np.zeros(H * W, dtype=int)
    win[10:70], win[70:86], win[86:100] = 1, 2, 3
    win = win.reshape(H, W)
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.0, 0.2, (K, H, W))
    probs[win, np.arange(H)[:, None], np.arange(W)] = 0.5  # the argmax map is `win`
    probs[1][win == 0] = 0.4  # runner-up in class 0's pixels
    probs[2][win == 3] = 0.4  # runner-up in class 3's pixels
    ref = area_thd_reference(probs, 0.15)
    assert np.array_equal(ref.argmax(0), win)  # the rule written out keeps every class here
    got = segment.drop_small_classes(torch.from_numpy(probs)[None], 0.15)[0].numpy()
    assert np.allclose(got, ref), "area_thd: n_k over the foreground total only, and class 0 is never dropped"
    assert np.array_equal(got.argmax(0), win)
    ref_20 = area_thd_reference(probs, 0.2)  # bar 18: classes 2 and 3 go, class 0 still stays
    got_20 = segment.drop_small_classes(torch.from_numpy(probs)[None], 0.2)[0].numpy()
    assert np.allclose(got_20, ref_20) and (got_20.argmax(0)[win == 0] == 0).all()
    assert (got_20[2] == 0).all() and (got_20[3] == 0).all()
    # end to end, through segment()
    text = ClassText([str(k) for k in range(K)], [str(k) for k in range(K)], torch.arange(K), torch.eye(K))
    feats = torch.from_numpy(np.log(probs)).float().permute(1, 2, 0)[None]
    settings = SegmentSettings(logit_scale=1.0, area_thd=0.15, protocol="paper")
    seg = segment.segment(FixedBackbone(feats, patch=1), torch.rand(1, 3, H, W), text, settings)
    assert np.array_equal(seg.labels[0].numpy(), win)


def test_area_thd_counts_each_image_of_a_batch_on_its_own():
    """A batch of two maps: each image's shares are its own (class 2 is small in image 0 only).  With one image per
    batch, counting over the whole batch would give the same answer."""
    K, H, W = 3, 4, 10
    rng = np.random.default_rng(2)
    wins = [np.zeros(H * W, dtype=int), np.zeros(H * W, dtype=int)]
    wins[0][:36], wins[0][36:] = 1, 2  # image 0: class 2 has 4 of 40 foreground pixels
    wins[1][:10], wins[1][10:] = 1, 2  # image 1: class 2 has 30 of 40
    probs = rng.uniform(0.0, 0.2, (2, K, H, W))
    for b, win in enumerate(wins):
        win = win.reshape(H, W)
        probs[b, win, np.arange(H)[:, None], np.arange(W)] = 0.5
    got = segment.drop_small_classes(torch.from_numpy(probs), 0.2).numpy()
    for b in range(2):
        assert np.allclose(got[b], area_thd_reference(probs[b], 0.2)), f"image {b} of the batch"
    assert (got[0, 2] == 0).all() and (got[1, 2] > 0).any() and (got[1, 1] > 0).any()
