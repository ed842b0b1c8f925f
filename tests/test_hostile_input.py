"""Hostile input, part 3 (issue 21), the rest of sections 1 and 2: values that silently meant something else, API
inputs in the wrong range, files that are not what they claim, sizes that can never fit, signals during start-up,
and a student.pt written again bit-exactly.  Each test failed on the code before it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import benchmarks  # noqa: E402
import checkpoints  # noqa: E402
import distill  # noqa: E402
import evaluate  # noqa: E402
import segment  # noqa: E402
import stitch  # noqa: E402
import student  # noqa: E402
import teacher  # noqa: E402
import textcache  # noqa: E402
from cli import UserError  # noqa: E402

TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny():
    return student.load_backbone("tiny", None)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(path)
    return path


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def refused(main, argv, capsys) -> str:
    """Run a CLI's main that must refuse its input: exit 2 and exactly one `error:` line (returned)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = error_lines(capsys)
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_cli(argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------------------------
# Values that silently meant something else
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-40"])
def test_segment_refuses_a_logit_scale_that_is_not_finite_and_positive(photo, tmp_path, capsys, scale):
    argv = [photo, *TINY, "--classes", "a, b", "--text-cache", "none", "--out", tmp_path / "m.png"]
    assert "--logit-scale" in refused(segment.main, argv + ["--logit-scale", scale], capsys)
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(UserError, match="logit_scale"):
        segment.SegmentSettings(logit_scale=float(scale))  # the API, as the flag


@pytest.mark.parametrize("scale", ["nan", "-inf", "0", "-1"])
def test_evaluate_refuses_a_logit_scale_that_is_not_finite_and_positive(tmp_path, capsys, scale):
    voc = benchmarks.make_synthetic("voc20", tmp_path / "voc", num_images=1)
    argv = ["--dataset", "voc20", "--root", voc, *TINY, "--out", tmp_path / "r.json", "--logit-scale", scale]
    assert "--logit-scale" in refused(evaluate.main, argv, capsys)
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# API inputs in the wrong range
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uint8", "float 0..255", "nan"])
def test_normalize_and_segment_refuse_images_outside_0_1(tiny, kind):
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    x = x if kind == "uint8" else x.float() if kind == "float 0..255" else torch.full((1, 3, 32, 32), float("nan"))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        tiny.normalize(x)
    text = segment.text_embeddings(tiny, [["a"], ["b"]], templates=["{}"])
    with pytest.raises(UserError, match=r"segment\(\) takes .*\[0, 1\]"):
        segment.segment(tiny, x, text)
    ok = torch.rand(1, 3, 32, 32)  # still accepted, also with a resize's small bicubic overshoot
    assert torch.equal(tiny.normalize(ok), (ok - tiny._mean) / tiny._std)
    tiny.normalize(ok * 1.1 - 0.05)


def test_encode_text_takes_one_string_as_one_prompt(tiny):
    with torch.no_grad():
        one, listed = tiny.encode_text("a photo of a cat."), tiny.encode_text(["a photo of a cat."])
    assert one.shape == (1, tiny.dim) and torch.equal(one, listed)  # was 17 prompts, one per character
    for bad in ([1, 2], None, 3):
        with pytest.raises(UserError, match="encode_text takes a list of str"):
            tiny.encode_text(bad)


# ----------------------------------------------------------------------------------------------------------------
# Template and class files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a {0} {1}.", "{x}", "a photo", "a {} and a {}", "a {} {"])
def test_a_bad_template_line_is_one_error_naming_the_file_and_line(photo, tmp_path, capsys, bad):
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a photo of a {{}}.\n\n{bad}\n")
    argv = [photo, *TINY, "--classes", "a, b", "--text-cache", "none", "--templates", templates]
    err = refused(segment.main, argv + ["--out", tmp_path / "m.png"], capsys)
    assert str(templates) in err and "line 3" in err and repr(bad) in err
    (tmp_path / "ok.txt").write_text("a {{curly}} {}\n")
    assert benchmarks.read_templates(tmp_path / "ok.txt") == ["a {{curly}} {}"]  # literal braces are fine


@pytest.mark.parametrize("flag", ["--class-file", "--templates"])
@pytest.mark.parametrize("content", [b"caf\xe9; chat\n", bytes(range(256)), b"a {}\x00\n"])
def test_class_and_template_files_that_are_not_utf8_text_are_one_error_line(photo, tmp_path, capsys, flag, content):
    path = tmp_path / "file.txt"
    path.write_bytes(content)
    argv = [photo, *TINY, "--text-cache", "none", "--out", tmp_path / "m.png", flag, path]
    err = refused(segment.main, argv + ([] if flag == "--class-file" else ["--classes", "a, b"]), capsys)
    assert str(path) in err and ("not UTF-8" in err or "binary" in err)


# ----------------------------------------------------------------------------------------------------------------
# Files that are not what they claim; sizes that can never fit
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cli_name", ["files.py", "segment.py"])
def test_a_fifo_given_as_an_image_is_refused_not_waited_on(tmp_path, cli_name):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    extra = [] if cli_name == "files.py" else [*TINY, "--classes", "a, b", "--out", tmp_path / "m.png"]
    try:
        done = run_cli([cli_name, fifo, *extra], timeout=600)  # the old reader blocked here forever
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cli_name} blocked on a FIFO")
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1 and "not a regular file" in err[0], done.stderr


@pytest.mark.parametrize("kind", ["legacy pickle", "sparse tensor", "meta tensor"])
def test_pretrained_that_is_not_a_weights_file_is_one_error_line(tmp_path, kind):
    path = tmp_path / "weights.pt"
    if kind == "legacy pickle":
        import pickle

        path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    else:
        state = checkpoints.open_clip_model(checkpoints.BACKBONES["tiny"], None).state_dict()
        key = "visual.trunk.blocks.0.attn.qkv.weight"
        state[key] = state[key].to_sparse() if kind == "sparse tensor" else torch.empty(state[key].shape, device="meta")
        torch.save(state, path)
    done = run_cli(["student.py", "--backbone", "tiny", "--device", "cpu", "--sizes", "32x32", "--pretrained", path])
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err


@pytest.mark.parametrize("name", ["tiny", "dinov3-tiny"])
def test_a_folder_given_as_weights_is_named_a_folder(tmp_path, name):
    with pytest.raises(UserError, match="is a folder, not a file"):
        student.load_backbone(name, pretrained=str(tmp_path))


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(name=["tiny"]), "unknown backbone"),
        (dict(name="tiny", pretrained=3.5), "pretrained must be"),
        (dict(name="tiny", device=5), "device must be"),
        (dict(name="tiny", device="bogus"), "unknown device"),
        (dict(name="tiny", checkpoint=7), "checkpoint must be"),
    ],
)
def test_load_backbone_given_a_wrong_type_is_one_sentence(args, match):
    with pytest.raises(UserError, match=match):
        student.load_backbone(**dict(dict(pretrained=None), **args))


def test_a_text_cache_of_another_width_is_recomputed(tiny, tmp_path, capsys):
    good, calls = torch.randn(2, tiny.dim), []
    compute = lambda: calls.append(1) or good  # noqa: E731
    textcache._MEMORY_CACHE.clear()
    textcache.cached(tiny, ["a", "b"], ["{}"], tmp_path, compute)
    (path,) = tmp_path.glob("*.pt")
    torch.save({"queries": ["a", "b"], "templates": ["{}"], "embeddings": torch.randn(2, tiny.dim + 64)}, path)
    textcache._MEMORY_CACHE.clear()
    emb = textcache.cached(tiny, ["a", "b"], ["{}"], tmp_path, compute)
    assert len(calls) == 2 and torch.equal(emb, good)  # was used as it was: a shape error in the first matmul
    assert f"C = {tiny.dim}" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["student", "teacher", "bench", "segment"])
def test_a_size_that_can_never_fit_is_refused_with_its_estimate(tool, photo, tmp_path, capsys):
    argv = {
        "student": (student.main, [*TINY, "--sizes", "64x64,100000x100000"]),
        "teacher": (teacher.main, [*TINY, "--size", "100000x100000"]),
        "bench": (bench.main, [*TINY, "--sizes", "100000x100000", "--no-teacher"]),
        "segment": (segment.main, [photo, *TINY, "--classes", "a, b", "--text-cache", "none", "--short-side",
                                   "100000", "--long-side", "0", "--out", tmp_path / "m.png"]),
    }[tool]  # fmt: skip
    err = refused(*argv, capsys)
    assert "100000x" in err and "GiB" in err and "free" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--patch", "0"], "--patch must be at least 1"),
        (["--stride", "-3"], "--stride must be at least 1"),
        (["--window", "0"], "--window must be at least 1"),
        (["--height", "0"], "--height must be at least 1"),
        (["--patch", "7"], "multiple of --patch"),
        (["--stride", "600"], "at most the window"),
    ],
)
def test_stitch_numbers_are_checked(argv, match, capsys):
    assert match in refused(stitch.main, argv, capsys)


def test_stitch_refuses_a_canvas_that_cannot_fit_with_its_estimate(capsys):
    """17 million windows of 512 px on a 100000^2 image: refused before a window map is allocated."""
    err = refused(stitch.main, ["--height", "100000", "--width", "100000"], capsys)
    assert "stitching 17197609 windows needs at least" in err and "GiB" in err and "free" in err  # 4147 x 4147
    err = refused(stitch.main, ["--height", str(10**12), "--width", "512"], capsys)  # no list of 4e10 starts built
    assert "stitching 41666666647 windows needs at least" in err


@pytest.mark.parametrize(
    "module, raised, words",
    [
        (
            "PIL",
            "ModuleNotFoundError(\"No module named 'PIL'\", name='PIL')",
            "is not installed (No module named 'PIL')",
        ),
        ("torch", "ModuleNotFoundError(\"No module named 'torch'\", name='torch')", "is not installed"),
        ("PIL", "ImportError(\"cannot import name 'ImageOps' from 'PIL'\", name='PIL')", "is too old or broken"),
    ],
)
def test_a_missing_package_is_one_error_line_and_exit_2(tmp_path, module, raised, words):
    """A CLI run by a Python without the requirements (its venv not active), or with a too old one: one line."""
    (tmp_path / module).mkdir()
    (tmp_path / module / "__init__.py").write_text(f"raise {raised}\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path))  # this fake package, found first, fails as a missing one does
    proc = subprocess.run([sys.executable, "segment.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), proc.stderr
    assert words in err[0] and "pip install -r requirements.txt" in err[0]


def test_a_missing_module_of_the_project_itself_keeps_its_traceback(tmp_path):
    """A broken import inside the project is a bug to be seen, not a missing requirement."""
    (tmp_path / "PIL").mkdir()
    (tmp_path / "PIL" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'cli'\", name='cli')\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "segment.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "error: a required package" not in proc.stderr


@pytest.mark.parametrize("unbuffered", [True, False])
@pytest.mark.parametrize("argv, rc", [(["--height", "512"], 141), (["--height", "100000", "--width", "100000"], 2)])
def test_a_closed_stdout_pipe_is_a_quiet_exit(unbuffered, argv, rc):
    """`python stitch.py | head -0`: the reader is gone before the first line.  A run that ends well is exit 141
    (SIGPIPE), one that ends in an error keeps its `error:` line and exit 2; never a BrokenPipeError, whether
    Python buffers stdout (as it does for a pipe) or not (PYTHONUNBUFFERED, set on some machines)."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    proc = subprocess.Popen(
        [sys.executable, "stitch.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()
    err = proc.stderr.read().decode().splitlines()
    assert proc.wait(timeout=300) == rc and len(err) == (rc == 2) and all(e.startswith("error:") for e in err), err


# ----------------------------------------------------------------------------------------------------------------
# Signals during start-up
# ----------------------------------------------------------------------------------------------------------------

CLIS = [
    "student",
    "teacher",
    "stitch",
    "segment",
    "evaluate",
    "distill",
    "bench",
    "figures",
    "miniature",
]  # not files.py or reproduce.py: they answer --help without importing torch, so there is no import to interrupt


def importing_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see the imports under way")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("name", CLIS)
def test_a_signal_during_the_imports_is_exit_130_without_traceback(name, sig):
    proc = subprocess.Popen(
        [sys.executable, f"{name}.py", "--help"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)  # torch's libraries are loaded, its Python side and open_clip / timm still to come
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err and b"interrupted" in err, (proc.returncode, err)
    assert b"usage:" not in out  # it was interrupted during the imports, not after


# ----------------------------------------------------------------------------------------------------------------
# A regenerated student.pt
# ----------------------------------------------------------------------------------------------------------------

BASE = [*TINY, "--num-heldout", "1", "--eval-sizes", "192"]


def test_a_deleted_student_pt_is_written_again_as_the_kept_epoch_bit_exactly(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        with Image.open(os.path.join(ROOT, "assets", f"{name}.jpg")) as im:
            im.convert("RGB").resize((192, 160) if i % 2 else (160, 192), Image.BILINEAR).save(images / f"{i}.png")
    out = tmp_path / "run"
    argv = [*BASE, "--images", images, "--out", out]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distill.main([str(a) for a in argv + ["--epochs", "1"]])
        kept = (out / "student.pt").read_bytes()  # epoch 1
        real = distill.train_step
        monkeypatch.setattr(distill, "train_step", lambda *a, **k: real(*a, **k) * 1000)  # epoch 2: a worse loss
        distill.main([str(a) for a in argv + ["--epochs", "2", "--resume"]])
        assert (out / "student.pt").read_bytes() == kept  # epoch 2 trained (resume.pt) but not kept
        monkeypatch.setattr(distill, "train_step", real)
        os.remove(out / "student.pt")
        distill.main([str(a) for a in argv + ["--epochs", "2", "--resume"]])
    finally:
        torch.set_num_threads(old)
    assert (out / "student.pt").read_bytes() == kept  # was written from epoch 2's weights
    shutil.rmtree(out)
