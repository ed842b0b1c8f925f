"""diagnose.py: the interventions of the miniature's diagnostics, against independent references."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diagnose  # noqa: E402
from benchmarks import dataset_samples, write_world  # noqa: E402
from segment import text_embeddings  # noqa: E402
from student import load_backbone  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_local_attention_bounds_what_a_token_sees():
    bb = load_backbone("tiny", pretrained=None)
    x = torch.rand(1, 3, 128, 256)
    y = x.clone()
    y[..., :16, :16] = torch.rand(1, 3, 16, 16)  # change the top-left patch only
    grid = bb.grid_size(128, 256)  # 8 x 16 tokens
    with torch.inference_mode():
        full = bb.dense(x), bb.dense(y)
        with diagnose.local_attention(bb, grid, radius=1):
            near = bb.dense(x), bb.dense(y)
        with diagnose.local_attention(bb, grid, radius=100):
            wide = bb.dense(x)
    assert torch.equal(wide, full[0]), "a radius beyond the grid is no mask"
    assert not torch.allclose(full[0][0, 7, 15], full[1][0, 7, 15]), "global attention: a far patch matters"
    # 4 blocks of radius 1 reach 4 tokens: the token at (7, 15) cannot see (0, 0); (3, 3) can
    assert torch.equal(near[0][0, 7, 15], near[1][0, 7, 15])
    assert not torch.allclose(near[0][0, 3, 3], near[1][0, 3, 3])
    assert all(not h for b in bb.blocks for h in (b._forward_pre_hooks,)), "hooks removed after the block"


def test_tiled_positions_repeat_the_native_grid():
    pos = torch.randn(1, 8 * 8, 5)
    out = diagnose.tile_pos_embed(pos, (8, 8), (10, 19))
    ref = torch.stack([pos[0, (i % 8) * 8 + (j % 8)] for i in range(10) for j in range(19)])
    assert out.shape == (1, 190, 5) and torch.equal(out[0], ref)
    bb = load_backbone("tiny", pretrained=None)
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        native = bb.dense(x)
        with diagnose.tiled_positions():
            assert torch.equal(bb.dense(x), native), "at the native grid tiling is the identity"
            big = bb.dense(torch.rand(1, 3, 128, 384))
    assert big.shape[1:3] == (8, 24)


def test_measure_at_the_native_size_has_no_offset(tmp_path):
    """At 128^2 the teacher is one window, i.e. the single pass itself: offset 0 and the same accuracy."""
    bb = load_backbone("tiny", pretrained=None)
    samples = dataset_samples("miniature", write_world(tmp_path / "w", 128, 128, 2, seed=3))
    text = text_embeddings(bb, [[c] for c in ("background", "red", "green", "blue", "yellow")], ["{}"], None)
    rows = diagnose.measure(bb, samples, text)["rows"]
    assert rows["single"]["offset"] < 1e-5 and rows["teacher"]["offset"] == 0.0
    assert abs(rows["single"]["accuracy"] - rows["teacher"]["accuracy"]) < 1e-9
    assert 0 < rows["single"]["distance"] < 8 * 2**0.5


def test_token_labels_take_each_patch_centre():
    label = torch.arange(40 * 50).view(40, 50) % 7
    out = diagnose.token_labels(label, (3, 4), 16)
    assert out[1, 2] == label[24, 40] and out[0, 0] == label[8, 8]
    assert (out[2] == 255).all() and (out[:, 3] == 255).all(), "cells beyond the image (padding) are ignored"


def test_the_offset_is_measured_against_the_reference_teacher(tmp_path):
    """A student's offset is against the pre-trained teacher it was distilled from, not its own windows."""
    import copy

    bb = load_backbone("tiny", pretrained=None)
    other = copy.deepcopy(bb)
    with torch.no_grad():
        other.blocks[-1].mlp.fc2.weight.mul_(3.0)
    samples = dataset_samples("miniature", write_world(tmp_path / "w", 128, 128, 1, seed=4))
    text = text_embeddings(bb, [[c] for c in ("background", "red", "green", "blue", "yellow")], ["{}"], None)
    own, ref = diagnose.measure(other, samples, text), diagnose.measure(other, samples, text, reference=bb)
    assert own["rows"]["single"]["offset"] < 1e-5 < ref["rows"]["single"]["offset"]
    assert ref["rows"]["teacher"] == diagnose.measure(bb, samples, text)["rows"]["teacher"] | {"distance": 0.0}
