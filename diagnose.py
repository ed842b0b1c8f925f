"""What SPAR repairs, measured: three experiments on the miniature's model (`python miniature.py diagnose`).

At sizes above its native K x K the pre-trained single pass (E3) drifts: every token's dense feature F_S(i) gets a
near-constant OFFSET against the sliding-window teacher's F_T(i) (E1-E2), which sees only K x K at a time:

    offset = mean_i ( F_S(i) - F_T(i) ),   reported as |offset|, against the mean token length |F_T(i)|, and as its
             cosine with each class's text embedding t_c (E5): an offset along t_c pushes every token towards c.

Two interventions on the single pass locate its cause:
  * local attention: every block attends only to the 9 x 9 tokens around each token (the range of a K = 128
    window's 8 x 8 grid), as the teacher's windows bound it.  If the offset vanishes, attention RANGE causes it;
  * tiled positions: the native 8 x 8 position embeddings repeated, instead of resized by (E3).  If nothing
    changes, stretched position embeddings do not cause it.
Then the same table for the distilled student (E4): distillation learns to cancel the drift (the offset shrinks
and accuracy rises) without making attention local (its mean attention distance stays as it was).

    python miniature.py diagnose --out runs/miniature          # after `python miniature.py --out runs/miniature`
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import cli
import student
from benchmarks import dataset_samples, read_sample, read_templates
from files import read_json
from segment import cosine, text_embeddings
from teacher import Teacher


@contextlib.contextmanager
def local_attention(backbone, grid: tuple[int, int], radius: int = 4):
    """Every trunk block attends only to tokens within `radius` rows and columns ((2 r + 1)^2 tokens): an additive
    (N, N) mask of 0 and -inf passed to each block's attention (SDPA's `attn_mask`)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    mask = torch.zeros(h * w, h * w, device=backbone.device).masked_fill_(~near.to(backbone.device), float("-inf"))
    hooks = [b.register_forward_pre_hook(lambda m, a, k: (a, k | {"attn_mask": mask}), with_kwargs=True)
             for b in backbone.blocks]  # fmt: skip
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def tile_pos_embed(pos: torch.Tensor, old_hw, new_hw, mode: str = "size") -> torch.Tensor:
    """The native position-embedding grid repeated over the new grid (cell (i, j) gets native (i mod h, j mod w)),
    in place of (E3)'s bicubic resize."""
    C = pos.shape[-1]
    grid = pos.reshape(old_hw[0], old_hw[1], C)
    rows, cols = torch.arange(new_hw[0]) % old_hw[0], torch.arange(new_hw[1]) % old_hw[1]
    return grid[rows][:, cols].reshape(*pos.shape[:-2], new_hw[0] * new_hw[1], C)


def tiled_positions():
    return mock.patch.object(student, "resize_pos_embed", tile_pos_embed)


def attention_distance(backbone, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One single pass (E3): its dense features and the mean distance in tokens between a query and what it attends
    to, averaged over heads, blocks and queries (the attention recomputed from each block's input by a hook)."""
    h, w = backbone.grid_size(*x.shape[-2:])
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(x.device)
    dist, means = torch.cdist(pos, pos), []  # (N, N) token distances, once for every block

    def hook(attn, args, out):
        t = args[0]
        B, N, C = t.shape
        q, k, _ = attn.qkv(t).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = (attn.q_norm(q) * attn.scale @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)  # (B, heads, N, N)
        means.append((a * dist).sum(-1).mean())

    hooks = [b.attn.register_forward_hook(hook) for b in backbone.blocks]
    try:
        feats = backbone.dense(x)
    finally:
        for hook_handle in hooks:
            hook_handle.remove()
    return feats, float(torch.stack(means).mean())


def token_labels(label: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The label at each patch's centre pixel, (h, w) (255 beyond the image: padded cells)."""
    H, W = label.shape
    ys = (torch.arange(grid[0]) * patch + patch // 2).clamp(max=H - 1)
    xs = (torch.arange(grid[1]) * patch + patch // 2).clamp(max=W - 1)
    out = label[ys][:, xs].clone()
    out[(torch.arange(grid[0]) * patch + patch // 2) >= H] = 255
    out[:, (torch.arange(grid[1]) * patch + patch // 2) >= W] = 255
    return out


def measure(backbone, samples, text, stride: int = 24, reference=None) -> dict:
    """One row per variant: |offset| against the teacher, the offset's cosine with each class, token accuracy,
    mean attention distance; averaged over `samples`.  The teacher is the sliding window of `reference` (default:
    `backbone` itself; for a student: the pre-trained model it was distilled from)."""
    teacher = Teacher(reference or backbone, stride=stride, precision="fp32")
    rows = {k: dict(correct=0, tokens=0, distance=0.0) for k in ("single", "local", "tiled", "teacher")}
    offsets, length = {k: torch.zeros(backbone.dim, device=backbone.device) for k in rows}, 0.0
    with torch.inference_mode():
        for sample in samples:
            image, label = read_sample(sample)
            x = backbone.normalize(image[None].float().div(255).to(backbone.device))
            grid = backbone.grid_size(*x.shape[-2:])
            target = teacher(x).float()
            with local_attention(backbone, grid):
                local = backbone.dense(x).float()
            with tiled_positions():
                tiled = backbone.dense(x).float()
            single, distance = attention_distance(backbone, x)  # the single pass, with its attention range
            feats = dict(single=single.float(), local=local, tiled=tiled, teacher=target)
            lab = token_labels(label, grid, backbone.patch_size).to(backbone.device)
            keep = lab != 255
            length += target[0][keep].norm(dim=-1).mean().item() / len(samples)
            for k, f in feats.items():
                offsets[k] = offsets[k] + (f[0][keep] - target[0][keep]).mean(0) / len(samples)
                pred = cosine(f[0], text).argmax(-1)
                rows[k]["correct"] += int((pred[keep] == lab[keep]).sum())
                rows[k]["tokens"] += int(keep.sum())
            rows["single"]["distance"] += distance / len(samples)
    for k, row in rows.items():
        row["offset"] = float(offsets[k].norm())
        row["cosine"] = F.cosine_similarity(offsets[k][None], text.embeddings, dim=-1).tolist()
        row["accuracy"] = 100 * row.pop("correct") / max(1, row.pop("tokens"))
    return dict(rows=rows, token_length=length)


def print_table(title: str, result: dict, names: list[str]):
    print(f"\n{title}   (mean token length |F_T| = {result['token_length']:.2f})")
    print(f"{'variant':<34} {'|offset|':>8} {'most along':>20} {'token acc':>9}")
    labels = dict(single="single pass (E3)", local="single pass, 9x9-token attention", tiled="single pass, tiled "
                  "positions", teacher="teacher (E1-E2, pre-trained)")  # fmt: skip
    for k, row in result["rows"].items():
        c = int(np.argmax(row["cosine"]))
        along = f"{names[c]} ({row['cosine'][c]:+.2f})" if row["offset"] > 1e-6 else "-"
        print(f"{labels[k]:<34} {row['offset']:8.2f} {along:>20} {row['accuracy']:9.1f}")
    print(f"mean attention distance of the single pass: {result['rows']['single']['distance']:.1f} tokens")


def diagnose(out: Path, count: int = 8, device: str = "cpu") -> dict:
    """The table for the pre-trained model and for the student of the run in `out` (miniature.py's results)."""
    res = read_json(out / "results.json")
    if not isinstance(res, dict) or "pretrained_weights" not in res:
        raise cli.UserError(f"'{out}' holds no finished miniature run; run `python miniature.py --out {out}` first.")
    size = res["config"]["eval"]["large_size"]
    samples = dataset_samples("miniature", out / "world" / size)[:count]
    classes = [[c] for c in ("background", "red", "green", "blue", "yellow")]
    report, pre = {}, None
    for name, ckpt in (("pre-trained", None), ("SPAR student", res.get("student_checkpoint"))):
        if name != "pre-trained" and not ckpt:
            continue
        bb = student.load_backbone("tiny", pretrained=res["pretrained_weights"], checkpoint=ckpt, device=device)
        text = text_embeddings(bb, classes, read_templates(), cache_dir=None)
        report[name] = measure(bb, samples, text, res["config"]["eval"]["stride"], reference=pre)
        print_table(f"{name}, {len(samples)} scenes of {size}", report[name], text.names)
        pre = pre or bb  # the student's offset is against the teacher it was distilled from
    return report
