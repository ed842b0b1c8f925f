"""What a newcomer trips over (issue 21, part 3), tried as a new user would, at the command line: --threads in every
CLI, a checkpoint's evaluate.py mode said explicitly, the segment palette of colour-named classes, one size
convention (H x W), help texts, failing fast offline, and results on random weights saying so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402

CLIS = ("stitch", "teacher", "student", "distill", "segment", "evaluate", "bench", "reproduce", "figures")


def help_text(name: str, capsys, argv=("--help",)) -> str:
    module = __import__(name)
    with pytest.raises(SystemExit) as exc:
        module.main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


def run(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def threads_restored():
    old, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(old)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


# ----------------------------------------------------------------------------------------------------------------
# --threads
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIS)
def test_every_cli_takes_threads_and_says_what_device_is(name, capsys):
    argv = ("fig1", "--help") if name == "figures" else ("--help",)
    text = help_text(name, capsys, argv)
    assert "--threads N" in text and "CPU threads for torch" in text
    if name not in ("stitch", "reproduce"):  # reproduce's --device has its own help (passed to evaluate.py)
        assert "cpu, cuda or cuda:N" in text


def test_threads_is_applied_as_parsed_and_for_child_processes(threads_restored):
    parser = cli.ArgumentParser()
    cli.add_threads_arg(parser)
    parser.parse_args(["--threads", "1"])
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    torch.set_num_threads(2)
    parser.parse_args([])  # not given: torch's own choice is left alone
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_threads_not_a_positive_count_is_one_error_line(value, capsys):
    import stitch

    with pytest.raises(SystemExit) as exc:
        stitch.main(["--threads", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "--threads" in err and "Traceback" not in err


def test_threads_at_the_command_line():
    res = run("student.py", "--backbone", "tiny", "--pretrained", "none", "--sizes", "32x64", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert "32x64" in res.stdout


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py: the checkpoint's mode is explicit
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_setup(tmp_path):
    from checkpoints import CHECKPOINT_FORMAT
    from student import load_backbone

    student = load_backbone("tiny", None)
    with torch.no_grad():
        for p in student.image_tower().parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ckpt = tmp_path / "student.pt"
    tower = student.image_tower().state_dict()
    torch.save({"format": CHECKPOINT_FORMAT, "backbone": "tiny", "settings": {}, "image_tower": tower}, ckpt)
    data = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=2)
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    args = ["--dataset", "voc20", "--root", str(data), "--backbone", "tiny", "--short-side", "48", "--long-side", "96"]
    args += ["--templates", str(tmp_path / "t.txt"), "--text-cache", str(tmp_path / "cache")]
    return args, ckpt


def test_checkpoint_that_no_mode_runs_is_refused(eval_setup, tmp_path, capsys):
    args, ckpt = eval_setup
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as exc:
        evaluate.main(args + ["--modes", "pretrained,slide24", "--checkpoint", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "'student'" in err and "--checkpoint" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        evaluate.main(args + ["--modes", "student", "--out", str(out)])  # a student mode needs a checkpoint
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "--checkpoint" in err


def test_student_mode_runs_the_checkpoint_and_single_still_does(eval_setup, tmp_path, capsys):
    args, ckpt = eval_setup
    evaluate.main(
        args + ["--modes", "pretrained,student", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.json")]
    )
    evaluate.main(args + ["--modes", "single", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b.json")])
    a = json.loads((tmp_path / "a.json").read_text())["modes"]
    b = json.loads((tmp_path / "b.json").read_text())["modes"]
    assert a["student"]["confusion"] == b["single"]["confusion"]  # the documented `single --checkpoint` still works
    assert a["student"]["confusion"] != a["pretrained"]["confusion"]  # ... and it is the student's image tower
    assert "student" in capsys.readouterr().out


def test_evaluate_help_lists_the_miniature_dataset(capsys):
    text = help_text("evaluate", capsys)
    assert "--dataset miniature" in text and "student" in text and "miniature:" in text


# ----------------------------------------------------------------------------------------------------------------
# Offline: a hub backbone without its weights on disk fails in seconds, with one line
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def no_network(monkeypatch):
    import socket

    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return tried


def test_offline_hub_backbone_fails_before_any_network_attempt(empty_hub_cache, no_network, monkeypatch):
    import open_clip

    from checkpoints import BackboneError
    from student import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("open_clip built the model first"))
    for name in ("siglip2-b16", "clip-b16"):
        with pytest.raises(BackboneError) as exc:
            load_backbone(name, "default")
        msg = str(exc.value)
        assert "HF_HUB_OFFLINE" in msg and "--backbone tiny" in msg and "--pretrained none" in msg and "\n" not in msg
    assert no_network == []  # HF_HUB_OFFLINE: not even the quick check connects


def test_unreachable_hub_is_said_after_one_quick_check(empty_hub_cache, no_network, monkeypatch):
    from checkpoints import BACKBONES, BackboneError, check_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(BackboneError, match="cannot be reached"):
        check_hub(BACKBONES["siglip2-b16"])
    assert len(no_network) == 1 and no_network[0][0] == ("huggingface.co", 443)


def test_cached_weights_need_no_network(empty_hub_cache, no_network, monkeypatch):
    from checkpoints import BACKBONES, check_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hub_cache / "models--timm--ViT-B-16-SigLIP2-512"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    check_hub(BACKBONES["siglip2-b16"])  # cached: no error, no connection
    assert no_network == []


def test_hub_repos_are_open_clips():
    import open_clip

    from checkpoints import BACKBONES, hub_repo

    spec = BACKBONES["clip-b16"]
    assert open_clip.get_pretrained_cfg(spec.openclip_name, spec.pretrained_tag)["hf_hub"].strip("/") == hub_repo(spec)


def test_offline_segment_cli_is_one_line_and_exit_2(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "img.png")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    res = run("segment.py", str(tmp_path / "img.png"), "--backbone", "siglip2-b16", "--classes", "a, b", env=env)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "Traceback" not in res.stderr
    assert "HF_HUB_OFFLINE" in res.stderr and "--backbone tiny" in res.stderr


# ----------------------------------------------------------------------------------------------------------------
# Results on random weights say so
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rw(tmp_path_factory):
    """A small image folder, one-line templates, a text cache and a tiny weights file (not random)."""
    from PIL import Image

    from student import load_backbone

    base = tmp_path_factory.mktemp("random")
    (base / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (96 + 16 * i, 64), (60 * i, 120, 200)).save(base / "imgs" / f"{i}.png")
    (base / "t.txt").write_text("a photo of a {}.\n")
    weights = base / "tiny_weights.pt"
    torch.save(load_backbone("tiny", None).model.state_dict(), weights)
    text = ["--templates", str(base / "t.txt"), "--text-cache", str(base / "cache")]
    return dict(base=base, img=str(base / "imgs" / "0.png"), weights=str(weights), text=text)


def cli_output(name, argv, capsys) -> str:
    module = __import__(name)
    module.main(argv)
    return capsys.readouterr().out


NOTE = "random weights"


def test_backbone_knows_when_its_weights_are_random(rw):
    from checkpoints import save_student
    from student import load_backbone

    assert load_backbone("tiny").random_weights and load_backbone("tiny", "none").random_weights
    assert not load_backbone("tiny", rw["weights"]).random_weights
    model = load_backbone("tiny", None)
    save_student(str(rw["base"] / "s.pt"), model, {})
    assert load_backbone("tiny", None, checkpoint=str(rw["base"] / "s.pt")).random_weights  # text tower still random


def test_segment_and_teacher_say_random_weights(rw, tmp_path, capsys, threads_restored):
    seg = "segment"
    argv = [rw["img"], "--backbone", "tiny", "--classes", "sky, sea", "--out", str(tmp_path / "m.png"), *rw["text"]]
    assert NOTE in cli_output(seg, argv, capsys)
    assert NOTE not in cli_output(seg, argv + ["--pretrained", rw["weights"]], capsys)
    argv = ["--backbone", "tiny", "--size", "128x192", "--stride", "64", "--device", "cpu"]
    assert NOTE in cli_output("teacher", argv, capsys)
    assert NOTE not in cli_output("teacher", argv + ["--pretrained", rw["weights"]], capsys)


def test_evaluate_says_random_weights(eval_setup, tmp_path, capsys):
    args, _ = eval_setup
    assert NOTE in cli_output("evaluate", args + ["--pretrained", "none", "--out", str(tmp_path / "a.json")], capsys)


def test_bench_distill_figures_reproduce_say_random_weights(rw, tmp_path, capsys, threads_restored):
    import reproduce

    argv = ["--device", "cpu", "--backbone", "tiny", "--no-teacher", "--no-train", "--no-trunk", "--sizes", "64x64"]
    assert NOTE in cli_output("bench", argv + ["--reps", "1", "--warmup", "0"], capsys)
    argv = ["--backbone", "tiny", "--device", "cpu", "--images", str(rw["base"] / "imgs"), "--num-heldout", "1"]
    argv += ["--epochs", "1", "--eval-sizes", "128", "--out", str(tmp_path / "run"), "--threads", "1"]
    assert NOTE in cli_output("distill", argv, capsys)
    argv = ["fig5", "--backbone", "tiny", "--device", "cpu", "--images", rw["img"], "--classes", "sky, sea"]
    assert NOTE in cli_output("figures", argv + ["--out", str(tmp_path / "fig"), *rw["text"]], capsys)

    def notes(*argv):
        args = reproduce.build_parser().parse_args(list(argv))
        args.backbones = args.backbones.split(",")  # as reproduce's _run does
        return reproduce.table_notes(args)

    assert any(NOTE in n for n in notes("--pretrained", "none"))
    assert any(NOTE in n for n in notes("--smoke-backbone", "tiny"))
    assert not any(NOTE in n for n in notes())


# ----------------------------------------------------------------------------------------------------------------
# One size convention: H x W, as --size HxW is given; files.py --help answers at once
# ----------------------------------------------------------------------------------------------------------------


def test_sizes_are_printed_height_by_width(rw, tmp_path, capsys, threads_restored):
    from PIL import Image

    import runfolder
    from segment import SegmentSettings, run_size

    Image.new("RGB", (64, 32), (10, 200, 10)).save(tmp_path / "wide.png")  # 32 high, 64 wide
    argv = [str(tmp_path / "wide.png"), "--backbone", "tiny", "--classes", "a, b", "--short-side", "0"]
    out = cli_output("segment", argv + ["--out", str(tmp_path / "m.png"), *rw["text"]], capsys)
    assert "32x64 px (run at 32x64)" in out and "64x32" not in out
    out = cli_output("teacher", ["--backbone", "tiny", "--size", "128x256", "--stride", "128"], capsys)
    assert "image 128x256" in out and "256x128" not in out
    with pytest.raises(cli.UserError, match="the image is 8x40 px"):
        run_size(8, 40, SegmentSettings(short_side=0, long_side=0), 16)
    Image.new("RGB", (40, 8)).save(tmp_path / "strip.png")  # 8 high, 40 wide
    with pytest.raises(runfolder.ImageSkip, match="it is 8x40 px"):
        runfolder.read_image(str(tmp_path / "strip.png"))
    with pytest.raises(SystemExit):
        __import__("files").main([str(tmp_path / "wide.png"), str(tmp_path / "missing.png")])
    assert "RGB 32x64 (H x W)" in capsys.readouterr().out


def test_files_help_imports_no_torch():
    res = run("files.py", "--help", timeout=120)
    assert res.returncode == 0 and "usage: files.py" in res.stdout
    res = run("-c", "import sys, files, cli; print('torch' in sys.modules)", timeout=120)
    assert res.stdout.strip() == "False", res.stderr


# ----------------------------------------------------------------------------------------------------------------
# segment.py's palette: classes named by colours are drawn in those colours; the legend says the palette
# ----------------------------------------------------------------------------------------------------------------


def test_colour_named_classes_are_drawn_in_their_colour_and_the_legend_says_so(rw, tmp_path, capsys, monkeypatch):
    import matplotlib.axes
    from PIL import Image

    titles = []
    real = matplotlib.axes.Axes.legend
    monkeypatch.setattr(
        matplotlib.axes.Axes, "legend", lambda self, *a, **k: titles.append(k.get("title")) or real(self, *a, **k)
    )
    classes = "background, red, green, blue, yellow"
    out = tmp_path / "m.png"
    cli_output(
        "segment", [rw["img"], "--backbone", "tiny", "--classes", classes, "--out", str(out), *rw["text"]], capsys
    )
    palette = np.array(Image.open(out).getpalette()[:15]).reshape(5, 3)
    red, green, blue, yellow = palette[1:5].astype(int)
    assert red[0] > 200 and red[1:].max() < 60 and green[1] > 100 and green[[0, 2]].max() < 60
    assert blue[2] > 200 and blue[:2].max() < 60 and yellow[:2].min() > 200 and yellow[2] < 60
    assert len(set(palette[0])) == 1  # background: grey
    assert titles and "by class name" in titles[-1]
    out = tmp_path / "v.png"  # other class names: the VOC colour map, as before, and said so
    cli_output(
        "segment",
        [rw["img"], "--backbone", "tiny", "--classes", "cat, orange, dog", "--out", str(out), *rw["text"]],
        capsys,
    )
    assert Image.open(out).getpalette()[:9] == benchmarks.voc_palette(4)[1:].reshape(-1).tolist()
    assert "PASCAL VOC" in titles[-1]
