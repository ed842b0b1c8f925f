"""The sliding-window teacher (E1-E2) end to end: exact special cases and a loop-based reference."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from student import Backbone, load_backbone
from teacher import Teacher, TeacherError
from tests.reference import bilinear_resize, teacher_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PatchMeanBackbone(nn.Module):
    """A transparent 'backbone': the feature of a patch is the mean of its pixels (C = 3, K = 64, p = 16).

    Windows that are aligned to the patch grid see exactly the patches of the single pass, so with r = 1 the
    stitched teacher must reproduce the single pass bit for bit, whatever the overlap.
    """

    patch_size, window, dim = 16, 64, 3
    grid_rule = "ceil"
    grid_size = Backbone.grid_size  # the teacher fits images to the backbone's grid through these
    fit_to_grid = Backbone.fit_to_grid

    def dense(self, x):
        x = self.fit_to_grid(x)  # zero-pad bottom/right to a multiple of 16
        return F.avg_pool2d(x, 16).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _numpy_dense(bb):
    def fn(crop):
        with torch.inference_mode():
            return bb.dense(torch.from_numpy(crop)[None])[0].double().numpy()

    return fn


@pytest.mark.parametrize("stride", [16, 32, 48, 64])
@pytest.mark.parametrize("H,W", [(64, 64), (100, 150), (160, 96), (40, 70)])
def test_patch_aligned_windows_reproduce_the_single_pass(stride, H, W):
    bb = PatchMeanBackbone()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    out = Teacher(bb, stride=stride, batch_size=7)(x)
    assert out.shape == bb.dense(x).shape
    assert torch.allclose(out, bb.dense(x), atol=1e-6)


@pytest.mark.parametrize("stride", [24, 20, 8])
def test_constant_image_gives_constant_features(stride):
    bb = PatchMeanBackbone()
    x = torch.full((1, 3, 112, 144), 0.3)
    out = Teacher(bb, stride=stride)(x)
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)


@pytest.mark.parametrize("H,W,stride", [(96, 128, 24), (100, 150, 24), (80, 112, 20), (50, 90, 24)])
def test_patch_mean_teacher_matches_loop_reference(H, W, stride):
    bb = PatchMeanBackbone()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    teacher = Teacher(bb, stride=stride, batch_size=4)
    ref = teacher_reference(_numpy_dense(bb), x[0].double().numpy(), 64, stride, 16, teacher.r)
    np.testing.assert_allclose(teacher(x)[0].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("H,W,stride", [(160, 208, 24), (128, 128, 24), (150, 130, 40), (200, 144, 128)])
def test_tiny_teacher_matches_loop_reference(tiny, H, W, stride):
    x = tiny.normalize(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(2)))
    teacher = Teacher(tiny, stride=stride, batch_size=5)
    ours = teacher(x)[0].numpy()
    ref = teacher_reference(_numpy_dense(tiny), x[0].numpy(), tiny.window, stride, 16, teacher.r)
    assert ours.shape == (-(-H // 16), -(-W // 16), tiny.dim)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_one_window_equals_the_plain_forward_at_native_size(tiny):
    x = tiny.normalize(torch.rand(1, 3, 128, 128))
    with torch.inference_mode():
        plain = tiny.dense(x)
    assert Teacher(tiny, stride=48).num_windows(128, 128) == 1
    assert torch.allclose(Teacher(tiny, stride=48)(x), plain, atol=1e-6)
    # stride 24 -> r = 2: the same single window, up x2 and averaged back (a mild [1/8, 3/4, 1/8] smoothing)
    smoothed = bilinear_resize(bilinear_resize(plain[0].double().numpy(), 16, 16), 8, 8)
    np.testing.assert_allclose(Teacher(tiny, stride=24)(x)[0].numpy(), smoothed, atol=1e-5)


def test_stride_equal_to_window_tiles_the_image(tiny):
    x = tiny.normalize(torch.rand(1, 3, 256, 384))
    out = Teacher(tiny, stride=128)(x)
    with torch.inference_mode():
        for i in range(2):
            for j in range(3):
                tile = tiny.dense(x[:, :, 128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)])
                assert torch.allclose(out[:, 8 * i : 8 * (i + 1), 8 * j : 8 * (j + 1)], tile, atol=1e-6)


def test_image_smaller_than_the_window_is_zero_padded(tiny):
    x = tiny.normalize(torch.rand(1, 3, 50, 90))
    out = Teacher(tiny, stride=48)(x)
    assert out.shape == (1, 4, 6, tiny.dim)
    padded = F.pad(x, (0, 128 - 90, 0, 128 - 50))  # the documented behaviour
    with torch.inference_mode():
        ref = tiny.dense(padded)[:, :4, :6]
    assert torch.allclose(out, ref, atol=1e-6)
    # and at stride 24 (r = 2) the shape is still the single-pass grid
    assert Teacher(tiny, stride=24)(x).shape == (1, 4, 6, tiny.dim)


def test_one_side_shorter_than_the_window(tiny):
    x = tiny.normalize(torch.rand(1, 3, 64, 300))
    teacher = Teacher(tiny, stride=24)
    assert teacher.windows(64, 300)[2] == [0]  # one row of windows
    ref = teacher_reference(_numpy_dense(tiny), x[0].numpy(), 128, 24, 16, teacher.r)
    np.testing.assert_allclose(teacher(x)[0].numpy(), ref, atol=2e-5, rtol=1e-4)


def test_batch_equals_images_one_by_one_and_batch_size_does_not_matter(tiny):
    x = tiny.normalize(torch.rand(3, 3, 144, 176))
    together = Teacher(tiny, stride=24, batch_size=7)(x)
    for b in range(3):
        alone = Teacher(tiny, stride=24, batch_size=64)(x[b : b + 1])
        assert torch.allclose(together[b : b + 1], alone, atol=1e-5)


def test_teacher_grid_equals_single_pass_grid_for_odd_sizes(tiny):
    for H, W in [(129, 131), (257, 200), (17, 300)]:
        x = tiny.normalize(torch.rand(1, 3, H, W))
        with torch.inference_mode():
            assert Teacher(tiny, stride=24)(x).shape == tiny.dense(x).shape


def test_teacher_window_count_and_validation(tiny):
    assert Teacher(tiny, stride=24).num_windows(512, 1024) == 17 * 39
    with pytest.raises(ValueError, match="multiple of the patch"):
        Teacher(tiny, window=100)


def test_window_flag_changes_the_window_grid(capsys):
    """--window K: another K tiles the image with another grid of K x K windows (each at the resized position
    embeddings, (E3)); the count printed is the (E1) grid's, len(starts(H)) x len(starts(W))."""
    from stitch import window_starts
    from teacher import main

    counts = {}
    for K in (None, 64, 32):
        main(
            ["--backbone", "tiny", "--pretrained", "none", "--size", "160x256", "--stride", "32"]
            + (["--window", str(K)] if K else [])
        )
        out = capsys.readouterr().out
        counts[K] = int(out.split("stride 32: ")[1].split(" windows")[0])
        k = K or 128
        assert f"(K={k}," in out and counts[K] == len(window_starts(160, k, 32)) * len(window_starts(256, k, 32))
    assert counts[None] == 2 * 5 and counts[64] == 4 * 7 and counts[32] == 5 * 8
    assert Teacher(load_backbone("tiny", None), window=64, stride=32).num_windows(160, 256) == counts[64]


def test_teacher_cli_reports_grid_windows_and_agreement(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((150, 260, 3)) * 255).astype(np.uint8)).save(path)
    proc = subprocess.run(
        [sys.executable, "teacher.py", "--backbone", "tiny", "--image", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "grid (10, 17)" in proc.stdout and "windows" in proc.stdout and "mean cosine" in proc.stdout
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "teacher.py", "--backbone", "tiny", "--image", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "cannot read image" in proc.stderr and "Traceback" not in proc.stderr


class FloorPatchMeanBackbone(PatchMeanBackbone):
    """PatchMeanBackbone with OpenCLIP's grid rule, through the real `Backbone.grid_size` / `fit_to_grid`: the
    floor grid, the last < p rows/columns cropped away."""

    grid_rule = "floor"
    grid_size = Backbone.grid_size
    fit_to_grid = Backbone.fit_to_grid

    def dense(self, x):
        return F.avg_pool2d(self.fit_to_grid(x), 16).permute(0, 2, 3, 1)


@pytest.mark.parametrize("H,W,stride", [(100, 150, 16), (77, 141, 32), (40, 70, 48)])
def test_teacher_follows_a_floor_grid(H, W, stride):
    """A floor-grid backbone: the windows cover the cropped image, the output is on the floor grid, and with
    patch-aligned windows it equals the single pass exactly; the ceil-grid teacher differs in shape."""
    bb = FloorPatchMeanBackbone()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    out = Teacher(bb, stride=stride)(x)
    assert out.shape == (1, H // 16, W // 16, 3)
    assert torch.allclose(out, bb.dense(x), atol=1e-6)
    assert Teacher(PatchMeanBackbone(), stride=stride)(x).shape[1:3] == (-(-H // 16), -(-W // 16))


def test_teacher_precision_head_and_bad_settings(tiny):
    x = tiny.normalize(torch.rand(1, 3, 150, 170, generator=torch.Generator().manual_seed(2)))
    feats = Teacher(tiny, stride=48, precision="fp32")(x)
    assert torch.equal(Teacher(tiny, stride=48, precision="fp16")(x), feats)  # CPU: always fp32
    summed = Teacher(tiny, stride=48, head=lambda f: f.sum(-1, keepdim=True))(x)  # head before stitching
    assert summed.shape == (1, 10, 11, 1) and torch.allclose(summed[..., 0], feats.sum(-1), atol=1e-4)
    for kwargs, message in (
        ({"precision": "fp8"}, "precision"),
        ({"stride": 0}, "stride"),
        ({"stride": 129}, "stride"),
        ({"batch_size": 0}, "batch size"),
    ):
        with pytest.raises(TeacherError, match=message):
            Teacher(tiny, **kwargs)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "GPU"),
        (["--device", "bogus"], "unknown device"),
        (["--stride", "0"], "stride"),
        (["--stride", "1000"], "stride"),
        (["--size", "abc"], "--size"),
        (["--size", "0x0"], "--size"),
        (["--batch-size", "-1"], "batch size"),
        (["--window", "0"], "window 0 must be a positive multiple of the patch size 16"),
        (["--window", "-32"], "window -32 must be a positive multiple"),
        (["--window", "8"], "window 8 must be a positive multiple"),  # smaller than one patch
        (["--window", "40"], "window 40 must be a positive multiple"),
        (["--size", "64x96", "--window", "128"], "--window 128 is larger than the 64x96 px image"),
    ],
)
def test_teacher_cli_bad_arguments_one_line(capsys, extra, message):
    from teacher import main

    with pytest.raises(SystemExit) as exc:
        main(["--backbone", "tiny", "--pretrained", "none"] + extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
