"""Backbones, position-embedding resize (E3) and the dense heads, checked against independent formulations."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from cli import PRECISIONS, autocast
from student import BackboneError, OpenCLIPBackbone, SigLIPBackbone, load_backbone, load_checkpoint, resize_pos_embed
from tests.reference import bicubic_resize, bicubic_resize_by_scale, openclip_authors_dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def clip_b16():
    return load_backbone("clip-b16", pretrained=None)


@pytest.fixture(scope="module")
def siglip2_b16():
    return load_backbone("siglip2-b16", pretrained=None)


# ---------------------------------------------------------------- (E3) position embeddings


def test_pos_embed_resize_is_an_exact_identity_at_the_native_grid():
    pos = torch.randn(1, 8 * 8, 16)
    out = resize_pos_embed(pos, (8, 8), (8, 8))
    assert torch.equal(out, pos)
    # ... and bicubic at scale 1 is numerically the identity too, so the shortcut changes nothing
    grid = pos.reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(same, grid, atol=1e-6)


@pytest.mark.a3
@pytest.mark.parametrize("new_hw", [(5, 7), (16, 32), (13, 4), (8, 20)])
def test_pos_embed_resize_matches_a_handwritten_bicubic(new_hw):
    g = (8, 8)
    pos = torch.randn(g[0] * g[1], 6, generator=torch.Generator().manual_seed(0))
    ours = resize_pos_embed(pos, g, new_hw).numpy()
    ref = bicubic_resize(pos.reshape(*g, 6).double().numpy(), *new_hw).reshape(-1, 6)
    case = f"resize_pos_embed(mode='size') of a {g} grid to {new_hw}"
    assert ours.shape == (new_hw[0] * new_hw[1], 6), (
        f"{case}: expected shape {(new_hw[0] * new_hw[1], 6)}, got {ours.shape}"
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5, err_msg=f"{case} vs a handwritten bicubic (A = -0.75)")


@pytest.mark.a3
def test_pos_embed_resize_keeps_layout_and_dtype():
    pos = torch.randn(1, 16, 4, dtype=torch.float64)
    out = resize_pos_embed(pos, (4, 4), (6, 3))
    assert out.shape == (1, 18, 4) and out.dtype == torch.float64


@pytest.mark.a3
@pytest.mark.parametrize("new_hw", [(28, 42), (20, 31), (1, 3), (14, 15), (13, 14)])
def test_authors_pos_embed_resize_matches_a_handwritten_bicubic_by_scale(new_hw):
    # OpenCLIP (the authors' DINO-style wrapper): scale_factor (n + 0.1) / g, so the sampling positions follow
    # the scale, not in/out.  Checked against a loop that maps coordinates that way.
    g = (14, 14)
    pos = torch.randn(g[0] * g[1], 5, generator=torch.Generator().manual_seed(1))
    ours = resize_pos_embed(pos, g, new_hw, mode="scale+0.1").numpy()
    scale = ((new_hw[0] + 0.1) / g[0], (new_hw[1] + 0.1) / g[1])
    ref = bicubic_resize_by_scale(pos.reshape(*g, 5).double().numpy(), *scale)
    assert ref.shape[:2] == new_hw
    case = (
        f"resize_pos_embed(mode='scale+0.1') of a {g} grid to {new_hw} "
        f"(scale_factor ({new_hw[0]} + 0.1) / {g[0]}, ({new_hw[1]} + 0.1) / {g[1]})"
    )
    assert ours.shape == (new_hw[0] * new_hw[1], 5), (
        f"{case}: expected shape {(new_hw[0] * new_hw[1], 5)}, got {ours.shape}"
    )
    np.testing.assert_allclose(
        ours,
        ref.reshape(-1, 5),
        rtol=1e-4,
        atol=1e-5,
        err_msg=f"{case} vs a handwritten bicubic that maps coordinates by the scale",
    )


@pytest.mark.a3
def test_authors_pos_embed_resize_is_an_identity_at_the_native_grid():
    # The authors' wrapper (DINO's `interpolate_pos_encoding`) returns the table unchanged when the grid is the
    # native 14 x 14, so clip-b16 at 224 x 224 is the unmodified open_clip model; every other grid is resized.
    pos = torch.randn(14 * 14, 8, generator=torch.Generator().manual_seed(2))
    out = resize_pos_embed(pos, (14, 14), (14, 14), mode="scale+0.1")
    assert torch.equal(out, pos), "resize_pos_embed(mode='scale+0.1') at the native 14 x 14 grid must not resample"
    near = resize_pos_embed(pos, (14, 14), (14, 15), mode="scale+0.1")
    assert near.shape == (14 * 15, 8) and not torch.allclose(near[:14], pos[:14], atol=1e-3)
    with pytest.raises(ValueError, match="unknown position-embedding resize mode"):
        resize_pos_embed(pos, (14, 14), (7, 7), mode="nearest")


# ---------------------------------------------------------------- shapes and grid rules for every backbone


@pytest.mark.parametrize(
    "fixture,dim,window,rule",
    [("tiny", 128, 128, "ceil"), ("clip_b16", 512, 224, "floor"), ("siglip2_b16", 768, 512, "ceil")],
)
@pytest.mark.parametrize("H,W", [(64, 96), (100, 150), (33, 17)])
def test_dense_shapes_follow_the_grid_rule(request, fixture, dim, window, rule, H, W):
    bb = request.getfixturevalue(fixture)
    assert bb.dim == dim and bb.window == window and bb.patch_size == 16 and bb.grid_rule == rule
    with torch.inference_mode():
        out = bb.dense(bb.normalize(torch.rand(2, 3, H, W)))
    expected = (-(-H // 16), -(-W // 16)) if rule == "ceil" else (H // 16, W // 16)
    assert bb.grid_size(H, W) == expected
    assert out.shape == (2, *expected, dim)
    assert torch.isfinite(out).all()


def test_fit_to_grid_pads_or_crops_bottom_right(tiny, clip_b16):
    x = torch.rand(1, 3, 40, 50)
    padded, cropped = tiny.fit_to_grid(x), clip_b16.fit_to_grid(x)
    assert padded.shape[-2:] == (48, 64) and torch.equal(padded[..., :40, :50], x)
    assert padded[..., 40:, :].abs().sum() == 0 and padded[..., :, 50:].abs().sum() == 0
    assert cropped.shape[-2:] == (32, 48) and torch.equal(cropped, x[..., :32, :48])
    # a side shorter than one patch keeps one patch (zero-padded) instead of an empty grid
    assert clip_b16.grid_size(10, 40) == (1, 2) and clip_b16.fit_to_grid(x[..., :10, :40]).shape[-2:] == (16, 32)
    assert tiny.fit_to_grid(torch.rand(1, 3, 32, 48)).shape[-2:] == (32, 48)


def test_openclip_does_not_see_the_last_partial_patch_rows_and_columns(clip_b16):
    x = clip_b16.normalize(torch.rand(1, 3, 72, 90))  # floor grid 4 x 5 = 64 x 80 px
    y = x.clone()
    y[..., 64:, :] = 3.0
    y[..., :, 80:] = -3.0
    with torch.inference_mode():
        assert torch.equal(clip_b16.dense(x), clip_b16.dense(y))


def test_normalize_uses_the_backbone_statistics(tiny, clip_b16):
    x = torch.full((1, 3, 2, 2), 0.5)
    assert torch.allclose(tiny.normalize(x), torch.zeros_like(x))  # SigLIP: mean = std = 0.5
    expected = (0.5 - torch.tensor(clip_b16.mean)) / torch.tensor(clip_b16.std)
    assert torch.allclose(clip_b16.normalize(x)[0, :, 0, 0], expected)


# ---------------------------------------------------------------- dense heads vs the unmodified modules


def test_siglip_trunk_at_native_size_equals_timm_forward_features(tiny):
    x = tiny.normalize(torch.rand(2, 3, 128, 128))
    with torch.inference_mode():
        ours, hw = tiny.tokens(x)
        ref = tiny.trunk.forward_features(x)
    assert hw == (8, 8)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("fixture", ["tiny", "siglip2_b16"])
def test_siglip_dense_head_is_attention_pooling_of_each_token_alone(request, fixture):
    # Attention over a single key is the identity on its value, so running the UNMODIFIED attention-pool head on
    # each token as a sequence of length 1 is an independent way to compute the value-path head.
    bb = request.getfixturevalue(fixture)
    K = bb.window
    x = bb.normalize(torch.rand(1, 3, K // 2, K // 2 + 16))
    with torch.inference_mode():
        dense = bb.dense(x)
        tokens, (h, w) = bb.tokens(x)
        ref = bb.trunk.attn_pool(tokens.reshape(-1, 1, tokens.shape[-1]))  # (h*w, C)
    assert torch.allclose(dense.reshape(-1, dense.shape[-1]), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("H,W", [(224, 224), (239, 230), (448, 672), (333, 500), (224, 240)])
def test_openclip_dense_equals_the_authors_formula(clip_b16, H, W):
    # Independent formulation (tests/reference.py): floor crop, DINO-style +0.1 position resize (none when the
    # crop is the native 14 x 14 grid: 224 x 224 and 239 x 230 use the unmodified table), and MaskCLIP's value
    # path as the UNMODIFIED last block with a diagonal attention mask (each token attends only to itself).
    x = clip_b16.normalize(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(H)))
    with torch.inference_mode():
        ours = clip_b16.dense(x)
        ref = openclip_authors_dense(clip_b16.visual, x)
    assert ours.shape == (1, H // 16, W // 16, 512)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()


def test_openclip_keeps_the_cls_position_embedding(clip_b16):
    # At a non-native size only the patch part of the position embedding is resized; changing the CLS entry
    # must change the output, changing nothing must not.
    x = clip_b16.normalize(torch.rand(1, 3, 160, 96))
    with torch.inference_mode():
        a = clip_b16.dense(x)
        pos = clip_b16.visual.positional_embedding
        saved = pos[0].clone()
        pos.data[0] += 1.0
        b = clip_b16.dense(x)
        pos.data[0] = saved
        c = clip_b16.dense(x)
    assert not torch.allclose(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("fixture", ["tiny", "clip_b16"])
def test_dense_does_not_break_the_models_own_encode_image(request, fixture):
    bb = request.getfixturevalue(fixture)
    K = bb.window
    x = bb.normalize(torch.rand(1, 3, K, K))
    with torch.inference_mode():
        before = bb.model.encode_image(x)
        bb.dense(bb.normalize(torch.rand(1, 3, K + 32, K - 16)))
        after = bb.model.encode_image(x)
    assert torch.equal(before, after)


def test_padding_is_bottom_right_zeros(tiny):
    # A 100 x 100 image and the same image zero-padded to 112 x 112 give the same features.
    x = tiny.normalize(torch.rand(1, 3, 100, 100))
    padded = torch.nn.functional.pad(x, (0, 12, 0, 12))
    with torch.inference_mode():
        assert torch.equal(tiny.dense(x), tiny.dense(padded))


def test_blocks_and_image_tower(tiny, clip_b16):
    assert isinstance(tiny, SigLIPBackbone) and isinstance(clip_b16, OpenCLIPBackbone)
    assert len(tiny.blocks) == 4 and len(clip_b16.blocks) == 12
    tower = {id(p) for p in tiny.image_tower().parameters()}
    assert all(id(p) in tower for p in tiny.blocks.parameters())
    assert not any(p.requires_grad for p in tiny.parameters())  # frozen by default


def test_autocast_precisions():
    for precision in PRECISIONS:  # CPU: always fp32, whatever is asked
        with autocast("cpu", precision):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert not torch.is_autocast_enabled("cpu")
    with pytest.warns(UserWarning):  # no GPU here: torch disables it, with a warning
        assert autocast("cuda", "fp16").fast_dtype == torch.float16
        assert autocast("cuda", "bf16").fast_dtype == torch.bfloat16
    assert not isinstance(autocast("cuda", "fp32"), torch.autocast)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        autocast("cpu", "half")


# ---------------------------------------------------------------- tiny: seeded, text works offline


def test_tiny_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone("tiny")
    after = torch.rand(1)
    b = load_backbone("tiny")
    assert torch.equal(after, expected_next)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("name, fixture", [("clip-b16", "clip_b16"), ("siglip2-b16", "siglip2_b16")])
def test_random_weights_are_the_same_in_every_run_and_leave_the_global_rng_alone(request, name, fixture):
    """--pretrained none is reproducible: a second build (here after other draws) has every weight equal."""
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = load_backbone(name, pretrained=None)
    assert torch.equal(torch.rand(1), expected_next)
    first = request.getfixturevalue(fixture).model.state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.model.state_dict().items())


def test_random_weights_reseed_only_the_cpu_generator(monkeypatch):
    """`torch.manual_seed` would also reseed every GPU generator of the caller (e.g. distill.py's --seed)."""
    monkeypatch.setattr(torch, "manual_seed", lambda *a: pytest.fail("reseeds every device's generator"))
    assert load_backbone("tiny").random_weights


def test_encode_text_offline(tiny, clip_b16):
    for bb in (tiny, clip_b16):
        with torch.inference_mode():
            t = bb.encode_text(["a photo of a cat.", "a photo of a dog.", "road"])
        assert t.shape == (3, bb.dim) and torch.isfinite(t).all()
        assert not torch.allclose(t[0], t[1])


# ---------------------------------------------------------------- errors and checkpoints


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="unknown backbone 'vit-huge'.*siglip2-b16, clip-b16, tiny"):
        load_backbone("vit-huge")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("clip-b16", pretrained=str(tmp_path / "nope.pt"))


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.nothing": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match="does not match"):
        load_backbone("tiny", pretrained=str(path))


@pytest.mark.parametrize("backbone", ["clip-b16", "siglip2-b16"])
def test_no_network_cli_prints_one_sentence_and_exits_nonzero(tmp_path, backbone):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run(
        [sys.executable, "student.py", "--backbone", backbone],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot download") and "internet" in lines[0]
    assert "Traceback" not in proc.stderr


def test_checkpoint_round_trip_and_mismatch(tmp_path, tiny, clip_b16):
    student = load_backbone("tiny")
    with torch.no_grad():
        student.blocks[-1].mlp.fc2.bias.add_(0.5)
    path = tmp_path / "student.pt"
    torch.save(
        {
            "format": "spar-student",
            "backbone": "tiny",
            "settings": {"stride": 24},
            "image_tower": student.image_tower().state_dict(),
        },
        path,
    )
    restored = load_backbone("tiny", checkpoint=str(path))
    x = tiny.normalize(torch.rand(1, 3, 64, 80))
    with torch.inference_mode():
        assert torch.equal(restored.dense(x), student.dense(x))
        assert not torch.allclose(restored.dense(x), tiny.dense(x))
    assert load_checkpoint(load_backbone("tiny"), str(path)) == {"stride": 24}
    with pytest.raises(BackboneError, match="distilled from backbone 'tiny'.*--backbone tiny"):
        load_checkpoint(clip_b16, str(path))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="corrupt"):
        load_backbone("tiny", checkpoint=str(bad))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(BackboneError, match="not a SPAR student checkpoint"):
        load_backbone("tiny", checkpoint=str(other))


def test_student_cli_prints_shapes():
    proc = subprocess.run(
        [sys.executable, "student.py", "--backbone", "tiny", "--sizes", "64x96"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(1, 4, 6, 128)" in proc.stdout


# ---------------------------------------------------------------- the authors' released checkpoints (issue 12)


def save_authors_pth(state: dict, path) -> str:
    """Fabricate the authors' released .pth: their wrapper's state dict, the open_clip keys prefixed 'model.'."""
    torch.save({"model." + k: v for k, v in state.items()}, path)
    return str(path)


def save_authors_ckpt(state: dict, path) -> str:
    """Fabricate the authors' Lightning .ckpt: 'segmentor.net.model.' keys plus training state that is ignored."""
    torch.save(
        {
            "state_dict": {"segmentor.net.model." + k: v for k, v in state.items()},
            "epoch": 9,
            "global_step": 123,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5}]}],
        },
        path,
    )
    return str(path)


def _save_authors_formats(state: dict, folder) -> tuple[str, str]:
    return save_authors_pth(state, folder / "spar.pth"), save_authors_ckpt(state, folder / "spar.ckpt")


@pytest.mark.parametrize("fixture", ["clip_b16", "siglip2_b16"])
def test_authors_checkpoints_load_exactly(request, tmp_path, fixture):
    # fp16 (as released weights often are), and the .ckpt holds the negated weights: every load must change the
    # model, so a load that did nothing cannot pass.  The fixture keeps the loaded (still random) weights.
    bb = request.getfixturevalue(fixture)
    state = bb.model.state_dict()
    half = {k: v.half() for k, v in state.items()}
    negated = {k: -v for k, v in half.items()}
    files = (save_authors_pth(half, tmp_path / "spar.pth"), save_authors_ckpt(negated, tmp_path / "spar.ckpt"))
    for path, saved in zip(files, (half, negated)):
        assert load_checkpoint(bb, path) == {}
        got = bb.model.state_dict()
        assert list(got) == list(saved) and len(got) > 300  # image AND text tower
        for k, v in saved.items():
            assert torch.equal(got[k], v.float()), k


def test_authors_checkpoint_for_another_architecture_is_refused_in_one_sentence(tmp_path, clip_b16, siglip2_b16):
    pth, ckpt = _save_authors_formats({k: v.half() for k, v in clip_b16.model.state_dict().items()}, tmp_path)
    before = siglip2_b16.model.visual.trunk.pos_embed.clone()
    for path, name in ((pth, r"authors' released \.pth"), (ckpt, r"authors' Lightning \.ckpt")):
        with pytest.raises(BackboneError) as err:
            load_checkpoint(siglip2_b16, path)
        msg = str(err.value)
        assert re.search(name + r".*does not fit siglip2-b16.*missing keys \(.*unexpected keys \(", msg), msg
        assert "it looks like a clip-b16 file, pass --backbone clip-b16" in msg and "\n" not in msg
    assert torch.equal(siglip2_b16.model.visual.trunk.pos_embed, before)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(pth, "rb").read(1 << 20))
    with pytest.raises(BackboneError, match=r"cannot read checkpoint .*truncated") as err:
        load_checkpoint(clip_b16, str(truncated))
    assert "\n" not in str(err.value)


def test_authors_checkpoint_is_strict_and_never_loaded_partially(tmp_path, tiny):
    good = {k: v + 1 for k, v in tiny.model.state_dict().items()}
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    broken = dict(good)
    del broken["visual.trunk.blocks.0.norm1.weight"]
    broken["visual.trunk.pos_embed"] = torch.zeros(1, 65, 128)
    pth = save_authors_pth(broken, tmp_path / "broken.pth")
    with pytest.raises(
        BackboneError,
        match=r"1 missing keys \(visual.trunk.blocks.0.norm1.weight\); 1 with another "
        r"shape \(file vs model: visual.trunk.pos_embed \(1, 65, 128\) vs",
    ):
        load_checkpoint(tiny, pth)
    # a key of the wrapper that is not the model's is unexpected; a Lightning module's other entries are ignored
    ckpt = tmp_path / "extra.ckpt"
    extra = {"segmentor.net.model." + k: v for k, v in good.items()}
    torch.save({"state_dict": {**extra, "teacher.model.x": torch.zeros(1)}}, ckpt)
    assert load_checkpoint(load_backbone("tiny"), str(ckpt)) == {}
    torch.save({"state_dict": {**extra, "segmentor.net.head.w": torch.zeros(1)}}, ckpt)
    with pytest.raises(BackboneError, match=r"Lightning \.ckpt.*1 unexpected keys \(segmentor.net.head.w\)"):
        load_checkpoint(tiny, str(ckpt))
    torch.save({k: v for k, v in good.items()}, ckpt)
    with pytest.raises(BackboneError, match=r"plain state dict without the authors' 'model\.' prefix.*--pretrained"):
        load_checkpoint(tiny, str(ckpt))
    for k, v in tiny.model.state_dict().items():  # nothing of the refused files was assigned
        assert torch.equal(v, before[k]), k
    # and through load_backbone, like every CLI's --checkpoint
    restored = load_backbone("tiny", pretrained=None, checkpoint=save_authors_ckpt(good, tmp_path / "good.ckpt"))
    assert all(torch.equal(restored.model.state_dict()[k], v) for k, v in good.items())


def test_tiny_weights_file_round_trip(tmp_path):
    # the miniature experiment saves tiny's whole state dict and loads it with --pretrained PATH
    weights = {k: v * 2 for k, v in load_backbone("tiny").model.state_dict().items()}
    torch.save(weights, tmp_path / "tiny.pt")
    loaded = load_backbone("tiny", pretrained=str(tmp_path / "tiny.pt")).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
