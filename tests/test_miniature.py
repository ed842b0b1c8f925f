"""miniature.py: the toy world, the 128^2 pretraining, and (SLOW, ~1 min on 2 idle cores) the end-to-end experiment
at toy sizes through the real CLIs (evaluate.py, distill.py), as `python miniature.py --out DIR` runs it.

The full-size experiment needs ~4 minutes of pretraining before the single-pass vs teacher gap exists, too long for
CI; here the pipeline is exercised at sizes where the numbers mean nothing, and the test asserts what holds at any
size: the world's labels match its pixels, pretraining is deterministic and loadable by every CLI, distillation
lowers the MSE to the cached teacher targets (so the student checkpoint loads and changes the single pass), reruns
resume, and segment.py works with the pretrained text tower.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmarks  # noqa: E402
import miniature  # noqa: E402
from student import load_backbone  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOY = [
    "pretrain.steps=6",
    "pretrain.batch=4",
    "eval.native_count=3",
    "eval.large_count=2",
    "eval.large_size=128x256",
    'eval.other_sizes=["144x160"]',
    "eval.stride=64",
    "distill.images=6",
    "distill.size=128x256",
    "distill.epochs=3",
    "distill.lr=2e-5",
    "distill.train=all",
    "distill.stride=64",
]


def test_voronoi_world_labels_match_pixels_and_are_seeded(tmp_path):
    cfg = miniature.DEFAULTS["world"]
    assert cfg["kind"] == "voronoi"
    a = miniature.render_scene(miniature.scene_rng(3, 0), 256, 512, cfg)
    b = miniature.render_scene(miniature.scene_rng(3, 0), 256, 512, cfg)
    c = miniature.render_scene(miniature.scene_rng(3, 1), 256, 512, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same seed and index must give the same scene"
    assert not np.array_equal(a[0], c[0])
    image, label = a
    assert image.shape == (256, 512, 3) and image.dtype == np.uint8 and label.shape == (256, 512)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and len(np.unique(label)) >= 3
    # the class is visible locally: each class's pixels are, on average, nearest to its desaturated colour
    grey = np.full((1, 3), 0.5, np.float32)
    palette = np.concatenate([grey, 0.5 + cfg["saturation"] * (benchmarks.COLOURS - 0.5)])
    rgb = image.astype(np.float32) / 255
    for k in np.unique(label):
        mean = rgb[label == k].mean(0)
        assert np.argmin(np.linalg.norm(palette - mean, axis=1)) == k, f"class {k}: mean colour {mean}"
    # cells: far fewer label changes along a row than pixels (regions, not noise), and cut by the image border
    changes = (label[:, 1:] != label[:, :-1]).sum(1).mean()
    assert 1 <= changes <= 16, changes
    root = miniature.write_world(tmp_path / "w", 64, 96, 3, seed=5)
    samples = benchmarks.dataset_samples("miniature", root)
    assert [os.path.basename(s.image) for s in samples] == ["00000.png", "00001.png", "00002.png"]
    img, lab = benchmarks.read_sample(samples[1])
    assert img.shape == (3, 64, 96) and lab.shape == (64, 96)
    ref = miniature.render_scene(miniature.scene_rng(5, 1), 64, 96, cfg)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), ref[0]) and np.array_equal(lab.numpy(), ref[1])
    assert len(benchmarks.dataset_samples("miniature", benchmarks.make_synthetic("miniature", tmp_path / "s", 2))) == 2


def test_border_world_is_the_named_variant_and_its_labels_match_pixels():
    cfg = miniature.apply_sets(miniature.DEFAULTS, ["world.noise=0.05", "world.kind=border"])["world"]
    assert cfg == dict(benchmarks.WORLDS["border"], noise=0.05), "the switch first, then the other --sets"
    image, label = miniature.render_scene(miniature.scene_rng(3, 0), 256, 512, cfg)
    rgb = image.astype(np.float32) / 255
    for k, colour in enumerate(benchmarks.COLOURS):  # a border-coloured pixel belongs to that class
        near = np.linalg.norm(rgb - colour, axis=-1) < 0.2
        if near.sum() > 20:
            assert (label[near] == k + 1).mean() > 0.95, f"class {k + 1}: border pixels labelled otherwise"
    dense = miniature.apply_sets(miniature.DEFAULTS, ["pretrain.loss=dense", "pretrain.steps=5"])["pretrain"]
    assert dense == dict(miniature.PRETRAINS["dense"], steps=5)
    for bad in ("world.kind=hexagons", "pretrain.loss=l2"):
        try:
            miniature.apply_sets(miniature.DEFAULTS, [bad])
        except miniature.UserError as e:
            assert "known:" in str(e)
        else:
            raise AssertionError(bad)


def test_sigmoid_loss_is_siglip_on_the_pooled_embedding_with_presence_targets():
    torch.manual_seed(0)
    bb = load_backbone("tiny", pretrained=None)
    x = torch.rand(2, 3, 128, 128)
    y = torch.zeros(2, 128, 128, dtype=torch.long)
    y[0, :64] = 3  # image 0: classes 0 and 3 (50 % each); image 1: class 0, and class 2 on 1 % (below 2 %)
    y[1, :2, :82] = 2
    text = torch.nn.functional.normalize(torch.randn(5, bb.dim), dim=-1)
    head = {"t": torch.tensor(2.0), "b": torch.tensor(-1.5)}
    cfg = miniature.PRETRAINS["sigmoid"]
    loss = miniature.sigmoid_loss(bb, x, y, text, cfg, head)
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(bb.model.visual(bb.normalize(x)), dim=-1)
    z = torch.exp(torch.tensor(2.0)) * pooled @ text.T - 1.5
    target = torch.tensor([[1.0, 0, 0, 1, 0], [1.0, 0, 0, 0, 0]])
    ref = -(target * torch.log(torch.sigmoid(z)) + (1 - target) * torch.log(1 - torch.sigmoid(z))).sum() / 2
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)


def test_pretraining_is_deterministic_and_loads_as_tiny_weights(tmp_path):
    cfg = miniature.apply_sets(miniature.DEFAULTS, ["pretrain.steps=4", "pretrain.batch=2"])
    miniature.pretrain(tmp_path / "a.pt", cfg["pretrain"], cfg["world"])
    miniature.pretrain(tmp_path / "b.pt", cfg["pretrain"], cfg["world"])
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "pretraining must be deterministic"
    bb = load_backbone("tiny", pretrained=str(tmp_path / "a.pt"))
    rnd = load_backbone("tiny", pretrained=None)
    assert torch.equal(bb.trunk.pos_embed, a["visual.trunk.pos_embed"])
    assert not torch.equal(bb.trunk.blocks[0].attn.qkv.weight, rnd.trunk.blocks[0].attn.qkv.weight)
    assert not torch.equal(bb.model.text.text_projection, rnd.model.text.text_projection)  # text tower trained too
    assert torch.equal(bb.model.text.token_embedding.weight, rnd.model.text.token_embedding.weight)  # frozen


def test_multi_size_pretraining_spreads_big_steps_and_keeps_pixels_per_step(tmp_path):
    cfg = dict(miniature.DEFAULTS["pretrain"], batch=32)
    assert {miniature.step_size(s, cfg) for s in range(100)} == {(128, 32)}, "default: 128^2 only"
    cfg.update(big_size=256, big_frac=0.25)
    sizes = [miniature.step_size(s, cfg) for s in range(100)]
    assert sizes.count((256, 8)) == 25 and sizes[:4] == [(128, 32)] * 3 + [(256, 8)]  # evenly spread, same pixels
    cfg.update(steps=4, batch=2, big_size=160, big_frac=0.5)  # big steps run through (E3) and train
    assert np.isfinite(miniature.pretrain(tmp_path / "m.pt", cfg, miniature.DEFAULTS["world"])["final_loss"])


def test_miniature_end_to_end_slow(tmp_path):
    """SLOW: world -> pretrain -> evaluate.py -> distill.py -> evaluate.py, at toy sizes, then a resumed rerun."""
    out = tmp_path / "mini"
    cmd = [sys.executable, os.path.join(ROOT, "miniature.py"), "--out", str(out), "--threads", "1"]
    cmd += [x for s in TOY for x in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)  # from any folder
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for key in ("native", "single", "teacher", "spar"):
        assert 0.0 <= res[key] <= 100.0, key
    assert os.path.isfile(res["pretrained_weights"]) and os.path.isfile(res["student_checkpoint"])
    assert (out / "results.png").stat().st_size > 1000

    # the distillation lowered the (E4) MSE to the cached teacher targets, and the checkpoint carries it
    run = os.path.dirname(res["student_checkpoint"])
    pre = load_backbone("tiny", pretrained=res["pretrained_weights"])
    stu = load_backbone("tiny", pretrained=res["pretrained_weights"], checkpoint=res["student_checkpoint"])
    mse = {"pre": 0.0, "student": 0.0}
    pngs = sorted(glob.glob(os.path.join(run, "augment", "*.png")))
    assert len(pngs) == 4  # 6 scenes, the last 2 held out
    for png in pngs:
        target = torch.load(os.path.join(run, "targets", os.path.basename(png)[:-4] + ".pt"), weights_only=True)[
            "target"
        ].float()
        x = pre.normalize(torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1)[None].float() / 255)
        with torch.inference_mode():
            for name, bb in (("pre", pre), ("student", stu)):
                mse[name] += torch.nn.functional.mse_loss(bb.dense(x)[0], target).item()
    assert mse["student"] < mse["pre"], mse

    # a rerun resumes: nothing is recomputed, the numbers are the same
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout, "a finished run must not call evaluate.py / distill.py again"
    assert json.loads((out / "results.json").read_text())["spar"] == res["spar"]

    for size in ("128x256", "144x160"):  # every size: single, teacher, SPAR
        assert {"single", "teacher"} <= set(res["sizes"][size]) and "spar" in res["spar_sizes"][size], size

    # the diagnostics: the teacher is its own reference (offset 0); one row per variant, before and after
    diag = subprocess.run(
        [*cmd[:2], "diagnose", "--out", str(out), "--count", "1"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert diag.returncode == 0, diag.stderr[-3000:]
    report = json.loads((out / "diagnose.json").read_text())
    assert set(report) == {"pre-trained", "SPAR student"}
    for r in report.values():
        assert set(r["rows"]) == {"single", "local", "tiled", "teacher"} and r["rows"]["teacher"]["offset"] == 0.0
        assert all(len(row["cosine"]) == 5 and 0 <= row["accuracy"] <= 100 for row in r["rows"].values())
    assert "9x9-token attention" in diag.stdout

    # the pretrained weights work with the text tower through segment.py's CLI on a scene of the world
    scene = out / "world" / "128x256" / "images" / "00000.png"
    seg = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "segment.py"),
            str(scene),
            "--backbone",
            "tiny",
            "--pretrained",
            res["pretrained_weights"],
            "--classes",
            "red, green, blue, yellow",
            "--out",
            str(tmp_path / "seg.png"),
            "--text-cache",
            "none",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert seg.returncode == 0, seg.stderr[-2000:]
    assert (tmp_path / "seg.png").is_file()


def test_bad_arguments_are_one_line_errors(tmp_path):
    bad = (
        ["world", "--out", str(tmp_path), "--size", "12"],
        ["--set", "world.nope=1"],
        ["diagnose", "--out", str(tmp_path)],
    )
    for argv in bad:
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "miniature.py"), *argv], capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
