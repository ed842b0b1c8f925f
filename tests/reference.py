"""Independent, loop-based reference implementations used by the tests.

Written for clarity, not speed, and on purpose NOT with the tensor tricks of the project code (no
F.interpolate, no index_add_, no unfold): plain Python loops over windows, cells and pixels on numpy arrays.
If the vectorised code in stitch.py / teacher.py / student.py agrees with these, both are probably right.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear_resize(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) array, align_corners=False, no antialias (PyTorch's convention).

    Output pixel i samples the input at  src = (i + 0.5) * in / out - 0.5,  clamped at 0; neighbours are clamped
    to the last row/column.
    """
    H, W, C = a.shape
    out = np.zeros((out_h, out_w, C), dtype=np.float64)
    for i in range(out_h):
        sy = max((i + 0.5) * H / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), H - 1)
        y1 = min(y0 + 1, H - 1)
        wy = sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * W / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), W - 1)
            x1 = min(x0 + 1, W - 1)
            wx = sx - x0
            out[i, j] = (1 - wy) * ((1 - wx) * a[y0, x0] + wx * a[y0, x1]) + wy * (
                (1 - wx) * a[y1, x0] + wx * a[y1, x1]
            )
    return out


def _cubic(t: float, A: float = -0.75) -> float:
    """Keys' cubic convolution kernel (PyTorch's bicubic uses A = -0.75)."""
    t = abs(t)
    if t <= 1:
        return (A + 2) * t**3 - (A + 3) * t**2 + 1
    if t < 2:
        return A * t**3 - 5 * A * t**2 + 8 * A * t - 4 * A
    return 0.0


def bicubic_resize(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bicubic resize of an (H, W, C) array, align_corners=False, no antialias, border taps clamped."""
    H, W, _ = a.shape
    return _bicubic(a, out_h, out_w, out_h / H, out_w / W)


def _bicubic(a: np.ndarray, out_h: int, out_w: int, scale_h: float, scale_w: float) -> np.ndarray:
    """Output pixel (i, j) samples the input at ((i + 0.5) / scale_h - 0.5, (j + 0.5) / scale_w - 0.5)."""
    H, W, C = a.shape

    def taps(i, n_in, scale):
        src = (i + 0.5) / scale - 0.5  # NOT clamped for bicubic (PyTorch convention)
        base = math.floor(src)
        t = src - base
        return [(min(max(base + k, 0), n_in - 1), _cubic(k - t)) for k in (-1, 0, 1, 2)]

    out = np.zeros((out_h, out_w, C), dtype=np.float64)
    for i in range(out_h):
        ty = taps(i, H, scale_h)
        for j in range(out_w):
            acc = np.zeros(C)
            for yy, wy in ty:
                for xx, wx in taps(j, W, scale_w):
                    acc += wy * wx * a[yy, xx]
            out[i, j] = acc
    return out


def starts_reference(length: int, window: int, stride: int) -> list[int]:
    """Window starts written as a while loop: step by s while the window fits; then make sure the end is covered."""
    starts, y = [], 0
    while y + window <= length:
        starts.append(y)
        y += stride
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def stitch_reference(window_maps, starts_px, image_hw, patch, r):
    """(E2) with loops: upsample each k x k map x r, add it cell by cell on a canvas of p/r-pixel cells, count,
    divide, then resize the canvas to the h x w patch grid.

    window_maps: list of (k, k, C) arrays; starts_px: list of (y, x) pixel corners; image_hw multiples of p.
    """
    H, W = image_hw
    cell = patch // r
    Hc, Wc = H // cell, W // cell
    C = window_maps[0].shape[-1]
    canvas = np.zeros((Hc, Wc, C))
    count = np.zeros((Hc, Wc))
    for fmap, (y, x) in zip(window_maps, starts_px):
        k = fmap.shape[0]
        up = bilinear_resize(np.asarray(fmap, dtype=np.float64), k * r, k * r) if r > 1 else fmap
        for i in range(k * r):
            for j in range(k * r):
                canvas[y // cell + i, x // cell + j] += up[i, j]
                count[y // cell + i, x // cell + j] += 1
    avg = canvas / count[..., None]
    return bilinear_resize(avg, H // patch, W // patch) if r > 1 else avg


def teacher_reference(dense_fn, image, window, stride, patch, r):
    """Sliding-window teacher with loops: pad (bottom/right, zeros) to a multiple of p and at least K, crop every
    window, run `dense_fn` on it alone, stitch with `stitch_reference`, crop to ceil(H/p) x ceil(W/p).

    image: (3, H, W) numpy array (normalised); dense_fn: (3, K, K) numpy -> (k, k, C) numpy.
    """
    _, H, W = image.shape
    Hp = max(window, math.ceil(H / patch) * patch)
    Wp = max(window, math.ceil(W / patch) * patch)
    padded = np.zeros((image.shape[0], Hp, Wp), dtype=image.dtype)
    padded[:, :H, :W] = image
    maps, starts = [], []
    for y in starts_reference(Hp, window, stride):
        for x in starts_reference(Wp, window, stride):
            maps.append(dense_fn(padded[:, y : y + window, x : x + window]))
            starts.append((y, x))
    out = stitch_reference(maps, starts, (Hp, Wp), patch, r)
    return out[: math.ceil(H / patch), : math.ceil(W / patch)]


def bicubic_resize_by_scale(a: np.ndarray, scale_h: float, scale_w: float) -> np.ndarray:
    """Bicubic resize of an (H, W, C) array by a scale FACTOR, as `F.interpolate(scale_factor=...)` does it:
    output size floor(in * scale), and output pixel i samples the input at (i + 0.5) / scale - 0.5 (the scale,
    not in/out, sets the coordinates).  align_corners=False, no antialias, border taps clamped."""
    H, W, _ = a.shape
    return _bicubic(a, int(math.floor(H * scale_h)), int(math.floor(W * scale_w)), scale_h, scale_w)


def openclip_authors_dense(visual, x):
    """The authors' OpenCLIP (MaskCLIP) dense features, written from the unmodified open_clip modules.

    visual: open_clip `VisionTransformer`; x: normalised (B, 3, H, W) torch tensor.  Their wrapper: crop to the
    floor grid (no padding), patch position table resized DINO-style with
    `F.interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")` -- but returned unchanged when the
    cropped input has the native number of patches and is square (DINO's `npatch == N and w == h`); CLS position
    kept; blocks
    0..L-2 as they are; the LAST block run unmodified with a diagonal attention mask (each token attends only
    to itself = MaskCLIP's value path); ln_post, @ proj, CLS dropped.  Returns (B, h, w, C).
    """
    import torch
    import torch.nn.functional as F

    B, _, H, W = x.shape
    h, w = H // 16, W // 16
    t = visual.conv1(x[:, :, : h * 16, : w * 16])
    t = t.reshape(B, t.shape[1], h * w).permute(0, 2, 1)
    pos = visual.positional_embedding
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    npatch, n_native, crop_h, crop_w = h * w, pos.shape[0] - 1, h * 16, w * 16
    if npatch == n_native and crop_w == crop_h:  # the authors' `interpolate_pos_encoding`: no interpolation
        table = pos[1:]
    else:
        table = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(h * w, -1)
    cls = (visual.class_embedding + pos[0]).expand(B, 1, -1)
    t = visual.ln_pre(torch.cat([cls, t + table], dim=1))
    for blk in visual.transformer.resblocks[:-1]:
        t = blk(t)
    n = t.shape[1]
    mask = torch.full((n, n), float("-inf"))
    mask.fill_diagonal_(0.0)
    t = visual.transformer.resblocks[-1](t, attn_mask=mask)
    return (visual.ln_post(t) @ visual.proj)[:, 1:].reshape(B, h, w, -1)
