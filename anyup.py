"""AnyUp (Wimmer et al., ICLR 2026): upsampling the dense features of ANY backbone, without retraining it.

A small network looks at the high-resolution image and decides, for every output pixel, how to mix the
low-resolution features around it.  The values of its attention are the raw features F (B, C, h, w): every output
vector is a convex combination of input vectors, so upsampled SPAR features stay in the text-aligned space and the
cosine logits (E5) can be taken on them unchanged.  Architecture and parameter names follow the authors' release
(wimmerth/anyup: anyup/model.py, anyup/layers/), so its weights files load here strictly by key name.

  (U1) e = RoPE(ImageEncoder(I)): 1x1 conv + 2 residual blocks on the ImageNet-normalised image I (B, 3, H, W),
       then a 2-D rotary embedding with coordinates in [0, 1]^2 (half the channels rotate with y, half with x).
  (U2) queries q = Conv3x3(pool_{H' x W'}(QueryEncoder(e))), one per output pixel.
  (U3) keys k = Aggregation([pool_{h x w}(KeyEncoder(e)), LFU(F / ||F||)]), one per feature-grid cell.  LFU (learned
       feature unification) makes any C channels into 128: a 5x5 depthwise filter bank, softmax over the filters,
       mean over the channels.
  (U4) A = mean over 4 heads of softmax(q_h . k_h / sqrt(32) + M), q_h, k_h projections of RMSNorm(q), RMSNorm(k);
       M = -inf outside the window of +-0.1 (of the image side) around the query.
  (U5) out = A F: the raw features as values.  Queries go in chunks of output rows (each chunk sees only the key
       rows its windows reach), so a 1024 x 2048 output never holds a (H' W') x (h w) attention matrix.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_state_dict_file
from cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AnyUpError(UserError):
    """Bad input to AnyUp (shapes that do not fit)."""


def _norm_act_conv(dim: int) -> list[nn.Module]:
    return [nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, dim, 1, bias=False)]


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 1x1 conv, twice, plus the input (the release's ResBlock with kernel_size=1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(*_norm_act_conv(dim), *_norm_act_conv(dim))

    def forward(self, x):
        return self.block(x) + x


def encoder(first: nn.Module, dim: int) -> nn.Sequential:
    return nn.Sequential(first, ResBlock(dim), ResBlock(dim))


class LearnedFeatureUnification(nn.Module):
    """(U3) Any number of feature channels -> `dim` channels, with a bank of `dim` k x k filters shared by all."""

    def __init__(self, dim: int = 128, kernel: int = 5):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(dim, 1, kernel, kernel))

    def forward(self, feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        # The release convolves channel c with filter o into output channel j = c * N + o (N filters), then
        # reads the result as (B, N, C, h, w) -- channel j = a * C + b -- with the softmax over a and the mean
        # over b.  Its weights were trained with that order, so it is kept: the pair (c, o) behind each (a, b) is
        # gathered, a chunk of b at a time (all of (B, N * C, h, w) is 3 GB for C = 768 on a 64 x 128 grid).
        B, C, h, w = feats.shape
        N, _, K, _ = self.basis.shape
        j = torch.arange(N * C, device=feats.device).view(N, C)
        x = F.pad(feats, (K // 2,) * 4)
        border = F.conv2d(F.pad(torch.ones_like(feats[:1, :1]), (K // 2,) * 4), torch.ones_like(self.basis[:1]))
        total = 0
        for b0 in range(0, C, chunk):
            jj = j[:, b0 : b0 + chunk].reshape(-1)
            y = F.conv2d(x[:, jj // N], self.basis[jj % N], groups=jj.numel()) / border
            total = total + y.view(B, N, -1, h, w).softmax(dim=1).sum(dim=2)
        return total / C


class RoPE(nn.Module):
    """(U1) 2-D rotary position embedding over channels: x cos(c W) + rotate_half(x) sin(c W), c = (y, x)."""

    def __init__(self, dim: int = 128, theta: float = 100.0):
        super().__init__()
        f = theta ** torch.linspace(0, -1, dim // 4)
        freqs = torch.zeros(2, dim)
        freqs[0, : dim // 2] = torch.cat([f, f])  # the first half of the channels turn with y ...
        freqs[1, dim // 2 :] = torch.cat([f, f])  # ... the second half with x
        self.freqs = nn.Parameter(freqs * 2 * torch.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W = x.shape
        ys = torch.linspace(0, 1, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(0, 1, W, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(H * W, 2)
        angle = coords @ self.freqs.to(x.dtype)  # (H W, D)
        t = x.flatten(2).transpose(1, 2)  # (B, H W, D)
        t1, t2 = t.chunk(2, dim=-1)
        t = t * angle.cos() + torch.cat([-t2, t1], dim=-1) * angle.sin()
        return t.transpose(1, 2).reshape(B, D, H, W)


def window(n_out: int, n_in: int, ratio: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U4) For each of n_out output positions along one axis, the input cells [lo, hi) within +-ratio of it."""
    pos = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) / n_out
    lo = ((pos - ratio).clamp(0, 1) * n_in).floor().long()
    hi = ((pos + ratio).clamp(0, 1) * n_in).ceil().long()
    return lo, hi


class CrossAttention(nn.Module):
    """(U4)-(U5) Windowed attention whose values are the raw features.  `attention` only holds the query and key
    projections (in_proj_*); its out_proj is never used, it is there because the released files contain it."""

    def __init__(self, dim: int = 128, heads: int = 4):
        super().__init__()
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, q, k, v, allowed):
        """q (B, n, D), k (B, m, D), v (B, m, C), allowed (n, m) bool -> (B, n, C)."""
        heads, D = self.attention.num_heads, q.shape[-1]
        Wq, Wk, _ = self.attention.in_proj_weight.chunk(3)
        bq, bk, _ = self.attention.in_proj_bias.chunk(3)
        qh = F.linear(self.norm_q(q), Wq, bq).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, n, D/heads)
        kh = F.linear(self.norm_k(k), Wk, bk).unflatten(-1, (heads, -1)).transpose(1, 2)
        logits = (qh @ kh.transpose(-1, -2)) * (D // heads) ** -0.5
        A = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).mean(dim=1)  # (U4)
        return A @ v  # (U5)


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, window_ratio: float = 0.1):
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads)
        self.window_ratio = window_ratio
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, q, k, v, chunk: int | None = 16384, head=None):
        """q (B, D, H', W'), k (B, D, h, w), v (B, C, h, w) -> (B, C, H', W'), or head(features) (B, Q, H', W')."""
        q = self.conv2d(q)  # (U2)
        (Ho, Wo), (h, w) = q.shape[-2:], k.shape[-2:]
        r_lo, r_hi = window(Ho, h, self.window_ratio, q.device)
        c_lo, c_hi = window(Wo, w, self.window_ratio, q.device)
        cols_ok = (torch.arange(w, device=q.device) >= c_lo[:, None]) & (
            torch.arange(w, device=q.device) < c_hi[:, None]
        )
        k, v = k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2)  # (B, h w, D), (B, h w, C)
        rows = Ho if chunk is None else max(1, chunk // Wo)
        out = []
        for y0 in range(0, Ho, rows):
            y1 = min(y0 + rows, Ho)
            k0, k1 = int(r_lo[y0:y1].min()), int(r_hi[y0:y1].max())  # the key rows this chunk's windows reach
            key_rows = torch.arange(k0, k1, device=q.device)
            rows_ok = (key_rows >= r_lo[y0:y1, None]) & (key_rows < r_hi[y0:y1, None])  # (y1 - y0, k1 - k0)
            allowed = (rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape((y1 - y0) * Wo, -1)
            qc = q[:, :, y0:y1].flatten(2).transpose(1, 2)
            f = self.cross_attn(qc, k[:, k0 * w : k1 * w], v[:, k0 * w : k1 * w], allowed)  # (B, n, C)
            f = head(f) if head is not None else f
            out.append(f.transpose(1, 2).unflatten(-1, (y1 - y0, Wo)))
        return torch.cat(out, dim=2)


class AnyUp(nn.Module):
    """The released AnyUp (qk_dim 128, 4 heads, window ratio 0.1, 5x5 LFU filters), parameter names as released."""

    def __init__(self, dim: int = 128, heads: int = 4, window_ratio: float = 0.1, lfu_kernel: int = 5):
        super().__init__()
        self.image_encoder = encoder(nn.Conv2d(3, dim, 1, bias=False), dim)
        self.key_encoder = encoder(nn.Conv2d(dim, dim, 1, bias=False), dim)
        self.query_encoder = encoder(nn.Conv2d(dim, dim, 1, bias=False), dim)
        self.key_features_encoder = encoder(LearnedFeatureUnification(dim, lfu_kernel), dim)
        self.cross_decode = CrossAttentionBlock(dim, heads, window_ratio)
        self.aggregation = encoder(nn.Conv2d(2 * dim, dim, 3, padding=1, padding_mode="reflect", bias=False), dim)
        self.rope = RoPE(dim)

    def forward(self, image, feats, out_hw=None, chunk: int | None = 16384, head=None) -> torch.Tensor:
        """ImageNet-normalised image (B, 3, H, W) + features (B, C, h, w) -> features (B, C, *out_hw) (default H x W);
        with `head` ((..., C) -> (..., Q), e.g. cosine logits) its output per chunk, (B, Q, *out_hw)."""
        _check_inputs(image, feats, out_hw, chunk)
        out_hw = tuple(out_hw) if out_hw is not None else tuple(image.shape[-2:])
        e = self.rope(self.image_encoder(image))  # (U1)
        q = F.adaptive_avg_pool2d(self.query_encoder(e), out_hw)  # (U2)
        k = F.adaptive_avg_pool2d(self.key_encoder(e), feats.shape[-2:])  # (U3)
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(feats, dim=1))], dim=1))
        return self.cross_decode(q, k, feats, chunk, head)  # (U4)-(U5)


def _check_inputs(image, feats, out_hw, chunk):
    if image.ndim != 4 or image.shape[1] != 3 or feats.ndim != 4 or feats.shape[0] != image.shape[0]:
        raise AnyUpError(
            f"AnyUp needs an image (B, 3, H, W) and features (B, C, h, w) of the same batch, got "
            f"{tuple(image.shape)} and {tuple(feats.shape)}."
        )
    if min(feats.shape[-2:]) < 2 or (out_hw is not None and min(out_hw) < 1) or (chunk is not None and chunk < 1):
        raise AnyUpError(
            f"AnyUp needs a feature grid of at least 2 x 2, an output size of at least 1 x 1 and a chunk >= 1, "
            f"got {tuple(feats.shape[-2:])}, {out_hw} and {chunk}."
        )


def load_anyup(path: str | None = None, device="cpu") -> AnyUp:
    """AnyUp with the released weights file at `path` (e.g. anyup_multi_backbone.pth, a plain state dict), loaded
    strictly by key name (a BackboneError names missing / unexpected keys and other shapes); random without one."""
    model = AnyUp()
    if path is not None:
        load_state_dict_file(model, path, "AnyUp")
    return model.to(device).eval()
