"""distill.py, the paper's protocol (issue 8, items 6-10): augmentation rules on crafted sizes, the resize without
antialias against a loop-free reference, file order with numeric names, global batch = gradient accumulation,
the --train vocabulary, precision defaults and the target dtype.

Pure functions and one tiny backbone: no distillation run, CPU only.
"""

import math
import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402
import files  # noqa: E402
import runfolder  # noqa: E402
import student  # noqa: E402


class Scripted:
    """An RNG with given draws: uniform -> r, random() -> the next coin, randint -> the low or the high end."""

    def __init__(self, r, coins, end="lo"):
        self.r, self.coins, self.end = r, list(coins), end

    def uniform(self, a, b):
        assert a <= self.r <= b
        return self.r

    def random(self):
        return self.coins.pop(0)  # an extra draw (e.g. a crop coin where there must be none) fails here

    def randint(self, a, b):
        return a if self.end == "lo" else b


FULL, CROP, FLIP, NO_FLIP = 0.1, 0.9, 0.1, 0.9


# ---------------------------------------------------------------------------------------------------------------
# Augmentation (SPEC "Training-image augmentation", steps 1-5)
# ---------------------------------------------------------------------------------------------------------------


def test_step1_rounds_half_up_and_truncates_the_fit():
    # f = 1024 / 2048 = 0.5 exactly: 4093 * 0.5 = 2046.5 -> int(x + 0.5) = 2047 (Python's round() would give 2046)
    rc = distill.make_recipe(Scripted(1.0, [FULL, NO_FLIP]), 4093, 2048, "paper", 1.0, 16)
    assert rc["resize"] == [2047, 1024]
    # r = 0.7: the fit is (int(1433.6), int(716.8)) = (1433, 716), so a 1000 x 1000 image becomes 716, not 717
    rc = distill.make_recipe(Scripted(0.7, [FULL, NO_FLIP]), 1000, 1000, "paper", 1.0, 16)
    assert rc["resize"] == [716, 716]


def test_step2_short_side_below_512_is_upscaled_and_never_cropped():
    # 1000 x 300, r = 0.5 -> 1024 x 307; s = 512 / 307: (int(1707.7), 512) -> floored to 16: 1696 x 512.
    # Only ONE coin is drawn (the flip): a crop-or-full coin here would exhaust the script and fail.
    rc = distill.make_recipe(Scripted(0.5, [FLIP]), 1000, 300, "paper", 1.0, 16)
    assert rc["resize"] == [1024, 307] and rc["crop"] is None
    assert rc["stretch"] == rc["final"] == [1696, 512] and rc["flip"] is True
    # scaled for tiny (--aug-scale 0.25: fit (512r, 256r), min side 128, multiple 16 kept)
    rc = distill.make_recipe(Scripted(0.5, [FLIP]), 250, 75, "paper", 0.25, 16)
    assert rc["resize"] == [256, 77] and rc["stretch"] == [416, 128] and rc["crop"] is None


def test_step3_full_image_is_stretched_to_multiples_of_16():
    rc = distill.make_recipe(Scripted(1.0, [FULL, NO_FLIP]), 4093, 2048, "paper", 1.0, 16)
    assert rc["stretch"] == rc["final"] == [2032, 1024] and rc["crop"] is None  # 2047 -> 2032: resized
    rc = distill.make_recipe(Scripted(0.2, [FULL, NO_FLIP]), 1000, 1000, "extended", 1.0, 16)
    assert rc["resize"] == [512, 512] and rc["final"] == [512, 512]  # extended: int(2560 r) both


@pytest.mark.parametrize("end, crop", [("lo", [0, 0, 544, 512]), ("hi", [5, 0, 1360, 1024])])
def test_step4_crop_bounds(end, crop):
    # 2000 x 1500, r = 1 -> 1365 x 1024.  lo: ch = max(409, 512) = 512, cw = max(546, 512) = 546 -> 544, offset 0.
    # hi: ch = 1024, cw = 1365 -> 1360, offset x = 1365 - 1360 = 5.
    rc = distill.make_recipe(Scripted(1.0, [CROP, NO_FLIP], end), 2000, 1500, "paper", 1.0, 16)
    assert rc["resize"] == [1365, 1024] and rc["stretch"] is None
    assert rc["crop"] == crop and rc["final"] == crop[2:]
    rc = distill.make_recipe(Scripted(1.0, [CROP, NO_FLIP]), 500, 375, "paper", 0.25, 16)  # tiny: min side 128
    assert rc["resize"] == [341, 256] and rc["crop"] == [0, 0, 128, 128]


@pytest.mark.parametrize("mode", ["paper", "extended"])
def test_recipe_rules_hold_on_random_sizes(mode):
    cfg = distill.AUGMENT[mode]
    branches, flips = {"crop": 0, "full": 0, "upscale": 0}, 0
    for i in range(300):
        rng = random.Random(i)
        W, H = rng.randint(300, 4000), rng.randint(300, 3000)
        rc = distill.make_recipe(distill.seeded_rng(7, f"img{i}"), W, H, mode, 1.0, 16)
        assert rc == distill.make_recipe(distill.seeded_rng(7, f"img{i}"), W, H, mode, 1.0, 16)  # replayable
        W1, H1 = rc["resize"]
        fit = (int(cfg["fit"][0] * rc["r"]), int(cfg["fit"][1] * rc["r"]))
        assert max(W1, H1) <= fit[0] + 1 and min(W1, H1) <= fit[1] + 1
        Wf, Hf = rc["final"]
        assert Wf % 16 == 0 and Hf % 16 == 0 and min(Wf, Hf) >= 512
        if min(W1, H1) < 512:
            branches["upscale"] += 1
            assert rc["crop"] is None and min(rc["stretch"]) == 512
        elif rc["crop"]:
            branches["crop"] += 1
            x, y, cw, ch = rc["crop"]
            assert max(2 * W1 // 5, 512) // 16 * 16 <= cw <= W1 and max(2 * H1 // 5, 512) // 16 * 16 <= ch <= H1
            assert 0 <= x <= W1 - cw and 0 <= y <= H1 - ch
        else:
            branches["full"] += 1
            assert rc["stretch"] == [W1 // 16 * 16, H1 // 16 * 16]
        flips += rc["flip"]
    assert 100 < flips < 200  # p = 0.5
    n = branches["crop"] + branches["full"]
    assert n > 60 and 0.3 < branches["crop"] / n < 0.7  # p = 0.5 where the image is large enough


def bilinear_reference(img: np.ndarray, W: int, H: int) -> np.ndarray:
    """Half-pixel bilinear (OpenCV INTER_LINEAR / align_corners=False, no antialias) as interpolation matrices."""

    def matrix(n_in, n_out):
        M = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1, w = min(i0 + 1, n_in - 1), src - i0
            M[i, i0] += 1 - w
            M[i, i1] += w
        return M

    out = np.einsum(
        "yh,hwc,xw->yxc", matrix(img.shape[0], H), img.astype(np.float64), matrix(img.shape[1], W), optimize=True
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_resize_is_bilinear_without_antialias():
    img = np.random.default_rng(0).integers(0, 256, (53, 37, 3)).astype(np.uint8)
    for W, H in [(71, 20), (12, 90), (37, 53)]:  # shrink one side / enlarge the other / same
        ours = distill.resize_bilinear(torch.from_numpy(img).permute(2, 0, 1), [W, H]).permute(1, 2, 0).numpy()
        ref = bilinear_reference(img, W, H)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert ours.shape == (H, W, 3) and diff.max() <= 1 and (diff == 0).mean() > 0.99  # float32 vs float64
    pil = np.asarray(Image.fromarray(img).resize((12, 20), Image.BILINEAR)).astype(int)  # PIL antialiases
    ref = bilinear_reference(img, 12, 20).astype(int)
    assert np.abs(pil - ref).mean() > 5


def test_apply_recipe_replays_resize_stretch_crop_and_flip():
    img = np.random.default_rng(1).integers(0, 256, (90, 120, 3)).astype(np.uint8)
    im = Image.fromarray(img)
    stretched = dict(augment="paper", resize=[100, 75], stretch=[96, 64], crop=None, final=[96, 64], flip=False)
    out = np.asarray(distill.apply_recipe(im, stretched)).astype(int)
    ref = bilinear_reference(bilinear_reference(img, 100, 75), 96, 64).astype(int)
    assert out.shape == (64, 96, 3) and np.abs(out - ref).max() <= 1  # resized to the multiple, not cropped
    cropped = dict(augment="paper", resize=[100, 75], stretch=None, crop=[3, 5, 64, 48], final=[64, 48], flip=True)
    out = np.asarray(distill.apply_recipe(im, cropped)).astype(int)
    ref = bilinear_reference(img, 100, 75)[5:53, 3:67][:, ::-1].astype(int)
    assert out.shape == (48, 64, 3) and np.abs(out - ref).max() <= 1


def test_crop_variant_is_kept_as_an_option():
    rc = distill.make_recipe(distill.seeded_rng(0, "x"), 2000, 1500, "crop", 1.0, 16)
    assert rc["augment"] == "crop" and "upscale" in rc
    out = distill.apply_recipe(Image.new("RGB", (2000, 1500)), rc)
    assert list(out.size) == rc["final"]


# ---------------------------------------------------------------------------------------------------------------
# Order, global batch, --train, precision
# ---------------------------------------------------------------------------------------------------------------


def test_file_order_sorts_numbers_by_value(tmp_path):
    names = ["sa_10.jpg", "sa_2.jpg", "sa_1.jpg", "sa_100.jpg", "b.png", "sa_2b.jpg", "x/sa_3.jpg"]
    for n in names:
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    assert files.list_images(str(tmp_path)) == [
        "b.png",
        "sa_1.jpg",
        "sa_2.jpg",
        "sa_2b.jpg",
        "sa_10.jpg",
        "sa_100.jpg",
        "x/sa_3.jpg",
    ]
    args = SimpleNamespace(images=str(tmp_path), heldout=None, num_heldout=1, max_images=3)
    _, train, _, held = runfolder.split_images(args)
    assert train == ["b.png", "sa_1.jpg", "sa_2.jpg"] and held == ["x/sa_3.jpg"]  # --max-images: the first N
    bundled = SimpleNamespace(images=None, heldout=None, num_heldout=2, max_images=None)
    _, all_four, _, held = runfolder.split_images(bundled)
    assert len(all_four) == 4 and len(held) == 2  # the bundled photos: 4 to train, 2 held out
    _, first_two, _, held_too = runfolder.split_images(SimpleNamespace(**{**vars(bundled), "max_images": 2}))
    assert first_two == all_four[:2] and held_too == held  # --max-images holds for them too


def test_epoch_order_is_file_order_in_global_batches():
    # 5 images, global batch 4, 2 processes: padded to 8 with the first images; step k = images [4k, 4k + 4)
    r0, r1 = (distill.epoch_order(5, 4, 0, 0, False, 2, r) for r in (0, 1))
    assert r0 == [0, 2, 4, 1] and r1 == [1, 3, 0, 2]
    for k in range(2):
        assert sorted(r0[2 * k : 2 * k + 2] + r1[2 * k : 2 * k + 2]) == sorted(([0, 1, 2, 3, 4] * 2)[4 * k : 4 * k + 4])
    assert distill.epoch_order(5, 1, 0, 3, False, 1, 0) == [0, 1, 2, 3, 4]  # every epoch the same order
    shuffled = [distill.epoch_order(50, 1, 0, e, True, 1, 0) for e in (0, 1)]
    assert sorted(shuffled[0]) == list(range(50)) and shuffled[0] != shuffled[1]
    assert shuffled[0] == distill.epoch_order(50, 1, 0, 0, True, 1, 0)  # seeded


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return student.load_backbone("tiny", pretrained=None, device="cpu")


@pytest.mark.a5
def test_batch_of_two_is_the_mean_of_two_single_image_gradients(tiny):
    names = distill.select_trainable(tiny, ["blk_-1", "blk_-2"])
    params = dict(tiny.image_tower().named_parameters())
    trained = [params[n] for n in names]
    g = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8),
            torch.randn(math.ceil(H / 16), math.ceil(W / 16), tiny.dim, generator=g) * 0.05,
        )
        for H, W in ((128, 160), (144, 128))
    ]

    def loss_of(img, target):  # (E4), written out independently
        x = tiny.normalize(img[None].float() / 255.0)
        return ((tiny.dense(x) - target[None]) ** 2).mean()

    singles, losses = [], []
    for img, target in pairs:
        tiny.zero_grad(set_to_none=True)
        loss = loss_of(img, target)
        loss.backward()
        singles.append([p.grad.clone() for p in trained])
        losses.append(loss.item())
    mean_grad = [(a + b) / 2 for a, b in zip(*singles)]
    start = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-4)
    opt.zero_grad(set_to_none=True)
    ((loss_of(*pairs[0]) + loss_of(*pairs[1])) / 2).backward()  # one step on the mean loss
    opt.step()
    expected = [p.detach().clone() for p in trained]

    with torch.no_grad():
        for p, s in zip(trained, start):
            p.copy_(s)
    opt = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    total = distill.train_step(tiny, opt, scaler, pairs, tiny, torch.device("cpu"), "fp32")
    for p, m in zip(trained, mean_grad):
        torch.testing.assert_close(p.grad, m, rtol=1e-5, atol=1e-9)
    for p, e in zip(trained, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-8)
    assert total.item() == pytest.approx(sum(losses), rel=1e-5)  # the summed loss, for the log
    with torch.no_grad():
        for p, s in zip(trained, start):
            p.copy_(s)
    tiny.requires_grad_(False)


def trained_names(backbone, spec):
    chosen = {id(p) for p in distill.train_parameters(backbone, distill.parse_train(spec))}
    return {n for n, p in backbone.image_tower().named_parameters() if id(p) in chosen}


def test_train_vocabulary_on_the_siglip_structure(tiny):
    blocks = len(tiny.blocks)
    assert trained_names(tiny, "qkv_0") == {"trunk.blocks.0.attn.qkv.weight", "trunk.blocks.0.attn.qkv.bias"}
    assert trained_names(tiny, "mlp_-1") == {
        n for n, _ in tiny.image_tower().named_parameters() if n.startswith(f"trunk.blocks.{blocks - 1}.mlp.")
    }
    assert trained_names(tiny, "posembed") == {"trunk.pos_embed"}
    assert trained_names(tiny, "patchembed") == {"trunk.patch_embed.proj.weight", "trunk.patch_embed.proj.bias"}
    assert trained_names(tiny, "attn_pool_kv") == {"trunk.attn_pool.kv.weight", "trunk.attn_pool.kv.bias"}
    default = trained_names(tiny, "blk_-1,blk_-2")
    assert default == {
        n
        for n, _ in tiny.image_tower().named_parameters()
        if n.startswith((f"trunk.blocks.{blocks - 1}.", f"trunk.blocks.{blocks - 2}."))
    }
    assert not any(n.startswith(("trunk.norm.", "trunk.attn_pool.")) for n in default)  # frozen unless named
    assert "trunk.norm.weight" in trained_names(tiny, "all")
    names = distill.select_trainable(tiny, ["attn_pool_kv", "blk_-1"])  # the dense path uses the kv projection
    assert "trunk.attn_pool.kv.weight" in names and not any("attn_pool.q" in n for n in names)
    tiny.requires_grad_(False)
    for bad in ("blk_x", "block_1", "qkv", "", "blk_-1,head"):
        with pytest.raises(distill.DistillError, match="unknown part"):
            distill.parse_train(bad)
    with pytest.raises(distill.DistillError, match="blocks"):
        distill.train_parameters(tiny, ["blk_-9"])


def test_train_vocabulary_on_the_openclip_structure():
    clip = student.load_backbone("clip-b16", pretrained=None, device="cpu")
    assert trained_names(clip, "qkv_-1") == {
        "transformer.resblocks.11.attn.in_proj_weight",
        "transformer.resblocks.11.attn.in_proj_bias",
    }
    assert trained_names(clip, "posembed") == {"positional_embedding"}
    assert trained_names(clip, "patchembed") == {"conv1.weight"}
    assert trained_names(clip, "mlp_0") == {
        n for n, _ in clip.image_tower().named_parameters() if n.startswith("transformer.resblocks.0.mlp.")
    }
    assert not any(n.startswith("ln_post") for n in trained_names(clip, "blk_-1,blk_-2"))
    with pytest.raises(distill.DistillError, match="attn_pool_kv"):
        distill.train_parameters(clip, ["attn_pool_kv"])


def test_train_blocks_is_a_deprecated_alias():
    args = distill.build_parser().parse_args(["--backbone", "tiny", "--train-blocks", "3"])
    assert distill.resolve_args(args).train == "blk_-1,blk_-2,blk_-3"
    args = distill.build_parser().parse_args(["--backbone", "tiny", "--train-blocks", "all"])
    assert distill.resolve_args(args).train == "all"
    args = distill.build_parser().parse_args(["--backbone", "tiny"])
    assert distill.resolve_args(args).train == "blk_-1,blk_-2"


def test_precision_defaults_and_target_dtype(tiny, monkeypatch):
    args = distill.build_parser().parse_args(["--backbone", "tiny", "--device", "cpu"])
    runfolder.setup_device(distill.resolve_args(args))
    assert args.precision == "fp32" and args.target_dtype == "fp16" and args.batch_size == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU machine would choose
    args = distill.build_parser().parse_args(["--backbone", "tiny", "--device", "cuda"])
    args = distill.resolve_args(args)
    args.workers = 0
    runfolder.setup_device(args)
    assert args.precision == "fp16"
    monkeypatch.setenv("WORLD_SIZE", "2")  # global batch 3 on 2 processes
    args = distill.resolve_args(
        distill.build_parser().parse_args(["--backbone", "tiny", "--device", "cpu", "--batch-size", "3"])
    )
    with pytest.raises(distill.DistillError, match="divide"):
        runfolder.setup_device(args)


def test_targets_are_cached_in_fp16_or_fp32(tiny, tmp_path):
    img = torch.randint(0, 256, (3, 128, 176), dtype=torch.uint8)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    teacher = distill.Teacher(tiny, stride=32, precision="fp32")
    item = dict(image="x.png")
    half = distill.compute_target(teacher, tiny, item, str(tmp_path), "cpu", "fp16")
    full = distill.compute_target(teacher, tiny, item, str(tmp_path), "cpu", "fp32")
    assert half.dtype == torch.float16 and full.dtype == torch.float32 and half.shape == full.shape == (8, 11, 128)
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=1e-4)
    a = SimpleNamespace(pretrained=None, stride=32, precision="fp32", target_dtype="fp16")
    b = SimpleNamespace(pretrained=None, stride=32, precision="fp32", target_dtype="fp32")
    assert runfolder.teacher_key(tiny, a) != runfolder.teacher_key(tiny, b)  # a changed dtype recomputes the cache
    assert F.mse_loss(half.float(), full).item() < 1e-8


def test_stage2_targets_are_the_teacher_on_the_stored_png_scaled_by_1_over_255(tiny, tmp_path):
    """The cached target of an image = the Teacher run independently on its stored augmented PNG, read with PIL,
    scaled by 1/255 in fp32 (not the target function compared with itself)."""
    os.makedirs(tmp_path / "augment")
    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 256, (96, 144, 3), dtype=torch.uint8, generator=g).numpy()
    Image.fromarray(img).save(tmp_path / "augment" / "x.png")
    sha1 = files.file_sha1(str(tmp_path / "augment" / "x.png"))
    item = dict(id="x", image="augment/x.png", sha1=sha1, size=[96, 144])
    args = SimpleNamespace(pretrained=None, stride=32, precision="fp32", target_dtype="fp32", device="cpu")
    teacher = distill.Teacher(tiny, stride=32, precision="fp32")
    assert distill.stage_teacher([item], str(tmp_path), tiny, teacher, args) == [item]
    cached = torch.load(runfolder.target_path(str(tmp_path), item), weights_only=True)["target"]
    with Image.open(tmp_path / "augment" / "x.png") as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    x = tiny.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    with torch.inference_mode():
        expected = distill.Teacher(tiny, stride=32, precision="fp32")(x)[0].float()
    assert cached.dtype == torch.float32 and cached.shape == expected.shape == (6, 9, tiny.dim)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)
    direct = distill.compute_target(teacher, tiny, item, str(tmp_path), "cpu", "fp32")
    torch.testing.assert_close(direct, expected, rtol=1e-5, atol=1e-6)


def test_heldout_metrics_are_mse_and_cosine_against_the_stored_target(tiny, tmp_path):
    """distill.evaluate (the held-out table) against the student run independently on the stored PNG / 255 and the
    (E4) MSE and the mean per-patch cosine written out in numpy: the suite otherwise only compares it with itself."""
    os.makedirs(tmp_path / "heldout")
    os.makedirs(tmp_path / "targets")
    g = torch.Generator().manual_seed(9)
    rows, expected = [], {}
    for i, (H, W) in enumerate(((64, 96), (80, 64))):
        img = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(img).save(tmp_path / "heldout" / f"h{i}.png")
        h, w = tiny.grid_size(H, W)
        target = torch.randn(h, w, tiny.dim, generator=g) * 0.3
        item = dict(id=f"h{i}", image=f"heldout/h{i}.png", key=dict(long=max(H, W)))
        torch.save(dict(target=target), runfolder.target_path(str(tmp_path), item))
        rows.append(item)
        with Image.open(tmp_path / "heldout" / f"h{i}.png") as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0)
        with torch.inference_mode():
            f = tiny.dense(tiny.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None]))[0].double().numpy()
        t = target.double().numpy()
        cos = (f * t).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(t, axis=-1))
        expected[max(H, W)] = (((f - t) ** 2).mean(), cos.mean())
    got = distill.evaluate(tiny, rows, str(tmp_path), "cpu", "test")
    assert sorted(got) == sorted(expected)
    for long, (mse, cos) in expected.items():
        assert got[long]["images"] == 1
        assert got[long]["mse"] == pytest.approx(mse, rel=1e-5), long
        assert got[long]["cos"] == pytest.approx(cos, rel=1e-5), long
