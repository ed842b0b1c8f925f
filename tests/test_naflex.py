"""The SigLIP2 NaFlex B/16 single-pass baseline (`siglip2-naflex-b16`): the patch-budget grid (aspect ratio kept),
dense shapes at two aspect ratios and budgets, SigLIP2's value-path head unchanged, the teacher refused, and
--naflex-patches."""

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import evaluate  # noqa: E402
from checkpoints import BackboneError  # noqa: E402
from cli import patch_budget  # noqa: E402
from naflex import naflex_grid  # noqa: E402
from student import NaFlexBackbone, SigLIPBackbone, load_backbone  # noqa: E402
from teacher import Teacher, TeacherError  # noqa: E402


@pytest.fixture(scope="module")
def naflex():
    return load_backbone("siglip2-naflex-b16", pretrained=None)


@pytest.mark.parametrize("hw", [(480, 640), (300, 1200), (1024, 2048), (37, 29), (2000, 100)])
@pytest.mark.parametrize("budget", [64, 256, 1024])
def test_grid_fits_the_budget_keeps_the_aspect_and_is_the_largest(hw, budget):
    H, W = hw
    h, w = naflex_grid(H, W, budget)
    assert 1 <= h * w <= budget
    if h > 1 and w > 1:  # the aspect ratio kept up to the ceil of each side: h-1 < H s/p <= h, w-1 < W s/p <= w
        assert (h - 1) / w <= H / W <= h / (w - 1)
    assert h * w > budget / 4  # the largest scale that fits, not a small one


def test_budget_all_is_the_ceil_grid():
    assert naflex_grid(37, 50, None) == (3, 4)
    assert naflex_grid(480, 640, None) == (30, 40)


@pytest.mark.parametrize("hw", [(240, 320), (200, 800)])
@pytest.mark.parametrize("budget", [64, 256])
def test_dense_shapes_at_two_aspect_ratios_and_budgets(naflex, hw, budget):
    naflex.max_patches = budget
    try:
        with torch.inference_mode():
            feats = naflex.dense(naflex.normalize(torch.rand(1, 3, *hw)))
        h, w = naflex_grid(*hw, budget)
        assert feats.shape == (1, h, w, 768) and naflex.grid_size(*hw) == (h, w)
        assert h * w <= budget and (h < w) == (hw[0] < hw[1])
    finally:
        naflex.max_patches = 256


def test_dense_head_is_siglip2_value_path_on_the_resized_image(naflex):
    assert isinstance(naflex, NaFlexBackbone) and isinstance(naflex, SigLIPBackbone) and naflex.slides is False
    x = naflex.normalize(torch.rand(1, 3, 200, 300))
    h, w = naflex.grid_size(200, 300)
    with torch.inference_mode():
        resized = F.interpolate(x, size=(16 * h, 16 * w), mode="bilinear", align_corners=False, antialias=True)
        tokens = naflex.trunk.forward_features(resized)
        ref = SigLIPBackbone.head(naflex, tokens).unflatten(1, (h, w))
        assert torch.equal(naflex.dense(x), ref)
        assert not torch.allclose(ref, tokens.unflatten(1, (h, w)), atol=1e-3)  # the head does change the tokens


def test_position_grid_is_resized_per_image(naflex):
    """The learned 16 x 16 grid is resized bilinearly to each h x w (timm's NaFlexEmbeds): two budgets, two grids."""
    embeds = naflex.trunk.embeds
    assert tuple(embeds.pos_embed.shape[1:3]) == (16, 16)
    with torch.inference_mode():
        a = naflex.dense(naflex.normalize(torch.rand(1, 3, 256, 256)))
    assert a.shape[1:3] == (16, 16)  # budget 256 at a square image: the native grid


def test_teacher_is_refused_in_one_sentence(naflex):
    with pytest.raises(TeacherError) as info:
        Teacher(naflex, stride=24)
    assert "single" in str(info.value) and "\n" not in str(info.value)


def test_naflex_patches_flag():
    assert patch_budget("all") is None and patch_budget("ALL") is None and patch_budget("1024") == 1024
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            patch_budget(bad)
    flags = ["--dataset", "miniature", "--backbone", "siglip2-naflex-b16"]
    assert evaluate.build_parser().parse_args([*flags, "--naflex-patches", "all"]).naflex_patches is None
    assert evaluate.build_parser().parse_args(flags).naflex_patches == 256


def test_default_weights_refused_in_one_sentence():
    with pytest.raises(BackboneError) as info:
        load_backbone("siglip2-naflex-b16", pretrained="default")
    assert "--pretrained" in str(info.value) and "\n" not in str(info.value)


def test_the_patch_budget_is_part_of_the_results_settings(tmp_path):
    """A results file of one budget must not be resumed with another: the budget is in its settings record."""
    from results import run_settings

    (tmp_path / "images").mkdir()

    def settings(backbone, *extra):
        args = evaluate.build_parser().parse_args(
            ["--dataset", "miniature", "--root", str(tmp_path), "--backbone", backbone, *extra]
        )
        return run_settings(args, 1, ["a photo of a {}."], {})

    assert settings("siglip2-naflex-b16")["naflex_patches"] == 256
    assert settings("siglip2-naflex-b16", "--naflex-patches", "1024")["naflex_patches"] == 1024
    assert settings("siglip2-naflex-b16", "--naflex-patches", "all")["naflex_patches"] is None
    assert "naflex_patches" not in settings("tiny")  # other backbones' records (and their resume) are unchanged
    from results import out_path

    def name(*extra):
        return out_path(evaluate.build_parser().parse_args(["--dataset", "voc21", *extra])).name

    naflex = ["--backbone", "siglip2-naflex-b16"]
    assert name(*naflex) == "voc21-siglip2-naflex-b16.json"  # the reference budget: the file it always had
    assert name(*naflex, "--naflex-patches", "64") == "voc21-siglip2-naflex-b16-p64.json"  # not overwriting it
    assert name(*naflex, "--naflex-patches", "all") == "voc21-siglip2-naflex-b16-pall.json"
    assert name("--backbone", "tiny", "--naflex-patches", "64") == "voc21-tiny.json"


# --------------------------------------------------------------------------------------------------------------
# Offline text: with random weights, SigLIP2's Gemma tokenizer (a hub download) has a stand-in, CLIP's BPE
# --------------------------------------------------------------------------------------------------------------


def test_random_weights_tokenize_offline_at_the_model_context_length(naflex):
    tokens = naflex.tokenizer(["a photo of a cat.", "a photo of a dog."])
    assert tokens.shape == (2, naflex.model.context_length) == (2, 64)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 49408 <= naflex.model.text.vocab_size
    with torch.inference_mode():
        emb = naflex.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert emb.shape == (2, 768) and torch.isfinite(emb).all() and not torch.allclose(emb[0], emb[1])


def test_the_stand_in_only_replaces_a_tokenizer_that_needs_a_download(monkeypatch):
    """Real weights keep their own tokenizer; backbones whose tokenizer ships with open_clip keep it too."""
    import open_clip

    from checkpoints import BACKBONES, tokenizer_factory

    asked = []
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kw: asked.append((name, kw)) or name)
    siglip, clip = BACKBONES["siglip2-b16"], BACKBONES["clip-b16"]
    assert tokenizer_factory(siglip)() == siglip.tokenizer_name and siglip.tokenizer_name.startswith("hf-hub:")
    assert tokenizer_factory(siglip, True, 64)() == "ViT-B-16" and asked[-1] == ("ViT-B-16", {"context_length": 64})
    assert tokenizer_factory(clip, True, 77)() == clip.tokenizer_name and asked[-1] == (clip.tokenizer_name, {})


def test_the_stand_in_tokenizer_has_its_own_text_cache_key(naflex, monkeypatch):
    """Embeddings made with the stand-in are never served for the real tokenizer's ids, nor the other way round."""
    import textcache
    from checkpoints import BACKBONES, tokenizer_factory

    stand_in = textcache._cache_key(naflex, ["cat"], ["{}"])
    monkeypatch.setattr(naflex, "_tokenizer", tokenizer_factory(BACKBONES["siglip2-naflex-b16"]))  # not loaded
    assert textcache._cache_key(naflex, ["cat"], ["{}"]) != stand_in


def test_real_weights_without_the_tokenizer_fail_in_one_sentence(monkeypatch):
    import open_clip

    from checkpoints import BACKBONES, tokenizer_factory

    def offline(name, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(BackboneError) as info:
        tokenizer_factory(BACKBONES["siglip2-naflex-b16"])()
    assert "\n" not in str(info.value) and "--pretrained none" in str(info.value) and "hub" in str(info.value)


def test_segment_and_evaluate_run_offline_on_random_weights(tmp_path, capsys, monkeypatch):
    """The acceptance commands, in process: segment.py (its --naflex-patches too) and evaluate.py on a
    --make-synthetic set, text included."""
    import segment

    grids, real = [], NaFlexBackbone.tokens
    monkeypatch.setattr(NaFlexBackbone, "tokens", lambda self, x: grids.append(real(self, x)[1]) or real(self, x))

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    flags = ["--backbone", "siglip2-naflex-b16", "--pretrained", "none", "--templates", str(templates)]
    flags += ["--text-cache", "none"]
    image = os.path.join(os.path.dirname(__file__), "..", "assets", "astronaut.jpg")
    segment.main(
        [image, "--classes", "person, sky", "--out", str(tmp_path / "seg.png"), "--naflex-patches", "64", *flags]
    )
    assert grids == [(8, 8)]  # the 512 x 512 photo: the largest square grid within 64 patches
    evaluate.main(["--dataset", "voc21", "--make-synthetic", str(tmp_path / "voc"), "--num-synthetic", "1"])
    evaluate.main(
        [
            "--dataset",
            "voc21",
            "--root",
            str(tmp_path / "voc"),
            "--modes",
            "single",
            *flags,
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert (tmp_path / "seg.png").is_file() and "note: random weights" in out
    single = [line.split() for line in out.splitlines() if line.startswith("single ")]
    assert len(single) == 1 and 0 <= float(single[0][1]) <= 100 and single[0][3] == "1"
    assert len(grids) > 1 and 64 < max(h * w for h, w in grids[1:]) <= 256  # evaluate.py: the default budget


def test_a_segment_folder_records_only_a_budget_other_than_the_reference():
    """Folders segmented at the reference budget (256) before --naflex-patches existed still resume."""
    import argparse

    import outputs
    from segment import SegmentSettings

    def record(budget):
        args = argparse.Namespace(backbone="siglip2-naflex-b16", pretrained="none", naflex_patches=budget)
        return outputs.folder_record(args, SegmentSettings(), None, [["a"]], ["{}"])

    assert "naflex_patches" not in record(256) and record(64)["naflex_patches"] == 64
    assert record(None)["naflex_patches"] is None  # 'all'


def test_a_budget_given_to_another_backbone_is_said_once(capsys):
    import cli

    cli._noted.clear()
    for _ in range(2):
        evaluate.build_parser().parse_args(["--dataset", "voc21", "--backbone", "tiny", "--naflex-patches", "64"])
    evaluate.build_parser().parse_args(
        ["--dataset", "voc21", "--backbone", "siglip2-naflex-b16", "--naflex-patches", "64"]
    )
    evaluate.build_parser().parse_args(["--dataset", "voc21", "--backbone", "tiny"])  # the default: nothing to say
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --naflex-patches applies to siglip2-naflex-b16 only; tiny ignores it."]
    import figures

    cli._noted.clear()  # figures.py fig3's --naflex-patches is the NaFlex line's budget, whatever --backbone is
    figures.build_parser().parse_args(["fig3", "--backbone", "tiny", "--naflex-patches", "64"])
    assert capsys.readouterr().err == ""
