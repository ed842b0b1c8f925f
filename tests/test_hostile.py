"""Hostile input, part 3 (issue 21): caches keyed by content, no user file overwritten or deleted, results files
locked, non-finite numbers refused, signals that keep finished work.  Each test failed on the code before it."""

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmarks  # noqa: E402
import checkpoints  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import miniature  # noqa: E402
import results  # noqa: E402
import runfolder  # noqa: E402
import student  # noqa: E402
import textcache  # noqa: E402

FAST = ["--backbone", "tiny", "--short-side", "48", "--long-side", "96", "--device", "cpu"]


@pytest.fixture
def fast_args(tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    return FAST + ["--templates", str(templates), "--text-cache", "none"]


@pytest.fixture
def voc(tmp_path):
    return benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=4)


def tiny_weights(path: Path, shift: float = 0.0):
    """tiny's (seeded random) weights as a plain state dict file; `shift` changes every value, not the size."""
    model = checkpoints.open_clip_model(checkpoints.BACKBONES["tiny"], None)
    state = {k: (v + shift if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def same_size_other_content(path: Path, make):
    """Replace `path` by other bytes of the same size, with the same modification time."""
    st = os.stat(path)
    make()
    assert os.path.getsize(path) == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ----------------------------------------------------------------------------------------------------------------
# 1. Caches keyed by content
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_does_not_resume_results_of_replaced_weights(tmp_path, voc, fast_args, capsys):
    weights, out = tiny_weights(tmp_path / "w.pt"), tmp_path / "r.json"
    argv = ["--dataset", "voc20", "--root", str(voc), "--pretrained", str(weights), "--out", str(out)] + fast_args
    evaluate.main(argv)
    evaluate.main(argv)
    assert "resuming" in capsys.readouterr().out  # the same weights: resumed
    same_size_other_content(weights, lambda: tiny_weights(weights, shift=0.5))
    evaluate.main(argv)
    assert "resuming" not in capsys.readouterr().out  # other weights under the same name: recomputed
    assert json.loads(out.read_text())["settings"]["pretrained_sha1"] == files.file_sha1(weights)


def test_text_cache_key_depends_on_every_text_weight():
    backbone = student.load_backbone("tiny", None)
    before = textcache.text_weights_fingerprint(backbone)
    name, p = max(((n, p) for n, p in backbone.model.named_parameters() if not n.startswith("visual.")),
                  key=lambda t: t[1].numel())  # fmt: skip
    with torch.no_grad():
        p.view(-1)[1] += 1.0  # a value the old fingerprint's 256 evenly spaced samples skipped
    assert textcache.text_weights_fingerprint(backbone) != before, name


def test_text_cache_entry_holding_nan_is_recomputed(tmp_path, capsys):
    backbone = student.load_backbone("tiny", None)
    good, calls = torch.randn(2, backbone.dim), []
    compute = lambda: calls.append(1) or good  # noqa: E731
    textcache._MEMORY_CACHE.clear()
    textcache.cached(backbone, ["a", "b"], ["{}"], tmp_path, compute)
    (path,) = tmp_path.glob("*.pt")
    torch.save({"queries": ["a", "b"], "templates": ["{}"], "embeddings": torch.full((2, backbone.dim), float("nan"))},
               path)  # fmt: skip
    textcache._MEMORY_CACHE.clear()
    emb = textcache.cached(backbone, ["a", "b"], ["{}"], tmp_path, compute)
    assert len(calls) == 2 and torch.equal(emb, good)
    assert "damaged" in capsys.readouterr().err


def distill_args(images, **kw):
    base = dict(images=str(images), heldout=None, num_heldout=1, max_images=None, augment="paper",
                aug_scale=0.25, seed=0, eval_sizes=[192], pretrained="none", stride=24, precision="fp32",
                target_dtype="fp16")  # fmt: skip
    return types.SimpleNamespace(**dict(base, **kw))


def test_distill_redoes_the_augmentation_of_a_replaced_photo_of_the_same_size(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (160, 128), (40 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.bmp")  # BMP: size = W x H
    jobs = runfolder.make_jobs(distill_args(tmp_path / "imgs"), 16)
    photo = tmp_path / "imgs" / "0.bmp"
    same_size_other_content(photo, lambda: Image.new("RGB", (160, 128), (0, 200, 0)).save(photo))
    again = runfolder.make_jobs(distill_args(tmp_path / "imgs"), 16)
    assert jobs[0]["key"] != again[0]["key"] and jobs[1]["key"] == again[1]["key"]


def test_distill_targets_key_on_the_content_of_the_weights_file(tmp_path):
    weights = tiny_weights(tmp_path / "w.pt")
    backbone = types.SimpleNamespace(name="tiny", window=128)
    key = runfolder.teacher_key(backbone, distill_args(tmp_path, pretrained=str(weights)))
    same_size_other_content(weights, lambda: tiny_weights(weights, shift=0.25))
    assert runfolder.teacher_key(backbone, distill_args(tmp_path, pretrained=str(weights))) != key


def test_content_sha1_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path, calls = tmp_path / "w.bin", []
    path.write_bytes(b"x" * 100)
    real = files.file_sha1
    monkeypatch.setattr(files, "file_sha1", lambda p: calls.append(p) or real(p))
    first = [files.content_sha1(str(path)) for _ in range(3)]
    assert len(calls) == 1 and len(set(first)) == 1
    path.write_bytes(b"y" * 100)
    assert files.content_sha1(str(path)) != first[0] and len(calls) == 2


# ----------------------------------------------------------------------------------------------------------------
# 2. Never overwrite or delete what is not ours
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["my notes\n", '{"mine": 1}', None])
def test_evaluate_refuses_an_out_file_it_did_not_write(tmp_path, voc, fast_args, capsys, content):
    out = tmp_path / ("results.png" if content is None else "mine.json")
    if content is not None:
        out.write_text(content)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "voc20", "--root", str(voc), "--out", str(out), "--pretrained", "none"] + fast_args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    if content is None:
        assert "plot" in err and not out.exists()
    else:
        assert "not a results file" in err and out.read_text() == content


def test_evaluate_results_carry_the_marker_and_are_rewritten(tmp_path, voc, fast_args):
    out = tmp_path / "r.json"
    argv = ["--dataset", "voc20", "--root", str(voc), "--out", str(out), "--pretrained", "none"] + fast_args
    evaluate.main(argv)
    assert json.loads(out.read_text())["format"] == results.RESULTS_FORMAT
    evaluate.main(argv + ["--no-resume"])  # ours: may be rewritten
    legacy = json.loads(out.read_text())
    del legacy["format"]
    out.write_text(json.dumps(legacy))  # written before the marker existed: still ours
    evaluate.main(argv)


def test_miniature_world_refuses_a_folder_of_the_users_pngs(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(out / "images" / f"{i:05d}.png")
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    with pytest.raises(SystemExit) as exc:
        miniature.main(["world", "--out", str(out), "--size", "32x32", "--count", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "did not write" in err
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before


def test_miniature_world_rewrites_its_own_folder(tmp_path):
    out = tmp_path / "w"
    miniature.main(["world", "--out", str(out), "--size", "32x32", "--count", "3"])
    miniature.main(["world", "--out", str(out), "--size", "32x32", "--count", "2", "--seed", "1"])
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["00000.png", "00001.png"]


def test_distill_clean_up_removes_only_its_own_temp_files(tmp_path):
    run = tmp_path / "run"
    (run / "targets").mkdir(parents=True)
    user = [run / "thesis.tmp.tex", run / "notes.json.tmp.3", run / "targets" / "draft.tmp.1"]
    for p in user:
        p.write_text("mine")
    target = run / "targets" / "x.pt"
    ours = [Path(files.temp_name(str(target))), run / "targets" / "y.pt.tmp.999"]  # ours, and an older version's
    for p in ours:
        p.write_bytes(b"partial")
    runfolder.clean_leftovers(str(run))
    assert all(p.exists() for p in user) and not any(p.exists() for p in ours)


def test_atomic_write_temp_name_is_marked(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(os.path.basename(a)) or real_replace(a, b))
    files.write_json(tmp_path / "r.json", {"a": 1})
    assert files.TEMP_NAME.fullmatch(seen[0]) and seen[0].startswith("r.json.tmp.spar-")


# ----------------------------------------------------------------------------------------------------------------
# 3. A results file is locked
# ----------------------------------------------------------------------------------------------------------------


def test_a_second_evaluate_on_one_out_is_one_error_line(tmp_path, voc, fast_args, capsys):
    out = tmp_path / "r.json"
    held = results.claim(out)  # the first run holds the lock
    try:
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["--dataset", "voc20", "--root", str(voc), "--out", str(out), "--pretrained", "none"] +
                          fast_args)  # fmt: skip
    finally:
        held.close()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "another evaluate.py run" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# 5. Non-finite numbers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "int", "complex"])
def test_student_checkpoint_with_bad_numbers_is_refused(tmp_path, bad):
    backbone = student.load_backbone("tiny", None)
    path = tmp_path / "student.pt"
    checkpoints.save_student(str(path), backbone, {})
    ck = torch.load(path, weights_only=True)
    key = next(k for k, v in ck["image_tower"].items() if v.is_floating_point() and v.dim() == 2)
    v = ck["image_tower"][key]
    ck["image_tower"][key] = {
        "nan": v.clone().index_fill_(0, torch.tensor([0]), float("nan")),
        "inf": v.clone().index_fill_(0, torch.tensor([0]), float("inf")),
        "int": v.long(),
        "complex": v.to(torch.complex64),
    }[bad]
    torch.save(ck, path)
    with pytest.raises(checkpoints.BackboneError) as exc:
        student.load_backbone("tiny", None, checkpoint=str(path))
    assert key in str(exc.value)


def test_weights_file_with_nan_is_refused(tmp_path, capsys, voc, fast_args):
    weights = tiny_weights(tmp_path / "w.pt")
    state = torch.load(weights, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, weights)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "voc20", "--root", str(voc), "--pretrained", str(weights),
                       "--out", str(tmp_path / "r.json")] + fast_args)  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "NaN" in err and key in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# 6. Signals keep finished work; two Ctrl-C are still exit 130
# ----------------------------------------------------------------------------------------------------------------


def signal_at_image(monkeypatch, n: int, sig, again_while_saving: bool = False):
    """evaluate.segment sends `sig` to this process at image n (and, optionally, again while the JSON is saved)."""
    real, count = evaluate.segment, []

    def segment(*a, **k):
        count.append(1)
        if len(count) == n:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "segment", segment)
    if again_while_saving:
        real_write = evaluate.write_json

        def write_json(path, obj):
            os.kill(os.getpid(), sig)  # pressed again, right away
            return real_write(path, obj)

        monkeypatch.setattr(evaluate, "write_json", write_json)


@pytest.mark.parametrize("sig, twice", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)])
def test_evaluate_interrupted_keeps_the_finished_images(tmp_path, voc, fast_args, capsys, monkeypatch, sig, twice):
    out = tmp_path / "r.json"
    signal_at_image(monkeypatch, 3, sig, twice)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "voc20", "--root", str(voc), "--out", str(out), "--pretrained", "none",
                       "--save-every", "100"] + fast_args)  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "Traceback" not in err
    done = json.loads(out.read_text())["modes"]["single"]["images_done"]
    assert done in (2, 3)  # the images finished before the signal are saved


def test_a_swallowed_ctrl_c_still_exits_130(capsys):
    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass  # a library that swallows it
        return "finished"

    with pytest.raises(SystemExit) as exc:
        cli.main_guard(main, [])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Section 2: argparse errors, Ctrl-C in the tools, checked numbers of miniature.py and bench.py
# ----------------------------------------------------------------------------------------------------------------

CLIS = ["distill", "evaluate", "miniature", "bench", "reproduce", "teacher", "stitch", "student", "files"]


@pytest.mark.parametrize("name", CLIS)
def test_argparse_errors_are_one_error_line_and_exit_2(name, capsys):
    module = __import__(name)
    with pytest.raises(SystemExit) as exc:
        module.main(["--no-such-flag"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--help" in err[0]


def interrupting(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "name, target, argv",
    [
        ("bench", "load_backbone", ["--device", "cpu", "--backbone", "tiny"]),
        ("teacher", "load_backbone", ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]),
        ("miniature", "experiment", ["--out", "OUT"]),
        ("reproduce", "time_backbone", ["--timing", "--quick", "--out", "OUT", "--device", "cpu"]),
    ],
)
def test_ctrl_c_in_the_tools_is_exit_130_without_traceback(name, target, argv, tmp_path, capsys, monkeypatch):
    module = __import__(name)
    monkeypatch.setattr(module, target, interrupting)
    with pytest.raises(SystemExit) as exc:
        module.main([str(tmp_path / "o") if a == "OUT" else a for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "Traceback" not in err and "interrupted" in err


@pytest.mark.parametrize(
    "setting",
    ["pretrain.steps=0", "pretrain.steps=3", "pretrain.batch=0", "pretrain.templates=0", "pretrain.big_frac=2",
     "pretrain.lr=NaN", "eval.stride=0", "distill.images=1", "pretrain.steps=2.5", "distill.lr=\"abc\"",
     "eval.large_size=12", "world.noise=-1", "pretrain.templates=100000"],
)  # fmt: skip
def test_miniature_set_values_are_checked_before_any_work(setting, tmp_path, capsys):
    out = tmp_path / "m"
    with pytest.raises(SystemExit) as exc:
        miniature.main(["--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and setting.split("=")[0] in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "flag, value", [("--reps", "0"), ("--batch-size", "0"), ("--batch-size", "-2"), ("--warmup", "-1"),
                    ("--budget", "0"), ("--budget", "nan"), ("--max-call", "-1"), ("--threads", "0")],
)  # fmt: skip
def test_bench_numbers_are_checked(flag, value, capsys):
    import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--backbone", "tiny", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and flag in err


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py's resume: a tampered record is refused, statistics are counted once
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [{"confusion": [[1]]}, {"images_done": -2}, {"images_done": "3"}, {"seconds": "x"}, {"out_of_range_pixels": -5}],
)
def test_a_tampered_resume_record_is_one_error_line(tmp_path, voc, fast_args, capsys, damage):
    out = tmp_path / "r.json"
    argv = ["--dataset", "voc20", "--root", str(voc), "--out", str(out), "--pretrained", "none"] + fast_args
    evaluate.main(argv)
    record = json.loads(out.read_text())
    record["modes"]["single"].update(damage)
    out.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "damaged record" in err and "Traceback" not in err
    assert json.loads(out.read_text()) == record  # not overwritten


def test_out_of_range_pixels_are_counted_once_across_interrupts(tmp_path, fast_args, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    for i in range(3):  # each label holds 10 pixels of a value VOC21 lacks
        Image.new("RGB", (50, 40), (60 * i, 90, 30)).save(base / "JPEGImages" / f"{i}.jpg")
        label = np.zeros((40, 50), np.uint8)
        label[0, :10] = 40
        Image.fromarray(label).save(base / "SegmentationClass" / f"{i}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("0\n1\n2\n")
    out = tmp_path / "r.json"
    argv = ["--dataset", "voc21", "--root", str(tmp_path / "voc"), "--out", str(out), "--pretrained", "none"]
    real = evaluate.segment
    for stop in (2, 1):  # interrupted while segmenting the 2nd image, then (resumed) the 1st of the rest
        calls = []

        def segment(*a, **k):
            calls.append(1)
            if len(calls) == stop:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(evaluate, "segment", segment)
        with pytest.raises(SystemExit):
            evaluate.main(argv + fast_args)
    monkeypatch.setattr(evaluate, "segment", real)
    evaluate.main(argv + fast_args)
    state = json.loads(out.read_text())["modes"]["single"]
    assert state["images_done"] == 3 and state["out_of_range_pixels"] == 30


# ----------------------------------------------------------------------------------------------------------------
# Wrong pixels and wrong label types
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int32 0..1e6", "float -1..1"])
def test_wide_range_tiffs_are_rescaled_not_clipped(tmp_path, kind):
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    if kind.startswith("int32"):
        im = Image.fromarray((ramp * 1e6).astype(np.int32), "I")
    else:
        im = Image.fromarray((ramp * 2 - 1).astype(np.float32), "F")
    im.save(tmp_path / "x.tif")
    grey = np.asarray(files.read_rgb(str(tmp_path / "x.tif")))[..., 0].astype(int)
    assert (grey == 255).mean() < 0.02 and (grey == 0).mean() < 0.02  # was 93 % / 50 % saturated
    assert abs(grey.mean() - 127.5) < 3


def test_confusion_refuses_float_labels():
    with pytest.raises(ValueError, match="integer"):
        evaluate.confusion(torch.tensor([0.0, 1.0]), torch.tensor([0.7, 1.2]), 2)
    assert evaluate.confusion(torch.tensor([0, 1]), torch.tensor([0, 1]), 2).trace() == 2
