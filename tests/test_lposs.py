"""Tests for lposs.py: the patch graph (L2)-(L4) against loops and a hand computation, the normalisation (L5),
conjugate gradient (L6) against a direct dense solve, the Lab conversion (L8) against the CIE formula, the pixel
stencil (L9)-(L10) against the dense matrix it stands for, and the input checks."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lposs  # noqa: E402
from cli import UserError  # noqa: E402
from lposs import LPOSSError  # noqa: E402

D64 = torch.float64


def loop_patch_graph(feats, grid_hw, patch, k, gamma=3.0, sigma=0.01):
    """(L2)-(L4) written out with Python loops, one edge at a time."""
    N, w = feats.shape[0], grid_hw[1]
    f = [v / v.norm() for v in feats]
    A = torch.zeros(N, N, dtype=D64)
    for i in range(N):
        sims = sorted(((float(f[i] @ f[j]), j) for j in range(N)), reverse=True)[:k]
        for s, j in sims:
            d = patch * math.hypot(i // w - j // w, i % w - j % w)
            A[i, j] = max(s, 0.0) ** gamma * math.exp(-sigma * d)
    W = A + A.T
    for i in range(N):
        W[i, i] = 0
    return W


def normalised(W):
    deg = W.sum(1)
    d = torch.where(deg > 0, deg, torch.ones_like(deg)) ** -0.5
    return d[:, None] * W * d[None, :]


def dense_pixel_graph(rgb, radius, tau):
    """(L8)-(L9) as the authors build it: every in-bounds offset of the window except (0, 0), one row per pixel."""
    lab = lposs.rgb_to_lab(rgb) / torch.tensor([100.0, 128.0, 128.0], dtype=rgb.dtype)[:, None, None]
    _, H, W = rgb.shape
    M = torch.zeros(H * W, H * W, dtype=rgb.dtype)
    for y in range(H):
        for x in range(W):
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    if (dy or dx) and 0 <= y + dy < H and 0 <= x + dx < W:
                        dist = (lab[:, y, x] - lab[:, y + dy, x + dx]).norm()
                        M[y * W + x, (y + dy) * W + x + dx] = torch.exp(-dist / tau)
    return M


def one_sentence(exc):
    text = str(exc.value)
    return "\n" not in text and text.endswith(".") and isinstance(exc.value, UserError)


# --------------------------------------------------------------------------------------------------------------
# (L2)-(L5) the patch graph
# --------------------------------------------------------------------------------------------------------------


def test_patch_graph_by_hand():
    """1 x 3 grid, patch 16: cosines s01 = 0.6, s12 = 0.8, s02 = -0.6 (clipped to 0 although among the k = 3)."""
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]], dtype=D64) * torch.tensor([[2.0], [1.0], [3.0]], dtype=D64)
    W = lposs.patch_graph(f, (1, 3), patch=16, k=3)
    a01 = 0.6**3 * math.exp(-0.16)
    a12 = 0.28**3 * math.exp(-0.16)  # s12 = 0.6 * -0.6 + 0.8 * 0.8 = 0.28
    expected = torch.tensor([[0, 2 * a01, 0], [2 * a01, 0, 2 * a12], [0, 2 * a12, 0]], dtype=D64)
    torch.testing.assert_close(W, expected, rtol=1e-12, atol=1e-15)
    # k = 2: each row keeps itself and its best neighbour; 0 -> 1 and 2 -> 1 but 1 -> 0 only (0.6 > 0.28)
    W2 = lposs.patch_graph(f, (1, 3), patch=16, k=2)
    torch.testing.assert_close(W2, torch.tensor([[0, 2 * a01, 0], [2 * a01, 0, a12], [0, a12, 0]], dtype=D64))


def test_patch_graph_matches_loops():
    torch.manual_seed(0)
    feats = torch.randn(4 * 5, 6, dtype=D64)
    for k in (1, 7, 20, 400):  # 400 > N: clipped to N
        W = lposs.patch_graph(feats, (4, 5), patch=14, k=k)
        torch.testing.assert_close(W, loop_patch_graph(feats, (4, 5), 14, min(k, 20)), rtol=1e-10, atol=1e-12)
        assert torch.equal(W, W.T) and torch.all(W.diagonal() == 0) and torch.all(W >= 0)


def test_isolated_patch_keeps_its_scores():
    """A patch whose cosines to all others are negative has degree 0 (counted as 1): Z = Y there, finite."""
    feats = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.0]], dtype=D64)
    Y = torch.randn(3, 4, dtype=D64)
    Z = lposs.lposs(Y, feats, grid_hw=(1, 3), k=3, iters=100, tol=0)
    assert torch.isfinite(Z).all()
    torch.testing.assert_close(Z[2], Y[2])
    assert not torch.allclose(Z[0], Y[0])


# --------------------------------------------------------------------------------------------------------------
# (L6) conjugate gradient
# --------------------------------------------------------------------------------------------------------------


def test_conjugate_gradient_matches_direct_solve():
    torch.manual_seed(1)
    N, Q = 30, 5
    Wn = normalised(lposs.patch_graph(torch.randn(N, 8, dtype=D64), (5, 6), 16, k=10))
    Amat = torch.eye(N, dtype=D64) - 0.95 * Wn
    B = torch.randn(Q, N, dtype=D64)
    X = lposs.conjugate_gradient(lambda P: P @ Amat, B, iters=N, tol=0)
    torch.testing.assert_close(X, torch.linalg.solve(Amat, B.T).T, rtol=1e-9, atol=1e-10)
    few = lposs.conjugate_gradient(lambda P: P @ Amat, B, iters=3, tol=0)
    assert (few - X).abs().max() > 1e-4  # 3 iterations are not the solution: the iterations count


def test_conjugate_gradient_rows_are_separate_systems():
    """Each row has its own step sizes and stops on its own: solving rows together == solving them one by one;
    a zero right-hand side gives exactly 0; a loose tolerance stops before `iters`."""
    torch.manual_seed(2)
    Amat = normalised(lposs.patch_graph(torch.randn(24, 4, dtype=D64), (4, 6), 16, k=6))
    Amat = torch.eye(24, dtype=D64) - 0.95 * Amat
    B = torch.randn(3, 24, dtype=D64)
    B[1] = 0
    B[2] *= 1e-3
    together = lposs.conjugate_gradient(lambda P: P @ Amat, B, iters=50, tol=1e-6)
    for i in range(3):
        alone = lposs.conjugate_gradient(lambda P: P @ Amat, B[i : i + 1], iters=50, tol=1e-6)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-12, atol=1e-15)
    assert torch.all(together[1] == 0)
    calls = []
    lposs.conjugate_gradient(lambda P: calls.append(1) or P @ Amat, B, iters=50, tol=0.3)
    assert 1 <= len(calls) < 50


def test_conjugate_gradient_stops_at_the_relative_residual():
    """The authors' rule (cupyx cg): stop once ||b - A x|| <= tol * ||b||, not one iteration later or earlier."""
    torch.manual_seed(10)
    Amat = normalised(lposs.patch_graph(torch.randn(40, 4, dtype=D64), (5, 8), 16, k=10))
    Amat = torch.eye(40, dtype=D64) - 0.95 * Amat
    b = torch.randn(1, 40, dtype=D64)
    for tol in (1e-2, 1e-4):
        calls = []
        x = lposs.conjugate_gradient(lambda P: calls.append(1) or P @ Amat, b, iters=100, tol=tol)
        assert (b - x @ Amat).norm() <= tol * b.norm() and len(calls) > 1
        before = lposs.conjugate_gradient(lambda P: P @ Amat, b, iters=len(calls) - 1, tol=tol)
        assert (b - before @ Amat).norm() > tol * b.norm()


def test_lposs_solves_the_linear_system_per_image():
    torch.manual_seed(3)
    B, Q, h, w, C = 2, 4, 5, 6, 8
    logits = torch.randn(B, Q, h, w, dtype=D64)
    feats = torch.randn(B, h, w, C, dtype=D64)
    Z = lposs.lposs(logits, feats, patch=16, k=12, iters=200, tol=0)
    for b in range(B):
        Wn = normalised(loop_patch_graph(feats[b].reshape(h * w, C), (h, w), 16, 12))
        Y = logits[b].reshape(Q, h * w).T
        direct = torch.linalg.solve(torch.eye(h * w, dtype=D64) - 0.95 * Wn, Y)
        torch.testing.assert_close(Z[b].reshape(Q, h * w).T, direct, rtol=1e-9, atol=1e-10)


def test_lposs_defaults_are_the_authors():
    """k = 400, alpha = 0.95, gamma = 3, sigma = 0.01, rho = 1, CG with tol 1e-6 and at most 50 iterations."""
    torch.manual_seed(4)
    logits, feats = torch.randn(3, 7, 8), torch.randn(7, 8, 16)
    Z = lposs.lposs(logits, feats)
    explicit = lposs.lposs(logits, feats, patch=16, k=400, alpha=0.95, gamma=3.0, sigma=0.01, rho=1.0, iters=50)
    assert torch.equal(Z, explicit)
    assert not torch.allclose(Z, lposs.lposs(logits, feats, iters=2), atol=1e-4)
    assert not torch.allclose(Z, lposs.lposs(logits, feats, alpha=0.5), atol=1e-4)


def test_lposs_input_layouts_agree():
    torch.manual_seed(5)
    Q, h, w, C = 3, 4, 5, 6
    logits, feats = torch.randn(Q, h, w), torch.randn(h, w, C)
    Z3 = lposs.lposs(logits, feats)
    Z4 = lposs.lposs(logits[None], feats[None])
    Z2 = lposs.lposs(logits.reshape(Q, h * w).T, feats.reshape(h * w, C), grid_hw=(h, w))
    assert Z3.shape == (Q, h, w) and Z4.shape == (1, Q, h, w) and Z2.shape == (h * w, Q)
    torch.testing.assert_close(Z4[0], Z3)
    torch.testing.assert_close(Z2, Z3.reshape(Q, h * w).T)


def test_lposs_cleans_a_two_cluster_scene():
    """Two feature clusters (left / right half), logits right on 70% of patches: propagation makes each half one
    class, the one most of its patches said."""
    torch.manual_seed(6)
    h, w = 6, 8
    side = (torch.arange(w) >= w // 2).long().expand(h, w)  # 0 left, 1 right
    centres = torch.randn(2, 32)
    feats = centres[side] + 0.1 * torch.randn(h, w, 32)
    truth = torch.nn.functional.one_hot(side, 2).permute(2, 0, 1).float()
    flip = torch.rand(h, w) < 0.3
    noisy = torch.where(flip, 1 - truth, truth) + 0.05 * torch.randn(2, h, w)
    assert (noisy.argmax(0) != side).sum() >= 5
    assert torch.equal(lposs.lposs(noisy, feats, k=24).argmax(0), side)


# --------------------------------------------------------------------------------------------------------------
# (L7)-(L10) LPOSS+: Lab, the stencil, the pixel solve
# --------------------------------------------------------------------------------------------------------------


def cie_lab(r, g, b):
    """sRGB (D65) -> CIE Lab with the CIE's exact constants (epsilon = 216/24389, kappa = 24389/27)."""

    def lin(c):
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    R, G, B = lin(r), lin(g), lin(b)
    X = (0.4124564 * R + 0.3575761 * G + 0.1804375 * B) / 0.95047
    Y = 0.2126729 * R + 0.7151522 * G + 0.0721750 * B
    Z = (0.0193339 * R + 0.1191920 * G + 0.9503041 * B) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    return 116 * f(Y) - 16, 500 * (f(X) - f(Y)), 200 * (f(Y) - f(Z))


def test_rgb_to_lab_against_the_cie_formula():
    named = {
        (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
        (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0): (53.24, 80.09, 67.20),  # sRGB red, green, blue: the published D65 values
        (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
        (0.0, 0.0, 1.0): (32.30, 79.19, -107.86),
        (0.045, 0.045, 0.045): cie_lab(0.045, 0.045, 0.045),  # just above the sRGB gamma's linear part
        (0.04, 0.04, 0.04): cie_lab(0.04, 0.04, 0.04),  # just below it
    }
    for rgb, lab in named.items():
        got = lposs.rgb_to_lab(torch.tensor(rgb, dtype=D64)[:, None, None])[:, 0, 0]
        torch.testing.assert_close(got, torch.tensor(lab, dtype=D64), atol=0.02 if max(rgb) == 1 else 2e-3, rtol=0)
    torch.manual_seed(7)
    rgb = torch.rand(3, 4, 5, dtype=D64)
    rgb[:, 0, :] *= 0.02  # dark colours: the linear branches of both the gamma and the cube root
    got = lposs.rgb_to_lab(rgb)
    for y in range(4):
        for x in range(5):
            want = torch.tensor(cie_lab(*rgb[:, y, x].tolist()), dtype=D64)
            torch.testing.assert_close(got[:, y, x], want, atol=5e-3, rtol=0)


def test_stencil_is_the_dense_pixel_graph():
    torch.manual_seed(8)
    rgb, X = torch.rand(3, 5, 7, dtype=D64), torch.randn(4, 5, 7, dtype=D64)
    for radius in (1, 2, 6):  # 6 is wider than the image: only in-bounds pairs count
        lab = lposs.rgb_to_lab(rgb) / torch.tensor([100.0, 128.0, 128.0], dtype=D64)[:, None, None]
        pairs = lposs.pixel_pairs(lab, radius, tau=0.1)
        assert len(pairs) == (((2 * radius + 1) ** 2 - 1) // 2 if radius < 5 else 4 * 13 + 6)
        M = dense_pixel_graph(rgb, radius, tau=0.1)
        assert torch.equal(M, M.T)
        torch.testing.assert_close(lposs.stencil(pairs, X).reshape(4, -1), X.reshape(4, -1) @ M)


def test_lposs_plus_solves_the_pixel_system():
    torch.manual_seed(9)
    rgb, Y = torch.rand(2, 3, 4, 6, dtype=D64), torch.randn(2, 3, 4, 6, dtype=D64)
    Z = lposs.lposs_plus(Y, rgb, radius=2, tau=0.05, iters=300, tol=0)
    for b in range(2):
        Wn = normalised(dense_pixel_graph(rgb[b], 2, 0.05))
        direct = torch.linalg.solve(torch.eye(24, dtype=D64) - 0.95 * Wn, Y[b].reshape(3, -1).T)
        torch.testing.assert_close(Z[b].reshape(3, -1).T, direct, rtol=1e-9, atol=1e-10)
    assert torch.equal(lposs.lposs_plus(Y[0], rgb[0]), lposs.lposs_plus(Y[:1], rgb[:1])[0])


def test_lposs_plus_follows_colour_edges():
    """Two flat colours split at column 9 of 16; scores say 'left' up to column 6 and 'right' after it (a boundary
    3 pixels off).  The pixel pass moves the boundary onto the colour edge."""
    H, W = 12, 16
    rgb = torch.zeros(3, H, W)
    rgb[:, :, :9] = torch.tensor([0.8, 0.2, 0.1])[:, None, None]
    rgb[:, :, 9:] = torch.tensor([0.1, 0.3, 0.9])[:, None, None]
    left = (torch.arange(W) < 6).float().expand(H, W)
    Y = torch.stack([left, 1 - left]) * 0.2 + 0.4  # a weak, blurry boundary at column 6
    Y = Y + 0.1 * torch.linspace(-1, 1, W)[None, None, :] * torch.tensor([-1.0, 1.0])[:, None, None]
    assert torch.equal(Y.argmax(0)[:, 6:9], torch.ones(H, 3, dtype=torch.long))  # wrong before the pass
    labels = lposs.lposs_plus(Y, rgb).argmax(0)
    assert torch.equal(labels[:, :9], torch.zeros(H, 9, dtype=torch.long))
    assert torch.equal(labels[:, 9:], torch.ones(H, W - 9, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------
# input checks: one sentence each, a UserError
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: lposs.lposs(torch.randn(2, 3, 4, 5), torch.randn(2, 4, 6, 8)),  # another grid
        lambda: lposs.lposs(torch.randn(20, 3), torch.randn(20, 8)),  # (h*w, Q) without grid_hw
        lambda: lposs.lposs(torch.randn(20, 3), torch.randn(20, 8), grid_hw=(3, 5)),
        lambda: lposs.lposs(torch.randn(5), torch.randn(5, 8)),
        lambda: lposs.lposs(torch.randn(3, 4, 5), torch.randn(4, 5, 8), alpha=1.0),
        lambda: lposs.lposs(torch.randn(3, 4, 5), torch.randn(4, 5, 8), k=0),
        lambda: lposs.lposs_plus(torch.randn(3, 8, 8), torch.rand(3, 8, 9)),  # another size
        lambda: lposs.lposs_plus(torch.randn(3, 8, 8), torch.randn(3, 8, 8)),  # ImageNet-normalised, not [0, 1]
        lambda: lposs.lposs_plus(torch.randn(2, 3, 8, 8), torch.rand(1, 3, 8, 8)),
        lambda: lposs.lposs_plus(torch.randn(3, 8, 8), torch.rand(3, 8, 8), radius=0),
        lambda: lposs.lposs_plus(torch.randn(3, 8, 8), torch.rand(3, 8, 8), tau=0),
    ],
)
def test_bad_input_is_one_sentence(call):
    with pytest.raises(LPOSSError) as exc:
        call()
    assert one_sentence(exc)
