"""CI check of the course handout (assignments/): the autograder cannot be fooled.

For every `# ASSIGNMENT N BEGIN/END` region of the code, a handout is generated with ONLY that region stubbed
(`make_handout --only N`, or `--only N.k` when assignment N has several regions) and the assignment's tests
(`pytest -m aN`) are run there in a subprocess: they must FAIL, with that region's NotImplementedError message.
So every region is exercised by its marker's tests and a region whose tests pass on the stub fails CI.  That the
same tests PASS on the project (the solution) is checked by the normal suite run.  The fully stubbed handout must
still import, answer `--help` on every CLI, and stop with an assignment's message where the quickstart hits a stub.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_handout", ROOT / "assignments" / "make_handout.py")
make_handout = sys.modules["make_handout"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_handout)

REGIONS = make_handout.all_regions()
NUMBERS = sorted({r.n for r in REGIONS})
# the README's offline quickstart (`teacher.py --backbone tiny --image ...`) on a smaller image: same code path
QUICKSTART = ["--backbone", "tiny", "--size", "128x256", "--stride", "64"]
# one torch thread per subprocess: the models are tiny, and threads only fight over a shared 2-core CI machine
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", SPAR_TEXT_CACHE="none", OMP_NUM_THREADS="1")


def _only_labels():
    """`--only N` where assignment N has one region; `--only N.k` for each region otherwise."""
    labels = []
    for n in NUMBERS:
        mine = [r for r in REGIONS if r.n == n]
        labels += [str(n)] if len(mine) == 1 else [r.label for r in mine]
    return labels


def marked_test_files(n: int) -> list[str]:
    """The test files that use marker aN (passing only them keeps each subprocess's collection short)."""
    pattern = re.compile(rf"pytest\.mark\.a{n}\b")
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != "test_handout.py" and pattern.search(p.read_text(encoding="utf-8"))
    )


def run(args, cwd, timeout=300):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_markers_cover_six_assignments_with_sheets_and_graders():
    assert NUMBERS == list(range(1, len(NUMBERS) + 1)) and len(NUMBERS) >= 6, (
        f"assignments must be numbered 1..N with N >= 6, found {NUMBERS}"
    )
    ini = (ROOT / "pytest.ini").read_text(encoding="utf-8")
    for n in NUMBERS:
        assert (ROOT / "assignments" / f"a{n}.md").is_file(), f"assignment {n} has no sheet assignments/a{n}.md"
        assert re.search(rf"^\s+a{n}:", ini, re.M), f"marker a{n} is not registered in pytest.ini"
        assert marked_test_files(n), f"no test carries the marker a{n}"
    index = (ROOT / "assignments" / "README.md").read_text(encoding="utf-8")
    assert all(f"a{n}.md" in index for n in NUMBERS) and "project.md" in index


def test_marker_parser_refuses_malformed_regions():
    good = "def f():\n    # ASSIGNMENT 1 BEGIN: x (E1)\n    return 1  # (n, k)\n    # ASSIGNMENT 1 END\n"
    (r,) = make_handout.find_regions(good, "f.py")
    assert (r.n, r.what, r.ref, r.begin, r.end) == (1, "x", "(E1)", 1, 3)
    stub = make_handout.stub_text(good, [r])
    assert "raise NotImplementedError('Assignment 1: x -- see (E1) in the paper and assignments/a1.md')" in stub
    assert "return 1" not in stub and "# ASSIGNMENT 1 END" in stub
    for bad, why in [
        ("# ASSIGNMENT 1 BEGIN: x\n", "has no END"),
        ("# ASSIGNMENT 2 END\n", "does not close"),
        ("# ASSIGNMENT 1 BEGIN: x\n# ASSIGNMENT 2 END\n", "does not close"),
        ("# ASSIGNMENT 1 BEGIN: x\n# ASSIGNMENT 1 BEGIN: y\n", "cannot nest"),
        ("# ASSIGNMENT 1 BEGINS x\n", "malformed"),
    ]:
        with pytest.raises(make_handout.HandoutError, match=why):
            make_handout.find_regions(bad, "f.py")


def test_file_list_without_git_skips_environments_and_runs(tmp_path, monkeypatch):
    for name in ("a.py", "assets/x.jpg", ".venv/lib/y.py", "runs/r/student.pt", "sub/__pycache__/z.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")

    def no_git(*args, **kwargs):
        raise OSError("git not found")

    monkeypatch.setattr(make_handout.subprocess, "run", no_git)
    assert make_handout.project_files(tmp_path) == ["a.py", "assets/x.jpg"]


def test_solved_stubs_only_the_later_assignments_and_git_untracked_files_stay_out(tmp_path):
    later = make_handout.parse_only(None, REGIONS, solved=3)
    assert later and {r.n for r in later} == {n for n in NUMBERS if n > 3}
    assert make_handout.parse_only(None, REGIONS, solved=max(NUMBERS)) == []
    with pytest.raises(make_handout.HandoutError, match="not both"):
        make_handout.parse_only("2", REGIONS, solved=1)
    # only the files git tracks ship: a student's scratch file (untracked, not ignored) stays out
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.py").write_text("from tests.reference import starts_reference\n")
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "a.py"], cwd=tmp_path, check=True)
    assert make_handout.project_files(tmp_path) == ["a.py"]


@pytest.mark.parametrize("only", _only_labels())
def test_each_region_is_graded_by_its_tests(only, tmp_path):
    out = tmp_path / "handout"
    (region, *rest) = make_handout.build(out, only=only)
    assert not rest or only == str(region.n)
    n = region.n
    proc = run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", f"a{n}", *marked_test_files(n)],
        cwd=out,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 1, (
        f"`pytest -m a{n}` on a handout with only {only} stubbed must FAIL (exit 1), "
        f"got exit {proc.returncode}: the region's tests do not exercise it.\n{tail}"
    )
    expected = [r.message() for r in make_handout.parse_only(only, REGIONS)]
    assert any(m in proc.stdout for m in expected), (
        f"`pytest -m a{n}` failed, but not with the stub's message {expected[0]!r}:\n{tail}"
    )


def test_cli_writes_a_fully_stubbed_handout_that_still_runs(tmp_path):
    out = tmp_path / "handout"
    proc = run([sys.executable, "assignments/make_handout.py", "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (out / "assignments" / "a1.md").is_file() and (out / "assets" / "astronaut.jpg").is_file()
    assert not (out / "tests" / "test_handout.py").exists() and not (out / ".git").exists()
    assert "Course handout" in (out / "README.md").read_text(encoding="utf-8")
    for r in REGIONS:
        text = (out / r.path).read_text(encoding="utf-8")
        assert r.message() in text, f"{r.path}: the stub of {r.label} is missing"
    # every CLI imports and answers --help, in one interpreter
    clis = sorted(p.name for p in out.glob("*.py") if "__main__" in p.read_text(encoding="utf-8"))
    assert {"stitch.py", "student.py", "teacher.py", "segment.py", "evaluate.py", "distill.py"} <= set(clis)
    script = (
        "import contextlib, io, runpy, sys\n"
        f"for f in {clis!r}:\n"
        "    sys.argv = [f, '--help']\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(io.StringIO()):\n"
        "            runpy.run_path(f, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (f, e.code)\n"
        "print('all --help ok')\n"
    )
    proc = run([sys.executable, "-c", script], cwd=out)
    assert "all --help ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the quickstart stops at the first stub it reaches, with that assignment's message
    proc = run([sys.executable, "teacher.py", *QUICKSTART], cwd=out)
    assert proc.returncode != 0 and re.search(r"NotImplementedError: Assignment \d+: ", proc.stderr), proc.stderr[
        -2000:
    ]
    # an unknown assignment is one sentence and exit 2
    proc = run([sys.executable, "assignments/make_handout.py", "--out", str(tmp_path / "x"), "--only", "99"], cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_quickstart_runs_where_no_stub_is_reached(tmp_path):
    # With only the last assignment (segmentation and mIoU) stubbed, the offline quickstart (teacher vs single
    # pass, here on a small image to keep CI short) runs.
    out = tmp_path / "handout"
    make_handout.build(out, only=str(max(NUMBERS)))
    proc = run([sys.executable, "teacher.py", *QUICKSTART], cwd=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
