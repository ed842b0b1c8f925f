"""The frozen sliding-window teacher of SPAR (CVPR 2026, Sec. 3, Fig. 2 teacher branch).

The teacher is the pre-trained backbone used only where it is reliable: at its native K x K resolution.  It looks
at the image through many overlapping K x K windows (stride s, 24 px in the paper), computes dense features of
each window exactly as the student would at K x K, and stitches them back into one map on the image's patch grid:

    (E1)  windows  W(H, W; K, s),  F_w = f(x[:, y:y+K, x:x+K])
    (E2)  F_T = resize_{h x w}( sum_w place_w(up_r(F_w)) / sum_w place_w(1) )

One h x w grid for teacher and student (`Backbone.fit_to_grid`: SigLIP2 pads to the ceil grid, OpenCLIP crops to
the floor grid, DINOv3 resizes up to it); a side < K is zero-padded to K, then cropped.  Targets: fp16 (authors).
Run `python teacher.py --backbone tiny --image photo.jpg` to compare teacher and single-pass student features.
"""

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
from cli import PRECISIONS, UserError, autocast, timed
from files import load_image
from stitch import Stitcher, sub_patch_factor, window_starts
from student import BACKBONES, Backbone, load_backbone


class TeacherError(UserError):
    """Bad teacher settings (stride, window, batch size, precision). The message is one sentence."""


class Teacher(nn.Module):
    """Frozen sliding-window teacher: normalised (B, 3, H, W) -> stitched (B, h, w, C), the grid of `dense`.

    window: K (default: the backbone's); stride: s in px; batch_size: windows per forward (default: from the free
    memory); precision: as `cli.autocast`; head: an optional map of each window's (n, k, k, C) features before
    stitching, e.g. to cosine logits (segment.py's `slidelogitN` averages logits where windows overlap).
    """

    def __init__(self, backbone, window=None, stride=24, batch_size=None, progress=False, precision="auto", head=None):
        super().__init__()
        self.backbone = backbone
        self.window = backbone.window if window is None else window
        self.stride = stride
        self.batch_size = batch_size
        self.progress = progress
        self.precision = precision
        self.head = head
        p = backbone.patch_size
        if not getattr(backbone, "slides", True):  # NaFlex: each image is resized to a patch budget, no window K
            raise TeacherError(
                f"{backbone.name} is a single-pass baseline with no window to slide; run it as a single pass "
                f"(segment.py --mode single, evaluate.py --modes single)."
            )
        if self.window < p or self.window % p:  # 0, negative, below one patch, or between two patch multiples
            raise TeacherError(f"window {self.window} must be a positive multiple of the patch size {p}.")
        if not 0 < stride <= self.window:  # a stride above K leaves strips that no window sees
            raise TeacherError(f"the stride must be between 1 and the {self.window} px window, got {stride}.")
        if batch_size is not None and batch_size < 1:
            raise TeacherError(f"the batch size must be at least 1 window, got {batch_size}.")
        if precision not in PRECISIONS:
            raise TeacherError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
        self.r = sub_patch_factor(stride, p)

    def windows(self, H: int, W: int) -> tuple[int, int, list[int], list[int]]:
        """Canvas size (the fitted grid, at least K) and (E1) row / column starts for an H x W image."""
        p, K = self.backbone.patch_size, self.window
        h, w = self.backbone.grid_size(H, W)
        Hp, Wp = max(K, h * p), max(K, w * p)
        return Hp, Wp, window_starts(Hp, K, self.stride), window_starts(Wp, K, self.stride)

    def num_windows(self, H: int, W: int) -> int:
        _, _, ys, xs = self.windows(H, W)
        return len(ys) * len(xs)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        p, K, r = self.backbone.patch_size, self.window, self.r
        cell = p // r
        Hp, Wp, ys, xs = self.windows(H, W)
        h, w = self.backbone.grid_size(H, W)
        x = self.backbone.fit_to_grid(x)  # (B, 3, h*p, w*p): pad (ceil) / crop (floor)
        x = F.pad(x, (0, Wp - x.shape[-1], 0, Hp - x.shape[-2]))  # up to K; zero = mean colour after normalising
        device = x.device

        # All windows of all images as index vectors: image b, top-left (y, x) in pixels.   (E1)
        corners = torch.cartesian_prod(torch.tensor(ys), torch.tensor(xs)).to(device).repeat(B, 1)  # (n, 2)
        b_idx = torch.arange(B, device=device).repeat_interleave(len(ys) * len(xs))
        y_idx, x_idx = corners.T
        n = len(corners)

        stitcher = None
        batch = self.batch_size or default_batch_size(self.backbone, device)
        starts = range(0, n, batch)
        for i in tqdm(starts, desc=f"teacher: {n} windows", unit="batch", disable=not self.progress, leave=False):
            b, y0, x0 = b_idx[i : i + batch], y_idx[i : i + batch], x_idx[i : i + batch]
            crops = crop_windows(x, b, y0, x0, K)  # (n_b, 3, K, K)
            with autocast(device, self.precision):
                feats = self.backbone.dense(crops)  # (n_b, k, k, C): F_w = f(x[:, y:y+K, x:x+K])   (E1)
            if self.head is not None:
                feats = self.head(feats.float())  # (n_b, k, k, D), e.g. cosine logits
            if stitcher is None:
                stitcher = Stitcher(B, (Hp // cell, Wp // cell), feats.shape[-1], r, device=device)
            stitcher.add(feats, b, y0 // cell, x0 // cell)  # (E2) place_w(up_r(F_w))
        return stitcher.result((h, w))  # (E2) / sum_w place_w(1), resize_{h x w}


def default_batch_size(backbone: Backbone, device) -> int:
    """Windows per forward pass: 16 on CPU; on GPU as many as roughly a quarter of the free memory allows."""
    device = torch.device(device)
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    tokens = (backbone.window // backbone.patch_size) ** 2
    # ~ activations of one block in bf16 plus the up-sampled fp32 window maps (generous: 24 C-sized rows / token)
    per_window = tokens * backbone.dim * 24 * 2 + tokens * 4 * backbone.dim * 4
    return int(max(1, min(256, free // 4 // per_window)))


def crop_windows(x: torch.Tensor, b: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, K: int) -> torch.Tensor:
    """(E1) the K x K windows with top-left corners (y0, x0) of images b of x (B, 3, H, W): (n, 3, K, K)."""
    if x.device.type == "cpu":
        # CPU: one slice copy (a memcpy) per window is ~50x faster than the element-wise gather of gather_windows
        return torch.stack([x[i, :, y : y + K, w : w + K] for i, y, w in zip(b.tolist(), y0.tolist(), x0.tolist())])
    return gather_windows(x, b, y0, x0, K)


def gather_windows(x: torch.Tensor, b: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, K: int) -> torch.Tensor:
    """`crop_windows` on GPU: one gather kernel crops the whole batch (one launch, no host sync, no per-window
    launches); the same values as slicing each window."""
    offs = torch.arange(K, device=x.device)
    chans = torch.arange(x.shape[1], device=x.device)
    rows = (y0[:, None] + offs)[:, None, :, None]  # (n, 1, K, 1)
    cols = (x0[:, None] + offs)[:, None, None, :]  # (n, 1, 1, K)
    return x[b[:, None, None, None], chans[None, :, None, None], rows, cols]  # (n, 3, K, K)


def _run(argv):
    parser = cli.ArgumentParser(
        description="Sliding-window teacher (E1-E2) vs single-pass student (E3): "
        "prints the grid, window count, timings and their agreement."
    )
    cli.add_backbone_args(parser, BACKBONES)
    parser.add_argument("--image", help="image file (default: random noise of --size)")
    parser.add_argument("--size", default="512x1024", help="HxW used when --image is not given (default: %(default)s)")
    cli.add_teacher_args(parser)  # --stride, --window, --batch-size, --precision
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device)
    size = cli.parse_size(args.size, "--size") if not args.image else None
    backbone = load_backbone(args.backbone, args.pretrained, device)
    cli.note_random_weights(backbone.random_weights)
    cli.check_memory(*(size or (1, 1)), backbone.patch_size, backbone.dim, device, "the single pass at")  # --size
    teacher = Teacher(backbone, args.window, args.stride, args.batch_size, progress=True, precision=args.precision)
    img = load_image(args.image) if args.image else torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    x = backbone.normalize(img.to(device))
    H, W = x.shape[-2:]
    cli.check_window_fits(args.window, H, W)
    print(
        f"backbone {backbone.name} (K={teacher.window}, p={backbone.patch_size}, C={backbone.dim}), "
        f"image {H}x{W}, grid {backbone.grid_size(H, W)}"
    )
    print(f"stride {args.stride}: {teacher.num_windows(H, W)} windows, sub-patch factor r={teacher.r}")
    with torch.inference_mode(), autocast(device, args.precision):
        student, t_student = timed(lambda: backbone.dense(x).float(), device)
    target, t_teacher = timed(lambda: teacher(x), device, warmup=False)
    cos = F.cosine_similarity(student, target, dim=-1).mean().item()
    mse = F.mse_loss(student, target).item()
    print(f"single pass: {t_student:8.3f} s   teacher: {t_teacher:8.3f} s   ({t_teacher / t_student:.1f}x slower)")
    print(f"teacher vs single pass: mean cosine {cos:.4f}, MSE {mse:.4g}")


def main(argv=None):
    return cli.main_guard(_run, argv)


if __name__ == "__main__":
    main()
