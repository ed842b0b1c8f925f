"""The textbook layout, checked: line budgets of the method files, short functions, imports in one direction,
and ruff's lint and format check (line length 120, `pyproject.toml`)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Whole-file line budgets of the method files (the paper's method first, plumbing in side files).
BUDGET = {
    "stitch.py": 160,
    "teacher.py": 180,
    "student.py": 360,
    "distill.py": 480,
    "segment.py": 400,
    "evaluate.py": 300,
}
# The import order: a file may import only files listed before it (lazy imports inside functions included).
# Side files first, then the method files in the paper's order, then the tools, which no method file imports.
ORDER = [
    "_startup",
    "cli",
    "files",
    "stitch",
    "checkpoints",
    "dinotxt",
    "naflex",
    "student",
    "teacher",
    "benchmarks",
    "pictures",
    "textcache",
    "results",
    "lposs",
    "anyup",
    "refine",
    "outputs",
    "segment",
    "evaluate",
    "runfolder",
    "distill",
    "bench",
    "reproduce",
    "figures",
    "diagnose",
    "miniature",
    "hubconf",
]
METHOD = {"stitch", "student", "teacher", "segment", "evaluate", "distill"}
MAX_FUNCTION_LINES = 60


def top_level_files() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in top_level_files()}
    return {n for n in names if n in local} - {path.stem}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_method_file_within_its_line_budget(name):
    n = len((ROOT / name).read_text(encoding="utf-8").splitlines())
    assert n <= BUDGET[name], f"{name} has {n} lines, its budget is {BUDGET[name]}: move plumbing to a side file"


def test_no_function_longer_than_60_lines():
    long = []
    for path in top_level_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}() {n} lines")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_imports_go_one_way():
    files = {p.stem: p for p in top_level_files()}
    unknown = sorted(set(files) - set(ORDER))
    assert not unknown, f"place {unknown} in tests/test_layout.py's ORDER"
    wrong = []
    for name, path in files.items():
        for dep in project_imports(path):
            if ORDER.index(dep) > ORDER.index(name):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the layer order (" + " < ".join(ORDER) + "): " + "; ".join(sorted(wrong))


def test_method_files_import_no_tool():
    tools = set(ORDER[ORDER.index("bench") :])
    bad = [f"{m} imports {d}" for m in METHOD for d in project_imports(ROOT / f"{m}.py") if d in tools]
    assert not bad, bad


def _ruff(*args) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert exe, "ruff is not installed: pip install -r requirements.txt"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint():
    res = _ruff("check", "--no-cache", ".")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


def test_ruff_format():
    res = _ruff("format", "--check", "--no-cache", ".")
    assert res.returncode == 0, "run `ruff format .`:\n" + res.stdout[-3000:] + res.stderr[-1000:]
