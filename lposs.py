"""LPOSS and LPOSS+ (Stojnic et al., CVPR 2025): training-free label propagation over patches, then over pixels.

The initial scores are the cosine logits of SPAR's dense features against the class text embeddings, (E5).  LPOSS
spreads them over a graph of patches whose edges come from a second set of "affinity" features (the authors use
DINO ViT-B/16 last-block value vectors; any backbone's dense features work); LPOSS+ then spreads the upsampled
result over a graph of pixels whose edges come from the image's colours.  Constants: the authors' public code
(configs/lposs_plus.yaml, segmentation/evaluation/lposs_eval.py).

Patch level, N = h*w patches, Q queries:
  (L1) Y = cosine logits (N, Q): the input, (E5).
  (L2) s_ij = <f_i, f_j> of the L2-normalised affinity features; keep the k = 400 largest j per row i (i itself
       included), k <= N.
  (L3) A_ij = max(s_ij, 0)^gamma * exp(-sigma * d_ij^rho), gamma = 3, sigma = 0.01, rho = 1, d_ij the distance in
       pixels between the centres of patches i and j (patch size times the grid distance); A_ij = 0 off the k-NN.
  (L4) W = A + A^T with its diagonal set to 0.
  (L5) W_n = D^-1/2 W D^-1/2, D = diag(W 1) (a degree of 0 counts as 1).
  (L6) Z = (I - alpha W_n)^-1 Y, alpha = 0.95: each column by conjugate gradient from 0, at most 50 iterations,
       stopping once ||r|| <= 1e-6 ||y|| (cupyx.scipy.sparse.linalg.cg(tol=1e-6, maxiter=50), as the authors do).
Pixel level, LPOSS+ (M = H*W pixels of the image the logits were upsampled to):
  (L7) Y+ = Z bilinearly upsampled to H x W: the input of `lposs_plus`.
  (L8) lab_p = Lab(rgb_p) / (100, 128, 128): CIE Lab (sRGB, D65 white) scaled to about [0, 1].
  (L9) W+_pq = exp(-||lab_p - lab_q|| / tau), tau = 0.01, for q != p in the 13 x 13 window around p (radius 6).
  (L10) (L5)-(L6) again with W+; W+ is applied as a stencil of 84 offset pairs, never stored as an M x M matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cli import UserError


class LPOSSError(UserError):
    """Bad input to LPOSS / LPOSS+ (shapes that do not fit, a setting out of range)."""


def patch_graph(feats, grid_hw, patch, k=400, gamma=3.0, sigma=0.01, rho=1.0) -> torch.Tensor:
    """(L2)-(L4) Affinity features (N, C) of an h x w grid -> the symmetric patch graph W (N, N), dense."""
    N = feats.shape[0]
    f = F.normalize(feats, dim=-1)
    sims, nn_idx = (f @ f.T).topk(min(k, N), dim=1)  # (L2) dense top-k, self included
    h, w = grid_hw
    yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(N, 2)
    yx = yx.to(feats.device, feats.dtype) * patch  # patch centres in pixels (the common patch/2 offset cancels)
    dist = (yx[:, None, :] - yx[nn_idx]).norm(dim=-1)  # (N, k)
    a = sims.clamp_min(0) ** gamma * torch.exp(-sigma * dist**rho)  # (L3)
    A = torch.zeros(N, N, dtype=feats.dtype, device=feats.device).scatter_(1, nn_idx, a)
    W = A + A.T  # (L4)
    return W.fill_diagonal_(0)


def inv_sqrt_degree(degree: torch.Tensor) -> torch.Tensor:
    """(L5) D^-1/2 from the degrees, a degree of 0 counted as 1 (an isolated node keeps its own scores)."""
    return torch.where(degree > 0, degree, torch.ones_like(degree)).rsqrt()


def conjugate_gradient(matvec, B: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """(L6) Solve A X = B for a symmetric positive definite A given as `matvec`, every row of B (shape (Q, ...))
    its own system: conjugate gradient from X = 0; a row stops once ||r|| <= tol * ||b||, all stop after `iters`."""
    dims = tuple(range(1, B.ndim))

    def dot(u, v):
        return (u * v).sum(dims, keepdim=True)

    X, R, P = torch.zeros_like(B), B.clone(), B.clone()
    rho = dot(R, R)
    stop = tol**2 * rho  # ||r||^2 <= tol^2 ||b||^2
    active = rho > stop  # a zero right-hand side is solved by X = 0
    for _ in range(iters):
        if not active.any():
            break
        AP = matvec(P)
        pap = dot(P, AP)
        active = active & (pap > 0)  # p^T A p = 0 only once r has underflowed to 0: that row is solved
        alpha = torch.where(active, rho / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        X = X + alpha * P
        R = R - alpha * AP
        rho_new = dot(R, R)
        beta = torch.where(active, rho_new / torch.where(active, rho, torch.ones_like(rho)), torch.zeros_like(rho))
        active = active & (rho_new > stop)
        P = R + beta * P
        rho = rho_new
    return X


def propagate_patches(Y, feats, grid_hw, patch, k=400, alpha=0.95, gamma=3.0, sigma=0.01, rho=1.0, iters=50, tol=1e-6):
    """(L1)-(L6) for one image: scores Y (N, Q) and affinity features (N, C) -> Z (N, Q)."""
    W = patch_graph(feats.to(Y.dtype), grid_hw, patch, k, gamma, sigma, rho)
    d = inv_sqrt_degree(W.sum(1))
    Wn = d[:, None] * W * d[None, :]  # (L5)
    Z = conjugate_gradient(lambda X: X - alpha * (X @ Wn), Y.T.contiguous(), iters, tol)  # (L6), rows = queries
    return Z.T


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(L8) sRGB in [0, 1], (3, H, W) -> CIE Lab (D65 white, 2-degree observer), L in [0, 100] (kornia's formula)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    M = torch.tensor(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
        dtype=rgb.dtype,
        device=rgb.device,
    )
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,jhw->ihw", M, lin) / white[:, None, None]
    t = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 4 / 29)
    return torch.stack([116 * t[1] - 16, 500 * (t[0] - t[1]), 200 * (t[1] - t[2])])


def half_window(radius: int) -> list[tuple[int, int]]:
    """The offsets (dy, dx) of a (2r+1)^2 window that come after (0, 0): each undirected pixel pair once."""
    return [(dy, dx) for dy in range(radius + 1) for dx in range(-radius, radius + 1) if dy > 0 or dx > 0]


def _pair_slices(dy: int, dx: int, H: int, W: int):
    """Pixels p and p + (dy, dx) of every pair inside an H x W image, as two (row, column) slice pairs."""
    p = (slice(0, H - dy), slice(max(0, -dx), W - max(0, dx)))
    q = (slice(dy, H), slice(max(0, dx), W - max(0, -dx)))
    return p, q


def pixel_pairs(lab: torch.Tensor, radius: int = 6, tau: float = 0.01) -> list:
    """(L9) Scaled Lab (3, H, W) -> for each offset of `half_window` that fits in the image, the pixels p, q of
    its pairs (slices) and their weights exp(-||lab_p - lab_q|| / tau)."""
    _, H, W = lab.shape
    pairs = []
    for dy, dx in half_window(radius):
        if dy < H and abs(dx) < W:
            (py, px), (qy, qx) = _pair_slices(dy, dx, H, W)
            diff = lab[:, py, px] - lab[:, qy, qx]
            pairs.append(((py, px), (qy, qx), torch.exp(-diff.pow(2).sum(0).sqrt() / tau)))
    return pairs


def stencil(pairs: list, X: torch.Tensor) -> torch.Tensor:
    """(L10) W+ X for X (Q, H, W): every pair (p, q) adds w_pq x_q to p and w_pq x_p to q (W+ is symmetric)."""
    out = torch.zeros_like(X)
    for (py, px), (qy, qx), w in pairs:
        out[:, py, px].addcmul_(w, X[:, qy, qx])
        out[:, qy, qx].addcmul_(w, X[:, py, px])
    return out


def propagate_pixels(Y, rgb, radius=6, tau=0.01, alpha=0.95, iters=50, tol=1e-6):
    """(L7)-(L10) for one image: pixel scores Y (Q, H, W) and the RGB image (3, H, W) in [0, 1] -> Z+ (Q, H, W)."""
    scale = torch.tensor([100.0, 128.0, 128.0], dtype=Y.dtype, device=Y.device)[:, None, None]
    pairs = pixel_pairs(rgb_to_lab(rgb.to(Y.dtype)) / scale, radius, tau)  # (L8), (L9)
    d = inv_sqrt_degree(stencil(pairs, torch.ones_like(Y[:1])))  # (L5) D = diag(W+ 1)
    return conjugate_gradient(lambda X: X - alpha * d * stencil(pairs, d * X), Y, iters, tol)  # (L6)


# ----------------------------------------------------------------------------------------------------------------
# The entry points: shapes and settings checked, one image at a time
# ----------------------------------------------------------------------------------------------------------------


def _check_settings(alpha, iters, tol, counts=(), tau=1.0):
    """One sentence for a setting out of range; `counts`: (name, value) pairs that must be integers >= 1."""
    for name, value in (("iters", iters), *counts):
        if not (isinstance(value, int) and value >= 1):
            raise LPOSSError(f"LPOSS needs {name} to be an integer >= 1, got {value!r}.")
    if not (0 < alpha < 1 and tol >= 0 and tau > 0):
        raise LPOSSError(f"LPOSS needs 0 < alpha < 1, tol >= 0 and tau > 0, got {alpha}, {tol} and {tau}.")


def _patch_inputs(logits, feats, grid_hw):
    """-> (Y (B, N, Q), f (B, N, C), (h, w)) from logits (B, Q, h, w) | (Q, h, w) | (N, Q) and matching features
    (B, h, w, C) | (h, w, C) | (N, C)."""
    if logits.ndim == 2:
        if grid_hw is None or grid_hw[0] * grid_hw[1] != logits.shape[0]:
            raise LPOSSError(f"LPOSS logits of shape (h*w, Q) = {tuple(logits.shape)} need grid_hw with h*w rows.")
        Y, f, hw, want = logits[None], feats[None], tuple(grid_hw), (logits.shape[0],)
    elif logits.ndim in (3, 4):
        Y4 = logits if logits.ndim == 4 else logits[None]
        B, Q, h, w = Y4.shape
        hw, want, f = (h, w), (h, w), (feats if logits.ndim == 4 else feats[None])
        Y = Y4.permute(0, 2, 3, 1).reshape(B, h * w, Q)
        if f.ndim == 4 and f.shape[:3] == (B, h, w):
            f = f.reshape(B, h * w, -1)
    else:
        raise LPOSSError(f"LPOSS needs logits of shape (B, Q, h, w), (Q, h, w) or (h*w, Q), got {tuple(logits.shape)}.")
    if f.ndim != 3 or f.shape[:2] != Y.shape[:2]:
        raise LPOSSError(
            f"LPOSS affinity features of shape {tuple(feats.shape)} do not fit logits of shape {tuple(logits.shape)};"
            f" pass channels-last features on the same grid, shape (..., {', '.join(map(str, want))}, C)."
        )
    return Y, f, hw


def lposs(logits, feats, grid_hw=None, patch=16, k=400, alpha=0.95, gamma=3.0, sigma=0.01, rho=1.0, iters=50, tol=1e-6):
    """LPOSS: patch logits (B, Q, h, w) | (Q, h, w) | (h*w, Q) + affinity features on the same grid (channels last)
    -> propagated logits of the logits' shape.  `patch`: the affinity backbone's patch size in pixels."""
    _check_settings(alpha, iters, tol, (("k", k), ("patch", patch)))
    Y, f, hw = _patch_inputs(logits, feats, grid_hw)
    dtype = Y.dtype if Y.dtype == torch.float64 else torch.float32
    settings = (patch, k, alpha, gamma, sigma, rho, iters, tol)
    Z = torch.stack([propagate_patches(y.to(dtype), x, hw, *settings) for y, x in zip(Y, f)])
    if logits.ndim == 2:
        return Z[0]
    Z = Z.reshape(Z.shape[0], *hw, -1).permute(0, 3, 1, 2)
    return Z if logits.ndim == 4 else Z[0]


def lposs_plus(pixel_logits, image_rgb, radius=6, tau=0.01, alpha=0.95, iters=50, tol=1e-6) -> torch.Tensor:
    """LPOSS+: pixel logits (B, Q, H, W) | (Q, H, W) (LPOSS's output upsampled) + the image (B, 3, H, W) | (3, H, W)
    in [0, 1], before any normalisation -> refined pixel logits of the same shape."""
    _check_settings(alpha, iters, tol, (("radius", radius),), tau)
    Y = pixel_logits if pixel_logits.ndim == 4 else pixel_logits[None]
    rgb = image_rgb if image_rgb.ndim == 4 else image_rgb[None]
    if pixel_logits.ndim not in (3, 4) or rgb.ndim != 4 or rgb.shape[1] != 3 or rgb.shape[-2:] != Y.shape[-2:]:
        raise LPOSSError(
            f"LPOSS+ needs pixel logits (B, Q, H, W) and an RGB image (B, 3, H, W) of the same H x W, got "
            f"{tuple(pixel_logits.shape)} and {tuple(image_rgb.shape)}."
        )
    if rgb.shape[0] != Y.shape[0]:
        raise LPOSSError(f"LPOSS+ got {Y.shape[0]} logit maps but {rgb.shape[0]} images; pass one image per map.")
    lo, hi = float(rgb.min()), float(rgb.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise LPOSSError(f"LPOSS+ needs RGB in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); pass it unnormalised.")
    dtype = Y.dtype if Y.dtype == torch.float64 else torch.float32
    settings = (radius, tau, alpha, iters, tol)
    Z = torch.stack([propagate_pixels(y.to(dtype), x.clamp(0, 1), *settings) for y, x in zip(Y, rgb)])
    return Z if pixel_logits.ndim == 4 else Z[0]
