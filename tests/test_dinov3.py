"""DINOv3.txt (`dinov3-l16`, and `dinov3-tiny` on the same code path): the resize grid rule, the last-layer patch
tokens, the dino.txt text tower and its second half, the released checkpoint layout, `Teacher` and `segment` on it,
and the --train vocabulary on its blocks."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dinotxt  # noqa: E402
import runfolder  # noqa: E402
import segment  # noqa: E402
from checkpoints import BackboneError, load_checkpoint, save_student  # noqa: E402
from segment import SegmentSettings  # noqa: E402
from student import DINOv3Backbone, load_backbone  # noqa: E402
from teacher import Teacher  # noqa: E402


@pytest.fixture(scope="module")
def dino():
    return load_backbone("dinov3-tiny", pretrained=None)


def released_layout(model: dinotxt.DinoTxt, prefix: str = "model.") -> dict:
    """`model` written the way the released files hold it: Meta's DINOv3 names for the backbone (storage_tokens,
    ls1.gamma, one qkv.bias with a zero k part, the rope periods, the mask token, the k-bias mask), a dino.txt vision
    head (ignored on loading), the text model and the logit scale, all under `prefix`."""
    out = {}
    for k, v in model.visual.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias"):
            v_bias = model.visual.state_dict()[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones_like(v), torch.zeros_like(v), v])
        elif not k.endswith("attn.v_bias"):
            out[k] = v
    out["mask_token"] = torch.zeros(1, model.visual.embed_dim)
    out["rope_embed.periods"] = torch.arange(1.0, 5.0)
    state = {f"visual_model.backbone.{k}": v for k, v in out.items()}
    state["visual_model.head.blocks.0.norm1.weight"] = torch.ones(7)  # an unrelated shape: it must be ignored
    state.update({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")})
    return {prefix + k: v.clone() for k, v in state.items()}


def perturbed_model(seed: int = 1) -> dinotxt.DinoTxt:
    """A dinov3-tiny model whose weights differ from the seeded default one (every tensor, including the biases)."""
    model = load_backbone("dinov3-tiny", pretrained=None).model
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------------------------------------------
# The grid rule and the dense features
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, grid", [((37, 50), (3, 4)), ((16, 16), (1, 1)), ((100, 33), (7, 3)), ((5, 64), (1, 4))])
def test_resize_rule_on_odd_sizes(dino, hw, grid):
    x = torch.rand(1, 3, *hw)
    assert dino.grid_size(*hw) == grid
    fitted = dino.fit_to_grid(x)
    assert fitted.shape[-2:] == (grid[0] * 16, grid[1] * 16)
    # resized (bicubic) up to the ceil grid, not padded: equal to the interpolation, no zero rows at the bottom
    ref = F.interpolate(x, size=fitted.shape[-2:], mode="bicubic", align_corners=False)
    assert torch.equal(fitted, ref)
    assert fitted[..., -1, :].abs().sum() > 0
    with torch.inference_mode():
        feats = dino.dense(dino.normalize(x))
    assert feats.shape == (1, *grid, dino.dim)


def test_multiple_of_the_patch_is_not_resized(dino):
    x = torch.rand(1, 3, 48, 80)
    assert dino.fit_to_grid(x) is x


def test_dense_features_are_the_last_layer_patch_tokens_after_the_final_norm(dino):
    x = dino.normalize(torch.rand(2, 3, 40, 56))
    trunk = dino.model.visual
    assert trunk.num_prefix_tokens == 5  # CLS + 4 registers, dropped
    with torch.inference_mode():
        feats = dino.dense(x)
        fitted = F.interpolate(x, size=(48, 64), mode="bicubic", align_corners=False)
        ref = trunk.forward_intermediates(fitted, indices=1, norm=True, intermediates_only=True)
    assert feats.shape == (2, 3, 4, 64)
    assert torch.allclose(
        feats, ref[0].permute(0, 2, 3, 1), atol=1e-5
    )  # timm's own last-layer patch-token map, final norm applied


def test_dinov3_tiny_is_seeded_and_the_dinotxt_model(dino):
    again = load_backbone("dinov3-tiny", pretrained=None)
    assert isinstance(dino, DINOv3Backbone) and isinstance(dino.model, dinotxt.DinoTxt)
    for (k, a), (_, b) in zip(dino.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert len(dino.blocks) == 2 and dino.window == 64 and dino.mean == (0.485, 0.456, 0.406)


# ---------------------------------------------------------------------------------------------------------------
# The text tower
# ---------------------------------------------------------------------------------------------------------------


def test_text_embedding_is_the_second_half(dino):
    tokens = dino.tokenizer(["a photo of a cat", "road"])
    assert tokens.shape == (2, 77)
    with torch.inference_mode():
        full = dino.model.text_model(tokens)
        half = dino.encode_text(["a photo of a cat", "road"])
    assert full.shape == (2, 128) and half.shape == (2, dino.dim) == (2, 64)
    assert torch.equal(half, full[:, 64:])
    assert not torch.allclose(half, full[:, :64])


def test_text_tower_pools_the_end_of_text_token_and_is_causal(dino):
    tower = dino.model.text_model
    tokens = dino.tokenizer(["a cat"])
    eot = int(tokens.argmax())
    assert int(tokens[0, eot]) == 49407  # CLIP BPE's <|endoftext|>, the largest id
    changed = tokens.clone()
    changed[0, eot + 1 :] = 5  # tokens AFTER the end-of-text token: invisible to a causal tower
    with torch.inference_mode():
        assert torch.allclose(tower(tokens), tower(changed), atol=1e-6)
        x = tower.backbone(tokens)[0, eot]
        assert torch.allclose(tower(tokens)[0], tower.head.linear_projection(x), atol=1e-6)


def test_text_tower_equals_open_clips_causal_text_transformer(dino):
    """An independent reference: open_clip's CLIP text transformer (causal mask, pre-norm, GELU, pooled at the
    arg-max id, projection without bias) given the same weights -- its fused q/k/v bias set to zero, as dino.txt's
    q/k/v have none -- gives the same embeddings."""
    from open_clip.transformer import TextTransformer as Reference

    ours = dino.model.text_model
    text = ours.backbone
    width, heads, layers = text.ln_final.normalized_shape[0], text.blocks[0].attention.heads, len(text.blocks)
    ref = Reference(context_length=77, width=width, heads=heads, layers=layers, output_dim=ours.embed_dim).eval()
    state = {"token_embedding.weight": text.token_embedding.weight, "positional_embedding": text.positional_embedding}
    state |= {f"ln_final.{k}": v for k, v in text.ln_final.state_dict().items()}
    state["text_projection"] = ours.head.linear_projection.weight.T
    for i, b in enumerate(text.blocks):
        r = f"transformer.resblocks.{i}."
        state |= {r + "attn.in_proj_weight": b.attention.qkv.weight, r + "attn.in_proj_bias": torch.zeros(3 * width)}
        state |= {r + f"attn.out_proj.{k}": v for k, v in b.attention.proj.state_dict().items()}
        for mine, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            state |= {r + f"{theirs}.{k}": v for k, v in getattr(b, mine).state_dict().items()}
        for mine, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
            state |= {r + f"mlp.{theirs}.{k}": v for k, v in getattr(b.feed_forward, mine).state_dict().items()}
    ref.load_state_dict(state, strict=True)
    tokens = dino.tokenizer(["a photo of a cat", "road", "the sky above the port was the colour of television"])
    with torch.inference_mode():
        assert torch.allclose(ours(tokens), ref(tokens), atol=1e-5, rtol=1e-4)


def test_text_parameter_names_are_the_released_ones(dino):
    names = set(dino.model.text_model.state_dict())
    for name in (
        "backbone.token_embedding.weight",
        "backbone.positional_embedding",
        "backbone.blocks.0.attention_norm.weight",
        "backbone.blocks.0.attention.qkv.weight",
        "backbone.blocks.0.attention.proj.bias",
        "backbone.blocks.1.ffn_norm.bias",
        "backbone.blocks.1.feed_forward.fc1.weight",
        "backbone.blocks.1.feed_forward.fc2.bias",
        "backbone.ln_final.weight",
        "head.linear_projection.weight",
    ):
        assert name in names, name
    assert "backbone.blocks.0.attention.qkv.bias" not in names  # no q/k/v bias in the text tower
    assert "head.linear_projection.bias" not in names


# ---------------------------------------------------------------------------------------------------------------
# The released checkpoint layout
# ---------------------------------------------------------------------------------------------------------------


def test_released_layout_loads_strictly_and_reproduces_the_features(tmp_path):
    source = perturbed_model()
    path = tmp_path / "spar_dinov3txt.pth"
    torch.save(released_layout(source), path)
    bb = load_backbone("dinov3-tiny", pretrained=None)
    assert load_checkpoint(bb, str(path)) == {}
    for k, v in source.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k
    x = bb.normalize(torch.rand(1, 3, 50, 70))
    with torch.inference_mode():
        ref = DINOv3Backbone(source, bb_spec(), 64).dense(x)
        assert torch.equal(bb.dense(x), ref)
        assert torch.equal(bb.encode_text(["sky"]), DINOv3Backbone(source, bb_spec(), 64).encode_text(["sky"]))


def bb_spec():
    from checkpoints import BACKBONES

    return BACKBONES["dinov3-tiny"]


def test_released_layout_as_pretrained_one_file_or_meta_two_files(tmp_path):
    source = perturbed_model(2)
    one = tmp_path / "dinotxt_full.pth"
    torch.save(released_layout(source, prefix=""), one)
    bb = load_backbone("dinov3-tiny", pretrained=str(one))
    state = released_layout(source, prefix="")
    backbone_file, text_file = tmp_path / "dinov3_vitl16_pretrain.pth", tmp_path / "dinotxt_head_and_text.pth"
    vision = "visual_model.backbone."
    torch.save({k[len(vision) :]: v for k, v in state.items() if k.startswith(vision)}, backbone_file)
    torch.save({k: v for k, v in state.items() if not k.startswith("visual_model.backbone.")}, text_file)
    two = load_backbone("dinov3-tiny", pretrained=f"{backbone_file},{text_file}")
    for k, v in source.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k
        assert torch.equal(two.model.state_dict()[k], v), k


def test_released_state_splits_the_qkv_bias_and_drops_the_k_part():
    source = perturbed_model(3)
    state = dinotxt.released_state(released_layout(source), source)
    q = source.visual.state_dict()["blocks.1.attn.q_bias"]
    assert torch.equal(state["visual.blocks.1.attn.q_bias"], q)
    assert not any(
        k.startswith("visual_model.") or "mask_token" in k or "periods" in k or "storage" in k for k in state
    )


def refusal(bb, path) -> str:
    with pytest.raises(BackboneError) as info:
        load_checkpoint(bb, str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_wrong_files_are_refused_in_one_sentence(tmp_path, dino):
    state = released_layout(perturbed_model(4))
    missing = dict(state)
    missing.pop("model.text_model.backbone.ln_final.weight")
    torch.save(missing, tmp_path / "missing.pth")
    assert "1 missing keys (text_model.backbone.ln_final.weight)" in refusal(dino, tmp_path / "missing.pth")
    wrong = dict(state)
    wrong["model.text_model.head.linear_projection.weight"] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "shape.pth")
    assert "another shape" in refusal(dino, tmp_path / "shape.pth")
    tiny = load_backbone("tiny", pretrained=None)
    torch.save(state, tmp_path / "ok.pth")
    assert "pass --backbone dinov3-l16" in refusal(tiny, tmp_path / "ok.pth")
    save_student(tmp_path / "tiny_student.pt", tiny, {})
    assert "pass --backbone tiny" in refusal(dino, tmp_path / "tiny_student.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert "not a torch file" in refusal(dino, tmp_path / "junk.pth")


def test_our_student_checkpoint_round_trips(tmp_path, dino):
    source = DINOv3Backbone(perturbed_model(5), bb_spec(), 64)
    save_student(tmp_path / "student.pt", source, {"train": "blk_-1"})
    bb = load_backbone("dinov3-tiny", pretrained=None, checkpoint=str(tmp_path / "student.pt"))
    x = bb.normalize(torch.rand(1, 3, 32, 48))
    with torch.inference_mode():
        assert torch.equal(bb.dense(x), source.dense(x))


def test_pretrained_refusals_are_one_sentence(tmp_path):
    for pretrained, part in (("default", "--pretrained none"), (str(tmp_path / "absent.pth"), "does not exist")):
        with pytest.raises(BackboneError) as info:
            load_backbone("dinov3-tiny", pretrained=pretrained)
        assert part in str(info.value) and "\n" not in str(info.value)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="not in the dino.txt layout"):
        load_backbone("dinov3-tiny", pretrained=str(tmp_path / "other.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Teacher, segment, distillation's --train vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_teacher_on_dinov3_shares_the_student_grid(dino):
    x = dino.normalize(torch.rand(1, 3, 70, 90))
    teacher = Teacher(dino, stride=32)
    out = teacher(x)
    assert out.shape == (1, 5, 6, 64)  # the ceil grid of 70 x 90, as the single pass
    square = dino.normalize(torch.rand(1, 3, 64, 64))  # one K x K window, r = 1: the teacher IS the single pass
    with torch.inference_mode():
        assert torch.allclose(Teacher(dino, stride=32)(square), dino.dense(square), atol=1e-5)


def test_segment_runs_on_dinov3_single_and_slide(dino, tmp_path):
    text = segment.text_embeddings(dino, [["sky"], ["road"], ["tree"]], ["a photo of a {}."], cache_dir=tmp_path)
    assert text.embeddings.shape == (3, 64)
    image = torch.rand(1, 3, 75, 101)
    for mode in ("single", "slide", "slidelogit"):
        seg = segment.segment(dino, image, text, SegmentSettings(mode, 32, logit_scale=10.0), return_logits=True)
        assert seg.labels.shape == (1, 75, 101) and seg.logits.shape[-2:] == (75, 101)
        assert int(seg.labels.max()) < 3


def test_train_vocabulary_on_dinov3_blocks(dino):
    blk = dino.blocks[-1]
    qkv = runfolder.train_parameters(dino, ["qkv_-1"])
    assert {id(p) for p in qkv} == {id(blk.attn.qkv.weight), id(blk.attn.q_bias), id(blk.attn.v_bias)}
    assert {id(p) for p in runfolder.train_parameters(dino, ["mlp_0"])} == {
        id(p) for p in dino.blocks[0].mlp.parameters()
    }
    assert len(runfolder.train_parameters(dino, ["patchembed"])) == 2
    with pytest.raises(runfolder.DistillError, match="RoPE"):
        runfolder.train_parameters(dino, ["posembed"])


# ---------------------------------------------------------------------------------------------------------------
# The full architecture (random weights: shapes only; ~1 GB of parameters, built once, on CPU)
# ---------------------------------------------------------------------------------------------------------------


def test_full_dinov3_l16_architecture():
    bb = load_backbone("dinov3-l16", pretrained=None)
    vis, text = bb.model.visual, bb.model.text_model
    assert (len(vis.blocks), vis.embed_dim, vis.blocks[0].attn.num_heads, vis.num_prefix_tokens) == (24, 1024, 16, 5)
    assert vis.blocks[0].mlp.fc1.out_features == 4096 and vis.blocks[0].attn.q_bias is not None
    assert 300e6 < sum(p.numel() for p in vis.parameters()) < 306e6  # ViT-L/16: ~303M
    tb = text.backbone
    assert (len(tb.blocks), tb.token_embedding.weight.shape, tb.positional_embedding.shape) == (
        24,
        (49408, 1280),
        (77, 1280),
    )
    assert tb.blocks[0].attention.heads == 20 and text.head.linear_projection.weight.shape == (2048, 1280)
    assert (bb.window, bb.dim, bb.grid_rule) == (384, 1024, "resize")
    with torch.inference_mode():
        assert bb.dense(bb.normalize(torch.rand(1, 3, 20, 40))).shape == (1, 2, 3, 1024)
        assert bb.encode_text(["a photo of a dog"]).shape == (1, 1024)
