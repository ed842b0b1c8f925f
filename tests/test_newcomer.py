"""What a newcomer trips over (issue 21, part 3), tried as a new user would, at the command line: --threads in every
CLI, a checkpoint's evaluate.py mode said explicitly, the segment palette of colour-named classes, one size
convention (H x W), help texts, failing fast offline, and results on random weights saying so."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
