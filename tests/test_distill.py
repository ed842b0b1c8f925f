"""distill.py: augmentation recipe, careful image reading, cached targets, (E4) training, resume, DDP, bad inputs.

Everything runs on the offline `tiny` backbone, on CPU, with a few small images and 1-3 epochs.
"""

import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402
import runfolder  # noqa: E402
import student  # noqa: E402
import teacher  # noqa: E402

EPOCHS = 3
BASE = [
    "--backbone",
    "tiny",
    "--pretrained",
    "none",
    "--device",
    "cpu",
    "--num-heldout",
    "1",
    "--eval-sizes",
    "192,400",
    "--lr",
    "5e-5",
]


def run_distill(images, out, *extra):
    return distill.main(BASE + ["--images", str(images), "--out", str(out), "--epochs", str(EPOCHS), *extra])


def copy_caches(src, dst):
    """Give a new run folder the stage-1/2 caches of another (same images and teacher): no teacher work."""
    for sub in ("augment", "heldout", "targets"):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))


def tower_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["image_tower"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def distill_images(tmp_path_factory):
    """Five small real photos (from assets/): the last one by name is held out."""
    folder = tmp_path_factory.mktemp("distill_images")
    for i, name in enumerate(["astronaut", "coffee", "hubble_deep_field", "retina", "rocket"]):
        with Image.open(os.path.join(ROOT, "assets", f"{name}.jpg")) as im:
            size = (480, 320) if i % 2 else (320, 400)
            im.convert("RGB").resize(size, Image.BILINEAR).save(folder / f"{i}_{name}.png")
    return folder


@pytest.fixture(scope="module")
def distill_run(distill_images, tmp_path_factory):
    """One uninterrupted run, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("distill_run") / "A"
    metrics = run_distill(distill_images, out)
    return out, metrics


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: recipe and image reading (pure functions)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paper", "extended", "crop"])
def test_augment_recipe_depends_on_seed_and_name(mode):
    # the rules of each step: tests/test_distill_protocol.py
    rc = distill.make_recipe(distill.seeded_rng(7, "img0"), 1000, 800, mode, 1.0, 16)
    assert rc == distill.make_recipe(distill.seeded_rng(7, "img0"), 1000, 800, mode, 1.0, 16)
    others = [
        distill.make_recipe(distill.seeded_rng(s, n), 1000, 800, mode, 1.0, 16)
        for s, n in ((8, "img0"), (7, "img1"), (7, os.fsdecode(b"caf\xe9.png")))
    ]  # any file name
    assert all(o != rc for o in others)


def test_apply_recipe_gives_the_recipe_size_and_flip():
    im = Image.fromarray(np.tile(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], (200, 1, 3)))  # left dark
    for seed in range(20):
        rc = distill.make_recipe(distill.seeded_rng(seed, "x"), 300, 200, "paper", 0.25, 16)
        out = distill.apply_recipe(im, rc)
        assert list(out.size) == rc["final"]
        left, right = np.asarray(out)[0, 0, 0], np.asarray(out)[0, -1, 0]
        assert (left > right) == rc["flip"]


def test_read_image_converts_every_mode_to_rgb8(tmp_path):
    g16 = np.full((40, 50), 65535, np.uint16)
    g16[:, :25] = 32768
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.new("L", (50, 40), 77).save(tmp_path / "gray.png")
    Image.new("RGB", (50, 40), (10, 200, 30)).convert("P").save(tmp_path / "pal.gif")
    Image.new("CMYK", (50, 40), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")

    a = np.asarray(runfolder.read_image(str(tmp_path / "g16.png")))
    assert a.shape == (40, 50, 3) and a[0, -1, 0] == 255 and a[0, 0, 0] == 128  # rescaled, not clipped
    a = np.asarray(runfolder.read_image(str(tmp_path / "rgba.png")))
    assert tuple(a[0, 0]) == (200, 0, 0) and tuple(a[-1, 0]) == (255, 255, 255)  # alpha put on white
    assert tuple(np.asarray(runfolder.read_image(str(tmp_path / "gray.png")))[0, 0]) == (77, 77, 77)
    for name in ("pal.gif", "cmyk.jpg"):
        assert runfolder.read_image(str(tmp_path / name)).mode == "RGB"


def test_read_image_skips_unusable_files_with_a_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(os.urandom(3000))
    data = open(os.path.join(ROOT, "assets", "coffee.jpg"), "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (8, 8)).save(tmp_path / "dot.png")
    Image.new("RGB", (600, 20)).save(tmp_path / "strip.png")
    reasons = {}
    for name in ("empty.png", "noise.jpg", "cut.jpg", "dot.png", "strip.png"):
        with pytest.raises(distill.ImageSkip) as exc:
            runfolder.read_image(str(tmp_path / name))
        reasons[name] = str(exc.value)
    assert "cannot read" in reasons["noise.jpg"] and "cannot read" in reasons["cut.jpg"]
    assert "patch" in reasons["dot.png"] and "aspect" in reasons["strip.png"]


# ---------------------------------------------------------------------------------------------------------------
# A full short run
# ---------------------------------------------------------------------------------------------------------------


def test_loss_decreases(distill_run):
    _, metrics = distill_run
    losses = [h["loss"] for h in metrics["train_loss"]]
    assert len(losses) == EPOCHS and losses[-1] < losses[0]


def test_heldout_agreement_improves_at_seen_and_unseen_sizes(distill_run):
    out, metrics = distill_run
    rows = metrics["heldout"]
    assert [r["long_side"] for r in rows] == [192, 400]
    assert [r["seen_in_training"] for r in rows] == [True, False]  # 400 px is beyond every training image
    for r in rows:
        assert r["after"]["mse"] < r["before"]["mse"]
        assert r["after"]["cos"] > r["before"]["cos"]
    with open(out / "metrics.json") as f:
        assert json.load(f)["heldout"] == rows


def test_only_the_chosen_blocks_change(distill_run):
    out, _ = distill_run
    base = student.load_backbone("tiny", pretrained=None)
    tuned = student.load_backbone("tiny", pretrained=None, checkpoint=str(out / "student.pt"))
    before, after = dict(base.model.named_parameters()), dict(tuned.model.named_parameters())
    trained = [n for n in before if n.startswith(("visual.trunk.blocks.2.", "visual.trunk.blocks.3."))]
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained)
    frozen = [n for n in before if n not in trained]
    assert len(frozen) > len(trained)
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical, text tower included


def test_checkpoint_round_trip_and_wrong_backbone(distill_run):
    out, metrics = distill_run
    ckpt = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "spar-student" and ckpt["backbone"] == "tiny"
    losses = [h["loss"] for h in metrics["train_loss"]]
    assert ckpt["settings"]["epochs_done"] == metrics["kept_epoch"] == 1 + losses.index(min(losses))  # paper
    assert ckpt["settings"]["train"] == "blk_-1,blk_-2" and ckpt["settings"]["batch_size"] == 2
    tuned = student.load_backbone("tiny", pretrained=None, checkpoint=str(out / "student.pt"))
    held = [json.load(open(p)) for p in sorted(glob.glob(str(out / "heldout" / "*.json")))]
    again = distill.evaluate(tuned, held, str(out), "cpu", "reload")
    for row in metrics["heldout"]:
        assert again[row["long_side"]]["mse"] == pytest.approx(row["after"]["mse"], rel=1e-6)
    with pytest.raises(student.BackboneError, match="tiny"):
        student.load_backbone("clip-b16", pretrained=None, checkpoint=str(out / "student.pt"))


def test_rerun_hits_the_cache_and_does_not_call_the_teacher(distill_run, distill_images, monkeypatch):
    out, metrics = distill_run
    pngs = {p: os.path.getmtime(p) for p in glob.glob(str(out / "*" / "*.png"))}
    targets = {p: os.path.getmtime(p) for p in glob.glob(str(out / "targets" / "*.pt"))}
    assert len(targets) == 4 + 2  # 4 training + 1 held-out at 2 sizes

    def boom(*a, **k):
        raise AssertionError("the teacher ran although its targets are cached")

    monkeypatch.setattr(teacher.Teacher, "forward", boom)
    again = run_distill(distill_images, out, "--resume")
    assert again["heldout"] == metrics["heldout"]
    assert pngs == {p: os.path.getmtime(p) for p in pngs} and targets == {p: os.path.getmtime(p) for p in targets}


def test_existing_run_needs_resume(distill_run, distill_images, capsys):
    out, _ = distill_run
    with pytest.raises(SystemExit) as exc:
        run_distill(distill_images, out)
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Resume, kills, full disk
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_every", [0, 1], ids=["from-last-epoch", "mid-epoch"])
def test_resume_after_interrupt_gives_the_same_weights(distill_run, distill_images, tmp_path, monkeypatch, save_every):
    ref, _ = distill_run
    out = tmp_path / "B"
    copy_caches(ref, out)
    real_step, calls = distill.train_step, []

    def interrupted_step(*a, **k):
        calls.append(1)
        if len(calls) == 2 + 2:  # epoch 2, second step (4 images, batch 2)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(distill, "train_step", interrupted_step)
    with pytest.raises(SystemExit) as exc:
        run_distill(distill_images, out, "--save-every", str(save_every))
    assert exc.value.code == 130
    state = torch.load(out / "resume.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step"]) == ((1, 1) if save_every else (1, 0))
    monkeypatch.setattr(distill, "train_step", real_step)
    run_distill(distill_images, out, "--save-every", str(save_every), "--resume")
    a, b = tower_state(ref / "student.pt"), tower_state(out / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    assert not glob.glob(str(out / "**" / "*.tmp.*"), recursive=True)

    if save_every:
        with pytest.raises(SystemExit) as exc:  # changed settings are refused
            run_distill(distill_images, out, "--resume", "--lr", "1e-3")
        assert exc.value.code == 2
        before = torch.load(out / "resume.pt", weights_only=True)["state"]
        with pytest.raises(SystemExit) as exc:  # refused by resume.pt's own check too
            os.remove(out / "settings.json")
            run_distill(distill_images, out, "--resume", "--lr", "1e-3")
        assert exc.value.code == 2 and torch.load(out / "resume.pt", weights_only=True)["state"] == before


def test_full_disk_keeps_the_last_checkpoint(distill_run, distill_images, tmp_path, monkeypatch, capsys):
    ref, _ = distill_run
    out = tmp_path / "C"
    copy_caches(ref, out)
    real_save, writes = torch.save, []

    def save_then_fill_the_disk(obj, f, *a, **k):
        name = getattr(f, "name", "")
        if "student.pt.tmp" in str(name):
            writes.append(name)
            if len(writes) == 2:  # the epoch-2 checkpoint
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit) as exc:
        run_distill(distill_images, out)
    assert exc.value.code == 2 and "no space left" in capsys.readouterr().err
    ckpt = torch.load(out / "student.pt", weights_only=True)  # still the complete epoch-1 file
    assert ckpt["settings"]["epochs_done"] == 1
    assert not glob.glob(str(out / "*.tmp.*"))
    monkeypatch.setattr(torch, "save", real_save)
    run_distill(distill_images, out, "--resume")  # space freed: finish the run
    a, b = tower_state(ref / "student.pt"), tower_state(out / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_leftovers_are_cleaned_and_a_broken_target_recomputed(distill_run, distill_images, tmp_path, monkeypatch):
    ref, _ = distill_run
    out = tmp_path / "D"
    shutil.copytree(ref, out)
    victim = sorted(glob.glob(str(out / "targets" / "*.pt")))[0]
    with open(victim, "r+b") as f:  # a target cut short
        f.truncate(100)
    (out / "targets" / "x.pt.tmp.999").write_bytes(b"partial")  # a writer killed mid-write
    png = sorted(glob.glob(str(out / "augment" / "*.png")))[0]
    good = open(png, "rb").read()
    with open(png, "r+b") as f:  # a flipped byte inside the stored PNG
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0xFF]))
    real_forward, calls = teacher.Teacher.forward, []
    monkeypatch.setattr(teacher.Teacher, "forward", lambda self, x: calls.append(1) or real_forward(self, x))
    run_distill(distill_images, out, "--resume")
    assert len(calls) == 1  # only the broken target
    assert open(png, "rb").read() == good  # the PNG was redone (same pixels)
    assert not (out / "targets" / "x.pt.tmp.999").exists()
    assert torch.load(victim, weights_only=True)["target"].dtype == torch.float16

    with open(out / "resume.pt", "r+b") as f:  # a corrupt resume state: clear error
        f.truncate(50)
    with pytest.raises(SystemExit) as exc:
        run_distill(distill_images, out, "--resume")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------


def test_bad_images_are_skipped_and_odd_modes_converted(distill_images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(distill_images, folder)
    (folder / "b_empty.png").write_bytes(b"")
    (folder / "b_noise.jpg").write_bytes(os.urandom(2000))
    Image.new("RGB", (8, 8)).save(folder / "b_dot.png")
    Image.fromarray((np.random.default_rng(0).random((90, 120)) * 65535).astype(np.uint16)).save(folder / "c_16.png")
    Image.new("LA", (120, 90), (100, 128)).save(folder / "c_la.png")
    Image.new("L", (60, 40), 90).save(folder / "c_small_gray.png")  # smaller than the 128 px window
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(folder / "4_rocket.png", folder / "z_heldout.png")  # the last by name is held out
    odd = os.fsdecode(b"caf\xe9.png")  # not UTF-8: used, not a traceback
    shutil.copy(folder / "0_astronaut.png", folder / odd)
    os.symlink(folder / "gone.png", folder / "d_dangling.png")
    os.symlink("d_loop.png", folder / "d_loop.png")  # a link to itself
    os.mkfifo(folder / "d_fifo.png")  # reading it would block for ever
    distill.main(BASE + ["--images", str(folder), "--out", str(tmp_path / "E"), "--epochs", "1", "--eval-sizes", "192"])
    err = capsys.readouterr().err
    for bad in ("b_empty.png", "b_noise.jpg", "b_dot.png", "d_dangling.png", "d_loop.png", "d_fifo.png"):
        assert f"skip: '{folder / bad}'" in err
    assert "symbolic link" in err and "Traceback" not in err
    made = {
        json.load(open(p))["key"]["source"]: json.load(open(p))["size"]
        for p in glob.glob(str(tmp_path / "E" / "augment" / "*.json"))
    }
    assert {os.path.basename(s) for s in made} >= {"c_16.png", "c_la.png", "c_small_gray.png", odd}
    assert min(made[str(folder / "c_small_gray.png")]) >= 128  # short side upscaled to the window (K)


def test_images_smaller_than_the_window_without_augmentation(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    for i, size in enumerate([(100, 60), (70, 90), (120, 40)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
    distill.main(
        BASE
        + [
            "--images",
            str(folder),
            "--out",
            str(tmp_path / "F"),
            "--epochs",
            "1",
            "--augment",
            "none",
            "--eval-sizes",
            "96",
        ]
    )
    target = torch.load(glob.glob(str(tmp_path / "F" / "targets" / "0-*.pt"))[0], weights_only=True)["target"]
    assert tuple(target.shape) == (4, 7, 128)  # ceil(60/16) x ceil(100/16), unpadded


@pytest.mark.parametrize("case", ["empty", "missing", "one-image", "heldout-is-trained-on", "all-unreadable"])
def test_unusable_image_folder_is_one_clear_error(tmp_path, capsys, case):
    folder = tmp_path / "imgs"
    if case != "missing":
        folder.mkdir()
    if case in ("one-image", "heldout-is-trained-on"):
        Image.new("RGB", (64, 64)).save(folder / "only.png")
    if case == "all-unreadable":  # fails after the folder was made
        for name in ("a.png", "b.png", "c.png"):
            (folder / name).write_bytes(b"not an image")
    extra = ["--heldout", str(folder)] if case == "heldout-is-trained-on" else []
    with pytest.raises(SystemExit) as exc:
        distill.main(BASE + ["--images", str(folder), "--out", str(tmp_path / "G"), *extra])
    err = capsys.readouterr().err.strip()
    if case == "all-unreadable":  # progress bars and skips, then the error
        assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1
        err = err.splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "G").exists()  # no empty run folder left behind


CHANGED = [
    ["--seed", "1"],
    ["--augment", "extended"],
    ["--aug-scale", "0.3"],
    ["--stride", "32"],
    ["--pretrained", "other.pt"],
    ["--backbone", "clip-b16"],
    ["--batch-size", "1"],
    ["--precision", "bf16"],
    ["--target-dtype", "fp32"],
    ["--train", "blk_-1"],
    ["--shuffle"],
    ["--keep", "last"],
    ["--lr", "1e-4"],
]


@pytest.mark.parametrize("change", CHANGED, ids=[c[0] for c in CHANGED])
def test_resume_with_a_changed_setting_is_refused_before_any_work(distill_run, distill_images, capsys, change):
    out, _ = distill_run
    files = {p: os.path.getmtime(p) for p in glob.glob(str(out / "**" / "*"), recursive=True)}
    argv = BASE + ["--images", str(distill_images), "--out", str(out), "--epochs", str(EPOCHS), "--resume"]
    if change[0] == "--backbone":
        argv = argv[2:]  # BASE starts with --backbone tiny
    with pytest.raises(SystemExit) as exc:
        distill.main(argv + change)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: cannot resume") and len(err.splitlines()) == 1
    assert files == {p: os.path.getmtime(p) for p in glob.glob(str(out / "**" / "*"), recursive=True)}


def test_a_checkpoint_write_error_is_one_error_line(distill_run, distill_images, tmp_path, monkeypatch, capsys):
    ref, _ = distill_run
    out = tmp_path / "H"
    copy_caches(ref, out)
    real_save = torch.save

    def zip_writer_fails(obj, f, *a, **k):  # torch.save's way to report a full disk
        if "student.pt.tmp" in str(getattr(f, "name", "")):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(SystemExit) as exc:
        run_distill(distill_images, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error: cannot write") and "student.pt" in err[-1]
    assert not any(line.startswith("error:") for line in err[:-1]) and "Traceback" not in "".join(err)
    assert not glob.glob(str(out / "*.tmp.*")) and not (out / "student.pt").exists()


def test_a_second_run_on_the_same_folder_is_refused(distill_images, tmp_path, capsys):
    import fcntl

    out = tmp_path / "I"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # the first run, still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exc:
            run_distill(distill_images, out)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "another distill.py run" in err and len(err.splitlines()) == 1
    assert out.is_dir()  # not ours: kept
    with open(out / ".lock", "a") as f:  # released when main() returned
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


BAD = {
    "out-in-proc": ["--out", "/proc/distill-x"],
    "out-under-a-file": ["--out", "{tmp}/file/x"],
    "out-is-a-file": ["--out", "{tmp}/file"],
    "lr-nan": ["--lr", "nan"],
    "lr-inf": ["--lr", "inf"],
    "workers": ["--workers", "-1"],
    "teacher-batch": ["--teacher-batch", "-1"],
    "batch-0": ["--batch-size", "0"],
    "weight-decay": ["--weight-decay", "-1"],
    "train-unknown": ["--train", "blk_-1,head"],
    "train-range": ["--train", "blk_-7"],
    "stride-above-window": ["--stride", "200"],
    "train-blocks-and-train": ["--train-blocks", "2", "--train", "blk_-1"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_flags_and_output_folders_are_one_error_line(distill_images, tmp_path, capsys, case):
    (tmp_path / "file").write_text("a regular file")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in BAD[case]]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "J")]
    with pytest.raises(SystemExit) as exc:
        distill.main(BASE + ["--images", str(distill_images), "--epochs", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "J").exists() and (tmp_path / "file").is_file()


def test_cli_bad_number_exits_2_without_traceback(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "distill.py"), *BASE, "--out", str(tmp_path / "K"), "--lr", "nan"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --lr must be a finite number > 0, not nan."
    assert not (tmp_path / "K").exists()


def test_help_names_the_paper_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        distill.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in (
        "--stride",
        "--train",
        "--epochs",
        "--lr",
        "--max-images",
        "--augment",
        "--seed",
        "--batch-size",
        "--precision",
        "--target-dtype",
        "--shuffle",
        "--keep",
        "--device",
        "--resume",
        "(E4)",
    ):
        assert flag in text


# ---------------------------------------------------------------------------------------------------------------
# Multi-process
# ---------------------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes(distill_images, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        f"--master_port={free_port()}",
        os.path.join(ROOT, "distill.py"),
        *BASE,
        "--images",
        str(distill_images),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--eval-sizes",
        "192",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    writers = {}
    for path in glob.glob(str(out / "targets" / "*.pt")):
        writers[os.path.basename(path)] = torch.load(path, weights_only=True)["meta"]["rank"]
    assert len(writers) == 5 and set(writers.values()) == {0, 1}  # teacher work sharded, one writer a file
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["settings"]["world_size"] == 2 and ckpt["settings"]["epochs_done"] == 1
    student.load_backbone("tiny", pretrained=None, checkpoint=str(out / "student.pt"))
    assert json.load(open(out / "metrics.json"))["heldout"]
