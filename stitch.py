"""The sliding-window grid and feature stitching of the SPAR teacher (CVPR 2026, Sec. 3, Fig. 2 teacher branch).

    (E1)  W(H, W; K, s) = { (y, x) : y in starts(H), x in starts(W) },   F_w = f(x[:, y:y+K, x:x+K])  (k x k x C)
    (E2)  F_T = resize_{h x w}( sum_w place_w(up_r(F_w)) / sum_w place_w(1) )

* `window_starts`     -- starts(L): 0, s, 2s, ... <= L-K, plus a last window at L-K (no padding);
* `sub_patch_factor`  -- r: window maps upsampled x r land exactly on the grid of p/r-pixel cells;
* `Stitcher`          -- streams window maps into a canvas (sum + coverage count), one `index_add_` per batch;
* `stitch`            -- the one-shot version of the same, handy for tests and assignments.

Run `python stitch.py --height 1024 --width 2048` to print the window grid the paper's teacher uses.
"""

import math

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import torch
import torch.nn.functional as F

from cli import ArgumentParser, UserError, add_threads_arg, check_bytes, check_numbers, main_guard


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """(E1) starts(L): 0, s, 2s, ... <= L - K, plus a final window at L - K when the last start is not L - K."""
    if stride <= 0 or window <= 0:
        raise UserError(f"window ({window}) and stride ({stride}) must be positive")
    if length < window:
        raise UserError(f"side of {length} px is shorter than the {window} px window; pad the image to K first")
    # ASSIGNMENT 1 BEGIN: the window starts along one side (E1)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts
    # ASSIGNMENT 1 END


def window_grid(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(E1) every window's top-left corner (y, x), row-major."""
    # ASSIGNMENT 1 BEGIN: every window's corner, row-major (E1)
    return [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]
    # ASSIGNMENT 1 END


def sub_patch_factor(stride: int, patch: int) -> int:
    """Smallest r dividing p such that every stride is a multiple of the p/r-pixel cell (r = 2 for s = 24, p = 16)."""
    # ASSIGNMENT 2 BEGIN: the sub-patch factor r (E2)
    for r in range(1, patch + 1):
        if patch % r == 0 and stride % (patch // r) == 0:
            return r
    raise AssertionError("unreachable: r = p always works")
    # ASSIGNMENT 2 END


class Stitcher:
    """(E2) accumulates window feature maps of B images on a canvas of p/r-pixel cells.

    canvas: (B * Hc * Wc, C) sums; count: (B * Hc * Wc,) how many windows cover each cell.
    `add` takes a batch of windows from any images; `result` divides and resizes to the h x w patch grid.
    """

    def __init__(self, batch: int, cells_hw: tuple[int, int], dim: int, r: int, device=None):
        self.B, (self.Hc, self.Wc), self.C, self.r = batch, cells_hw, dim, r
        self.canvas = torch.zeros(batch * self.Hc * self.Wc, dim, device=device, dtype=torch.float32)
        self.count = torch.zeros(batch * self.Hc * self.Wc, device=device, dtype=torch.float32)

    def add(self, feats: torch.Tensor, image_idx: torch.Tensor, y_cells: torch.Tensor, x_cells: torch.Tensor):
        """feats: (n, k, k, C) window maps; image_idx, y_cells, x_cells: (n,) which image, top-left cell."""
        # ASSIGNMENT 2 BEGIN: up-sample each window map and add it to the canvas and the count (E2)
        n, k, _, C = feats.shape
        kr = k * self.r
        if self.r > 1:  # up_r: bilinear, align_corners=False, on the channels-first view
            feats = F.interpolate(
                feats.permute(0, 3, 1, 2).float(), scale_factor=self.r, mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)  # (n, kr, kr, C)
        offs = torch.arange(kr, device=self.canvas.device)
        rows = y_cells.to(offs.device)[:, None] + offs  # (n, kr)
        cols = x_cells.to(offs.device)[:, None] + offs  # (n, kr)
        cell = rows[:, :, None] * self.Wc + cols[:, None, :]  # (n, kr, kr)
        # place_w: one scatter-add for all windows of the batch
        flat = (image_idx.to(offs.device)[:, None, None] * (self.Hc * self.Wc) + cell).reshape(-1)
        self.canvas.index_add_(0, flat, feats.reshape(-1, C).float())
        self.count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))  # place_w(1)
        # ASSIGNMENT 2 END

    def result(self, out_hw: tuple[int, int]) -> torch.Tensor:
        """Uniform average, then crop the padding and resize to the (h, w) patch grid: (B, h, w, C)."""
        if (self.count == 0).any():
            raise RuntimeError("cells covered by no window: a window-grid gap, or Stitcher.add misplaced a window")
        # ASSIGNMENT 2 BEGIN: average by the coverage count and resize to the patch grid (E2)
        h, w = out_hw
        avg = (self.canvas / self.count[:, None]).view(self.B, self.Hc, self.Wc, self.C)[
            :, : h * self.r, : w * self.r
        ]  # drop padded cells
        if self.r == 1:
            return avg.contiguous()
        # resize_{h x w}: bilinear, align_corners=False (for r = 2 exactly a 2x2 average pool)
        out = F.interpolate(avg.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return out.permute(0, 2, 3, 1).contiguous()
        # ASSIGNMENT 2 END


def stitch(
    window_feats: torch.Tensor, starts_px: list[tuple[int, int]], image_hw: tuple[int, int], patch: int, stride: int
) -> torch.Tensor:
    """(E2) for one image whose sides are multiples of p (and >= K): window maps (n, k, k, C) -> (h, w, C).

    starts_px are the (y, x) pixel corners of the windows, e.g. `window_grid(H, W, K, stride)`.
    """
    H, W = image_hw
    if H % patch or W % patch:
        raise UserError(f"image {H}x{W} must be a multiple of the {patch} px patch; pad it first")
    r = sub_patch_factor(stride, patch)
    cell = patch // r
    starts = torch.tensor(starts_px, device=window_feats.device)
    if (starts % cell).any():
        raise UserError(f"window starts must be multiples of {cell} px for stride {stride}")
    st = Stitcher(1, (H // cell, W // cell), window_feats.shape[-1], r, device=window_feats.device)
    st.add(window_feats, torch.zeros_like(starts[:, 0]), *(starts // cell).T)  # (E2) sum_w place_w(up_r(F_w))
    return st.result((H // patch, W // patch))[0]  # (E2) / sum_w place_w(1), resize_{h x w}


def _run(argv):
    parser = ArgumentParser(description="Print the teacher's window grid (E1) and stitching canvas (E2) for a size.")
    parser.add_argument("--height", type=int, default=1024, help="H, the image height in px (default 1024)")
    parser.add_argument("--width", type=int, default=2048, help="W, the image width in px (default 2048)")
    parser.add_argument("--window", type=int, default=512, help="K, the backbone's native resolution (default 512)")
    parser.add_argument("--stride", type=int, default=24, help="s, the window stride in px (paper's teacher: 24)")
    parser.add_argument("--patch", type=int, default=16, help="p, the patch size in px (default 16)")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    p, K, s = args.patch, args.window, args.stride
    check_numbers([(f"--{n}", getattr(args, n), (">=", 1)) for n in ("height", "width", "window", "stride", "patch")])
    if K % p or s > K:
        raise UserError(f"--window ({K}) must be a multiple of --patch ({p}) and --stride ({s}) at most the window.")
    H, W = (max(K, math.ceil(side / p) * p) for side in (args.height, args.width))  # the grid, at least K
    n, k, r = math.prod(math.ceil((L - K) / s) + 1 for L in (H, W)), K // p, sub_patch_factor(s, p)  # (E1) count
    need = 4 * n * k * k + 24 * n * (k * r) ** 2 + 8 * (H * r // p) * (W * r // p)  # maps; up_r, indices; canvas
    check_bytes(need, "cpu", f"stitching {n} windows", "fp32 maps with C=1, their cell indices and the canvas")
    ys, xs = window_starts(H, K, s), window_starts(W, K, s)  # (E1)
    print(f"image {args.height}x{args.width} -> padded to {H}x{W} (multiple of p={p}, at least K={K})")
    print(f"window K={K}, stride s={s}: {len(ys)} x {len(xs)} = {n} windows")
    print(f"  row starts: {ys[:4]} ... {ys[-3:]}\n  col starts: {xs[:4]} ... {xs[-3:]}")
    print(
        f"sub-patch factor r={r}: canvas of {p // r} px cells, {H * r // p} x {W * r // p}; "
        f"each window map {K // p}x{K // p} -> {K * r // p}x{K * r // p}"
    )
    corners = torch.tensor(window_grid(H, W, K, s)) * r // p  # (E1) in cells
    canvas = Stitcher(1, (H * r // p, W * r // p), 1, r)
    canvas.add(torch.ones(n, k, k, 1), torch.zeros_like(corners[:, 0]), *corners.T)
    cover = canvas.count  # (E2) sum_w place_w(1)
    print(f"coverage per cell: min {int(cover.min())}, max {int(cover.max())}, mean {cover.mean():.1f}")
    print(f"output patch grid h x w = {math.ceil(args.height / p)} x {math.ceil(args.width / p)}")


def main(argv=None):
    return main_guard(_run, argv)


if __name__ == "__main__":
    main()
