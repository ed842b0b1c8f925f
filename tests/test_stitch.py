"""Window grid (E1) and stitching (E2): checked against loop-based references and exact special cases."""

import numpy as np
import pytest
import torch

from stitch import Stitcher, stitch, sub_patch_factor, window_grid, window_starts
from tests.reference import bilinear_resize, starts_reference, stitch_reference

P = 16


# ---------------------------------------------------------------- (E1) window grid


@pytest.mark.a1
@pytest.mark.parametrize(
    "length,window,stride",
    [
        (512, 512, 24),  # one window
        (1024, 512, 24),  # 512 is not a multiple of 24 -> extra boundary window
        (992, 512, 24),  # 480 is a multiple of 24 -> no extra window
        (2048, 512, 24),
        (700, 128, 24),
        (640, 128, 128),  # stride = K tiling, exact
        (650, 128, 128),  # tiling + boundary window
        (300, 64, 48),
        (129, 128, 24),
    ],
)
def test_window_starts_cover_every_pixel(length, window, stride):
    starts = window_starts(length, window, stride)
    assert starts == starts_reference(length, window, stride)
    assert starts[0] == 0 and starts[-1] == length - window
    assert all(b > a for a, b in zip(starts, starts[1:]))  # strictly increasing
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # never a gap larger than s
    assert all(s == i * stride for i, s in enumerate(starts[:-1]))  # regular grid, only the last may not be
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s : s + window] += 1
    assert covered.min() >= 1
    expected = (length - window) // stride + 1 + (1 if (length - window) % stride else 0)
    assert len(starts) == expected


@pytest.mark.a1
def test_paper_grid_at_1024x2048_has_1495_windows():
    assert len(window_grid(1024, 2048, 512, 24)) == 23 * 65 == 1495


def test_window_starts_rejects_short_side_and_bad_stride():
    with pytest.raises(ValueError, match="shorter"):
        window_starts(100, 128, 24)
    with pytest.raises(ValueError):
        window_starts(512, 128, 0)


@pytest.mark.a2
@pytest.mark.parametrize(
    "stride,r",
    [
        (16, 1),
        (32, 1),
        (48, 1),
        (512, 1),
        (24, 2),
        (8, 2),
        (40, 2),
        (20, 4),
        (12, 4),
        (4, 4),
        (2, 8),
        (25, 16),
        (1, 16),
    ],
)
def test_sub_patch_factor(stride, r):
    assert sub_patch_factor(stride, P) == r
    assert stride % (P // r) == 0


# ---------------------------------------------------------------- (E2) stitching


def _random_windows(H, W, K, stride, C=3, seed=0):
    rng = np.random.default_rng(seed)
    starts = window_grid(H, W, K, stride)
    k = K // P
    maps = [rng.standard_normal((k, k, C)).astype(np.float32) for _ in starts]
    return maps, starts


@pytest.mark.a2
@pytest.mark.parametrize(
    "H,W,K,stride",
    [
        (64, 64, 64, 24),  # one window, r = 2
        (96, 160, 64, 24),  # non-square, boundary windows on both axes
        (128, 96, 64, 16),  # r = 1
        (112, 144, 64, 48),  # r = 1 with boundary windows
        (96, 96, 64, 20),  # r = 4
        (128, 192, 64, 64),  # stride = K tiling
    ],
)
def test_stitch_matches_loop_reference(H, W, K, stride):
    maps, starts = _random_windows(H, W, K, stride)
    r = sub_patch_factor(stride, P)
    ours = stitch(torch.from_numpy(np.stack(maps)), starts, (H, W), P, stride).numpy()
    ref = stitch_reference(maps, starts, (H, W), P, r)
    assert ours.shape == (H // P, W // P, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.a2
@pytest.mark.parametrize("stride", [16, 20, 24, 48, 64])
def test_constant_maps_stitch_to_the_constant(stride):
    H, W, K = 112, 176, 64
    starts = window_grid(H, W, K, stride)
    maps = torch.full((len(starts), K // P, K // P, 5), 2.5)
    out = stitch(maps, starts, (H, W), P, stride)
    assert torch.allclose(out, torch.full_like(out, 2.5), atol=1e-6)


@pytest.mark.a2
@pytest.mark.parametrize("stride", [16, 32, 48, 64])
def test_position_maps_stitch_to_the_global_position_map(stride):
    # Each window reports the global (row, col) of its patches; with patch-aligned windows (r = 1) every window
    # agrees on every patch, so the uniform average must give back exactly the global position map.
    H, W, K = 128, 208, 64
    starts = window_grid(H, W, K, stride)
    k = K // P
    maps = []
    for y, x in starts:
        rows, cols = np.meshgrid(np.arange(k) + y // P, np.arange(k) + x // P, indexing="ij")
        maps.append(np.stack([rows, cols], -1).astype(np.float32))
    out = stitch(torch.from_numpy(np.stack(maps)), starts, (H, W), P, stride).numpy()
    rows, cols = np.meshgrid(np.arange(H // P), np.arange(W // P), indexing="ij")
    np.testing.assert_array_equal(out, np.stack([rows, cols], -1))


@pytest.mark.a2
def test_stride_equal_to_window_is_a_plain_tiling():
    H, W, K = 128, 192, 64
    maps, starts = _random_windows(H, W, K, K)
    out = stitch(torch.from_numpy(np.stack(maps)), starts, (H, W), P, K).numpy()
    k = K // P
    for fmap, (y, x) in zip(maps, starts):
        np.testing.assert_array_equal(out[y // P : y // P + k, x // P : x // P + k], fmap)


@pytest.mark.a2
def test_single_window_with_sub_patch_stride_is_a_3_tap_smoothing():
    # r = 2: up x2 then 2x2 average = [1/8, 3/4, 1/8] per axis (edges clamped). Documented in stitch.py.
    k = 4
    fmap = np.random.default_rng(1).standard_normal((k, k, 2)).astype(np.float32)
    out = stitch(torch.from_numpy(fmap[None]), [(0, 0)], (k * P, k * P), P, 24).numpy()
    taps = np.zeros((k, k))
    for i in range(k):
        for d, wgt in ((-1, 1 / 8), (0, 3 / 4), (1, 1 / 8)):
            taps[i, min(max(i + d, 0), k - 1)] += wgt
    expected = np.einsum("ia,jb,abc->ijc", taps, taps, fmap)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(out, bilinear_resize(bilinear_resize(fmap, 2 * k, 2 * k), k, k), atol=1e-6)


@pytest.mark.a2
def test_stitcher_batches_of_windows_from_several_images():
    # Windows of two images, fed in mixed batches of arbitrary size, give the same as each image alone.
    H, W, K, stride = 96, 128, 64, 24
    r, cell = 2, P // 2
    maps0, starts = _random_windows(H, W, K, stride, seed=0)
    maps1, _ = _random_windows(H, W, K, stride, seed=1)
    feats = torch.from_numpy(np.stack(maps0 + maps1))
    img = torch.tensor([0] * len(starts) + [1] * len(starts))
    yx = torch.tensor(starts * 2) // cell
    st = Stitcher(2, (H // cell, W // cell), 3, r)
    perm = torch.randperm(len(img), generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(5):
        st.add(feats[chunk], img[chunk], yx[chunk, 0], yx[chunk, 1])
    out = st.result((H // P, W // P))
    for b, maps in enumerate((maps0, maps1)):
        ref = stitch(torch.from_numpy(np.stack(maps)), starts, (H, W), P, stride)
        assert torch.allclose(out[b], ref, atol=1e-5)


@pytest.mark.a2
def test_stitcher_refuses_uncovered_cells():
    st = Stitcher(1, (8, 8), 2, 1)
    st.add(torch.ones(1, 4, 4, 2), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="covered by no window"):
        st.result((8, 8))


def test_stitch_rejects_unaligned_input():
    with pytest.raises(ValueError, match="multiple"):
        stitch(torch.zeros(1, 4, 4, 1), [(0, 0)], (70, 64), P, 24)
    with pytest.raises(ValueError, match="multiples of 8"):
        stitch(torch.zeros(1, 4, 4, 1), [(4, 0)], (80, 64), P, 24)


@pytest.mark.a2  # the CLI prints r too: it needs assignment 2's sub_patch_factor (and assignment 1)
def test_stitch_cli_prints_the_grid(capsys):
    import stitch as stitch_module

    stitch_module.main(["--height", "1024", "--width", "2048"])
    out = capsys.readouterr().out
    assert "23 x 65 = 1495 windows" in out and "r=2" in out
