"""Tests for refine.py, the wiring of LPOSS / LPOSS+ / AnyUp into segment.py and evaluate.py: segment()'s refined
logits equal the methods applied by hand (and a direct dense solve of LPOSS's linear system), the DINO affinity
model loads from a file in timm's layout, the CLIs take the flags (one error line and exit 2 for bad input), and
evaluate.py records them so that a run with another --refine does not resume stale results."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
import evaluate  # noqa: E402
import lposs  # noqa: E402
import refine  # noqa: E402
import segment  # noqa: E402
from cli import UserError  # noqa: E402
from segment import SegmentSettings  # noqa: E402
from student import load_backbone  # noqa: E402
from tests.test_anyup import fabricated_file  # noqa: E402

CLASSES = [["cat"], ["dog", "puppy"], ["sky"]]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", None)


@pytest.fixture(scope="module")
def text(tiny):
    return segment.text_embeddings(tiny, CLASSES, ["a photo of a {}."], cache_dir=False)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 56, 72, generator=g) * 0.3
    img[:, 0, 10:40, 5:40] += 0.6  # a red box: colour edges for LPOSS+
    return img.clamp(0, 1)


def by_hand(tiny, text, image, s):
    """segment()'s steps before the refinement: the run-size image, its features, the cosine logits."""
    hw = segment.run_size(*image.shape[-2:], s, tiny.patch_size)
    rgb = segment.resize_image(image, hw, antialias=s.protocol == "aligned")
    feats = segment.dense_features(tiny, tiny.normalize(rgb), s)
    return rgb, feats, segment.query_logits(feats, text)


def finish(logits, text, s):
    """segment()'s steps after it: scale, max over synonyms -> (B, K, H, W) logits."""
    return segment.max_over_synonyms(s.logit_scale * logits, text)


def dino_file(tmp_path, dim=64, depth=2):
    """A DINO ViT state dict in timm's (= facebookresearch/dino's) key layout, small, random."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    model = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=dim, depth=depth, num_heads=1, num_classes=0, dynamic_img_size=True
    )
    path = tmp_path / "dino_fabricated.pth"
    torch.save(model.state_dict(), path)
    return str(path), model.eval()


# --------------------------------------------------------------------------------------------------------------
# segment(): each option equals the method applied by hand
# --------------------------------------------------------------------------------------------------------------


def test_lposs_labels_are_the_argmax_of_a_direct_solve(tiny, text, image):
    s = SegmentSettings(refine="lposs", protocol="aligned")
    seg = segment.segment(tiny, image, text, s, return_logits=True)
    _, feats, cos = by_hand(tiny, text, image, s)
    B, Q, h, w = cos.shape
    W = lposs.patch_graph(feats[0].reshape(h * w, -1).double(), (h, w), tiny.patch_size)
    d = lposs.inv_sqrt_degree(W.sum(1))
    A = torch.eye(h * w, dtype=torch.float64) - 0.95 * d[:, None] * W * d[None, :]
    Z = torch.linalg.solve(A, cos[0].reshape(Q, h * w).T.double()).T.reshape(1, Q, h, w).float()  # (L6) directly
    expected = finish(segment.upsample_logits(Z, tiny.patch_size, (56, 72), protocol="aligned"), text, s)
    assert torch.allclose(seg.logits, expected, atol=1e-3 * expected.abs().max())
    assert torch.equal(seg.labels, expected.argmax(dim=1))
    plain = segment.segment(tiny, image, text, SegmentSettings(protocol="aligned"), return_logits=True)
    assert not torch.allclose(plain.logits, seg.logits, atol=1e-2)


def test_lposs_k_is_the_graphs_neighbour_count(tiny, text, image, monkeypatch):
    """--lposs-k reaches (L2): k = 3 keeps 3 neighbours per patch; 400 (the reference) keeps all 20 of this grid."""
    seen, real = [], refine.lposs
    monkeypatch.setattr(refine, "lposs", lambda *a, **kw: seen.append(kw["k"]) or real(*a, **kw))
    few = segment.segment(tiny, image, text, SegmentSettings(refine="lposs", lposs_k=3), return_logits=True)
    ref = segment.segment(tiny, image, text, SegmentSettings(refine="lposs"), return_logits=True)
    _, feats, _ = by_hand(tiny, text, image, SegmentSettings(refine="lposs"))
    h, w = feats.shape[1:3]
    W = lposs.patch_graph(feats[0].reshape(h * w, -1), (h, w), tiny.patch_size, k=3)
    assert seen == [3, 400] and h * w < 400 and not torch.allclose(few.logits, ref.logits, atol=1e-3)
    assert int((W > 0).sum(1).max()) < h * w - 1  # a sparse graph: not every patch is a neighbour


def test_lposs_plus_is_the_pixel_pass_on_the_lposs_result(tiny, text, image):
    s = SegmentSettings(refine="lposs+")
    seg = segment.segment(tiny, image, text, s, return_logits=True)
    rgb, feats, cos = by_hand(tiny, text, image, s)
    Z = segment.upsample_logits(lposs.lposs(cos, feats, patch=tiny.patch_size), tiny.patch_size, (56, 72))
    expected = finish(lposs.lposs_plus(Z, rgb), text, s)
    assert torch.allclose(seg.logits, expected, atol=1e-4 * expected.abs().max())
    assert torch.equal(seg.labels, expected.argmax(dim=1))
    lp = segment.segment(tiny, image, text, SegmentSettings(refine="lposs"), return_logits=True)
    assert not torch.allclose(lp.logits, seg.logits, atol=1e-2)


def test_lposs_plus_runs_at_the_run_size_then_resizes(tiny, text, image):
    s = SegmentSettings(refine="lposs+", short_side=32)
    seg = segment.segment(tiny, image, text, s, return_logits=True)
    rgb, feats, cos = by_hand(tiny, text, image, s)
    assert rgb.shape[-2:] == (32, 41) and seg.logits.shape[-2:] == (56, 72)
    Z = segment.upsample_logits(lposs.lposs(cos, feats, patch=tiny.patch_size), tiny.patch_size, (32, 41))
    P = F.interpolate(lposs.lposs_plus(Z, rgb), size=(56, 72), mode="bilinear", align_corners=False)
    assert torch.allclose(seg.logits, finish(P, text, s), atol=1e-3)


def test_anyup_logits_are_the_cosine_of_the_upsampled_features(tiny, text, image, tmp_path):
    path, _ = fabricated_file(tmp_path)
    s = SegmentSettings(upsample="anyup", anyup_weights=path)
    seg = segment.segment(tiny, image, text, s, return_logits=True, out_hw=(40, 50))
    rgb, feats, _ = by_hand(tiny, text, image, s)
    model = refine.load_anyup(path)
    with torch.inference_mode():
        up = model(refine.imagenet_normalize(rgb), feats.permute(0, 3, 1, 2), (40, 50))  # (B, C, 40, 50) features
    expected = finish(segment.query_logits(up.permute(0, 2, 3, 1), text), text, s)
    assert seg.logits.shape == (1, 3, 40, 50)
    assert torch.allclose(seg.logits, expected, atol=1e-3)
    plain = segment.segment(tiny, image, text, SegmentSettings(), return_logits=True, out_hw=(40, 50))
    assert not torch.allclose(plain.logits, seg.logits, atol=1e-2)


def test_dino_affinity_is_the_last_blocks_value_vectors(tiny, text, image, tmp_path):
    path, ref = dino_file(tmp_path)
    model = refine.load_dino(path)
    rgb = image[..., :50, :70]  # padded to 64 x 80: a 4 x 5 grid
    with torch.inference_mode():
        v = refine.dino_values(model, rgb)
    x = refine.imagenet_normalize(F.pad(rgb, (0, 10, 0, 14)))
    with torch.no_grad():  # by hand: tokens before the last block, its norm1, the v third of its qkv
        t = ref.blocks[:-1](ref.norm_pre(ref._pos_embed(ref.patch_embed(x))))
        want = ref.blocks[-1].attn.qkv(ref.blocks[-1].norm1(t))[:, 1:, 128:].reshape(1, 4, 5, 64)
    assert v.shape == (1, 4, 5, 64) and torch.allclose(v, want, atol=1e-5)
    s = SegmentSettings(refine="lposs", affinity=path)
    seg = segment.segment(tiny, image, text, s, return_logits=True)
    rgb, feats, cos = by_hand(tiny, text, image, s)
    with torch.inference_mode():
        Z = lposs.lposs(cos, refine.dino_values(model, rgb), patch=tiny.patch_size)
    assert torch.allclose(seg.logits, finish(segment.upsample_logits(Z, 16, (56, 72)), text, s), atol=1e-3)
    own = segment.segment(tiny, image, text, SegmentSettings(refine="lposs"), return_logits=True)
    assert not torch.allclose(own.logits, seg.logits, atol=1e-2)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(upsample="anyup"), ["--anyup-weights PATH", "wimmerth/anyup"]),
        (dict(upsample="anyup", anyup_weights="/no/such.pth"), ["does not exist"]),
        (dict(refine="lposs", upsample="anyup", anyup_weights="x"), ["choose one"]),
        (dict(refine="lposs+", mode="slidelogit"), ["slidelogit"]),
        (dict(refine="lposs", affinity="/no/dino.pth"), ["neither 'self' nor a file"]),
        (dict(refine="lpos"), ["unknown refine"]),
        (dict(refine="lposs", lposs_k=0), ["--lposs-k", "at least 1"]),
    ],
)
def test_bad_settings_are_one_sentence(kw, words):
    with pytest.raises(UserError) as exc:
        SegmentSettings(**kw)
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".") and all(w in msg for w in words), msg


def test_wrong_dino_file_names_what_does_not_fit(tmp_path):
    path, ref = dino_file(tmp_path)
    state = ref.state_dict()
    state.pop("norm.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="missing.*norm.weight"):
        SegmentSettings(refine="lposs", affinity=str(tmp_path / "broken.pth"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a DINO ViT state dict"):
        SegmentSettings(refine="lposs", affinity=str(tmp_path / "other.pth"))


# --------------------------------------------------------------------------------------------------------------
# segment.py CLI
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_args(tmp_path):
    img = tmp_path / "img.png"
    arr = np.full((48, 64, 3), 40, dtype=np.uint8)
    arr[8:40, 4:30] = (220, 40, 40)
    Image.fromarray(arr).save(img)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    base = ["--backbone", "tiny", "--classes", "cat; dog, puppy; sky", "--templates", str(templates)]
    return [str(img), *base, "--text-cache", "none", "--short-side", "0"]


def cli_mask(args, out):
    segment.main(args + ["--out", str(out)])
    with Image.open(out) as mask:
        return np.asarray(mask).copy()


@pytest.mark.parametrize("option", [["--refine", "lposs"], ["--refine", "lposs+"], ["--upsample", "anyup"]])
def test_cli_options_give_the_apis_labels(tiny, cli_args, tmp_path, option):
    if option[1] == "anyup":
        option = option + ["--anyup-weights", fabricated_file(tmp_path)[0]]
    mask = cli_mask(cli_args + option, tmp_path / "a.png")
    settings = dict(zip([o.lstrip("-").replace("-", "_") for o in option[::2]], option[1::2]))
    image = torch.from_numpy(np.array(Image.open(cli_args[0]))).permute(2, 0, 1)[None].float() / 255
    text = segment.text_embeddings(tiny, segment.parse_classes("cat; dog, puppy; sky"), ["a photo of a {}."], False)
    s = SegmentSettings(protocol="aligned", short_side=0, long_side=2048, **settings)
    assert np.array_equal(mask, segment.segment(tiny, image, text, s).labels[0].numpy())
    logits = segment.segment(tiny, image, text, s, return_logits=True).logits
    plain = segment.segment(tiny, image, text, SegmentSettings(protocol="aligned"), return_logits=True).logits
    assert not torch.allclose(logits, plain, atol=1e-2)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--upsample", "anyup"], "--anyup-weights PATH"),
        (["--upsample", "anyup", "--anyup-weights", "{tmp}/none.pth"], "does not exist"),
        (["--upsample", "anyup", "--anyup-weights", "{tmp}/garbage.pth"], "garbage.pth"),
        (["--upsample", "anyup", "--anyup-weights", "{tmp}/partial.pth"], "missing"),
        (["--refine", "lposs", "--affinity", "{tmp}/garbage.pth"], "garbage.pth"),
        (["--refine", "lposs", "--upsample", "anyup", "--anyup-weights", "{tmp}/partial.pth"], "choose one"),
        (["--refine", "lposs", "--mode", "slidelogit"], "slidelogit"),
        (["--refine", "lposs", "--lposs-k", "0"], "--lposs-k must be at least 1"),
    ],
)
def test_cli_bad_input_is_one_error_line_before_any_work(cli_args, tmp_path, capsys, monkeypatch, extra, words):
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    fabricated_file(tmp_path, "partial.pth", edit=lambda s: s.pop("rope.freqs"))
    monkeypatch.setattr(segment, "load_backbone", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    with pytest.raises(SystemExit) as exc:
        segment.main(cli_args + [e.format(tmp=tmp_path) for e in extra] + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_folder_record_names_the_post_processing_only_when_asked(tmp_path):
    import argparse

    import outputs

    args = argparse.Namespace(backbone="tiny", pretrained=None)
    plain = outputs.folder_record(args, SegmentSettings(), None, [["a"]], ["{}"])["settings"]
    assert "refine" not in plain and "upsample" not in plain and plain["mode"] == "single"  # as before refine.py
    refined = outputs.folder_record(args, SegmentSettings(refine="lposs"), None, [["a"]], ["{}"])["settings"]
    assert refined == plain | {"refine": "lposs"}  # a folder segmented without it is not "done" with it
    few = outputs.folder_record(args, SegmentSettings(refine="lposs", lposs_k=30), None, [["a"]], ["{}"])
    assert few["settings"] == plain | {"refine": "lposs", "lposs_k": 30}
    import figures

    image, args = str(ROOT / "assets" / "astronaut.jpg"), argparse.Namespace(backbone="tiny", pretrained="none")
    args.device = "cpu"
    fig5 = [figures.fig5_key(args, image, SegmentSettings(lposs_k=k), None, "t")["settings"] for k in (400, 30)]
    assert "lposs_k" not in fig5[0] and fig5[1]["lposs_k"] == 30  # fig5 panels cached before --lposs-k still match
    evaluate_args = argparse.Namespace(refine="lposs", affinity="self", lposs_k=30)
    assert refine.run_record(evaluate_args) == {"refine": "lposs", "affinity": "self", "lposs_k": 30}
    assert "lposs_k" not in refine.run_record(argparse.Namespace(refine="lposs", affinity="self", lposs_k=400))


# --------------------------------------------------------------------------------------------------------------
# evaluate.py: the flags, recorded in the results' settings
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_args(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=2)
    fast = ["--backbone", "tiny", "--short-side", "48", "--long-side", "96", "--templates", str(templates)]
    return ["--dataset", "voc20", "--root", str(data), "--text-cache", str(tmp_path / "cache")] + fast


def test_evaluate_another_refine_does_not_resume_stale_results(eval_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "res.json"
    evaluate.main(eval_args + ["--out", str(out)])
    plain = json.loads(out.read_text())
    assert "refine" not in plain["settings"]  # the defaults: results files from before still resume
    calls = []
    real = evaluate.segment
    monkeypatch.setattr(evaluate, "segment", lambda *a, **k: calls.append(a[3].refine) or real(*a, **k))
    evaluate.main(eval_args + ["--out", str(out), "--refine", "lposs"])
    assert "other settings; starting over" in capsys.readouterr().out
    assert calls == ["lposs", "lposs"]  # the flag reached segment(), for every image
    refined = json.loads(out.read_text())
    assert refined["settings"]["refine"] == "lposs" and refined["settings"]["affinity"] == "self"
    assert refined["modes"]["single"]["images_done"] == 2
    evaluate.main(eval_args + ["--out", str(out), "--refine", "lposs"])  # the same settings: resumed, not rerun
    assert "resuming" in capsys.readouterr().out and len(calls) == 2


def test_evaluate_anyup_records_its_weights_and_its_own_file(eval_args, tmp_path, capsys, monkeypatch):
    from results import out_path

    monkeypatch.chdir(tmp_path)
    path, _ = fabricated_file(tmp_path)
    out = tmp_path / "anyup.json"
    evaluate.main(eval_args + ["--upsample", "anyup", "--anyup-weights", path, "--out", str(out)])
    settings = json.loads(out.read_text())["settings"]
    assert settings["upsample"] == "anyup" and settings["anyup_weights"] == path and len(settings["anyup_sha1"]) == 40
    args = evaluate.build_parser().parse_args(eval_args + ["--refine", "lposs+"])
    assert out_path(args).name == "voc20-tiny-lposs+.json"
    args = evaluate.build_parser().parse_args(eval_args + ["--refine", "lposs", "--lposs-k", "30"])
    assert out_path(args).name == "voc20-tiny-lposs-k30.json"  # the reference k's results are not overwritten
    bad = [(["--upsample", "anyup"], "--anyup-weights PATH")]
    bad += [(["--modes", "single,slidelogit24", "--refine", "lposs"], "slidelogitN")]
    for extra, words in bad:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            evaluate.main(eval_args + extra + ["--out", str(tmp_path / "b.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "b.json").exists()  # refused before any work


def test_evaluate_miniature_student_with_lposs(tmp_path, capsys):
    """The lead's command: the toy world, `tiny` weights from a file, a student checkpoint, --refine lposs."""
    from checkpoints import save_student

    data = tmp_path / "world"
    evaluate.main(["--dataset", "miniature", "--make-synthetic", str(data), "--num-synthetic", "2"])
    base = load_backbone("tiny", None)
    torch.save(base.model.state_dict(), tmp_path / "W.pt")
    with torch.no_grad():
        for p in base.image_tower().parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_student(str(tmp_path / "STUDENT.pt"), base, {})
    common = ["--dataset", "miniature", "--root", str(data), "--backbone", "tiny", "--pretrained"]
    common += [str(tmp_path / "W.pt"), "--modes", "single", "--checkpoint", str(tmp_path / "STUDENT.pt")]
    for refine_opt in ("none", "lposs"):
        evaluate.main(common + ["--refine", refine_opt, "--out", str(tmp_path / f"{refine_opt}.json")])
    runs = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in ("none", "lposs")}
    assert all(r["modes"]["single"]["images_done"] == 2 for r in runs.values())
    assert runs["none"]["modes"]["single"]["confusion"] != runs["lposs"]["modes"]["single"]["confusion"]
    assert "refine lposs" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# reproduce.py: the LPOSS + SPAR and SPAR + AnyUp rows beside the paper's means
# --------------------------------------------------------------------------------------------------------------


def test_reproduce_post_processed_rows(tmp_path, capsys):
    import reproduce
    from tests.test_reproduce import _row

    benchmarks.make_synthetic("cityscapes", tmp_path / "cs", num_images=2)
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    state = load_backbone("tiny").model.state_dict()
    torch.save({"model." + k: v + 0.01 for k, v in state.items()}, tmp_path / "siglip2.pth")  # the authors' format
    anyup_path, _ = fabricated_file(tmp_path)
    out = tmp_path / "out"
    args = ["--cityscapes", str(tmp_path / "cs"), "--smoke-backbone", "tiny", "--backbones", "siglip2-b16"]
    args += ["--siglip2-ckpt", str(tmp_path / "siglip2.pth"), "--pretrained", "none", "--short-side", "64"]
    args += ["--templates", str(tmp_path / "t.txt"), "--text-cache", str(tmp_path / "text"), "--out", str(out)]
    args += ["--lposs", "lposs+", "--anyup-weights", anyup_path]
    assert reproduce.main(args) == 0
    table = (out / "table1.md").read_text()
    for model, file, paper in (("LPOSS + SPAR", "lposs", 46.7), ("SPAR + AnyUp", "anyup", 46.8)):
        result = json.loads((out / "siglip2-b16" / f"cityscapes-spar-{file}.json").read_text())
        ours = 100 * result["modes"]["single"]["miou"]
        assert _row(table, "SigLIP2 ViT-B/16", model, "ours (ours − paper)")[2] == f"{ours:.1f}"  # CS: no paper cell
        assert _row(table, "SigLIP2 ViT-B/16", model, "paper")[-1] == f"{paper:.1f}"
    settings = json.loads((out / "siglip2-b16" / "cityscapes-spar-lposs.json").read_text())["settings"]
    assert settings["refine"] == "lposs+" and settings["checkpoint"]
    spar = json.loads((out / "siglip2-b16" / "cityscapes-spar.json").read_text())["settings"]
    assert "refine" not in spar and "upsample" not in spar
    capsys.readouterr()
    assert reproduce.main(args) == 0  # resumable: nothing is evaluated again
    stdout = capsys.readouterr().out
    assert "done already: CS with siglip2-b16, LPOSS + SPAR" in stdout and "== " not in stdout
