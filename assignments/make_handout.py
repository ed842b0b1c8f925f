"""Generate the course handout from the project itself: the project's own code is the solution.

A few regions of the real code are fenced by one-line comments (the nbgrader / otter style):

    # ASSIGNMENT 2 BEGIN: place the window maps on the canvas (E2)
    ...the solution...
    # ASSIGNMENT 2 END

This script copies the project (the files git tracks: no .venv, runs/, .git, nor untracked files) and replaces the
inside of each fenced region by

    raise NotImplementedError("Assignment 2: place the window maps on the canvas -- see (E2) in the paper and
                               assignments/a2.md")

keeping the markers, the signatures, the docstrings, the comments of the region (shape comments become
`# name: (shape)` lines) and everything outside the regions.  The sheets (assignments/*.md) travel with it.

    python assignments/make_handout.py --out /tmp/handout          # every assignment stubbed
    python assignments/make_handout.py --out /tmp/h2 --only 2      # only assignment 2 (the CI check uses this)
    python assignments/make_handout.py --out /tmp/h2 --only 2.3    # only the 3rd region of assignment 2
    python assignments/make_handout.py --out /tmp/h3 --solved 3    # 1-3 solved, 4.. stubbed (`pytest -m a3` passes)
    python assignments/make_handout.py --list                      # the regions, with their files and lines

Regions are numbered N.k: the k-th region of assignment N, in file-name then line order (see --list).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# ASSIGNMENT (?P<n>\d+) BEGIN: (?P<what>.+?)\s*$")
END = re.compile(r"^(?P<indent>[ \t]*)# ASSIGNMENT (?P<n>\d+) END\s*$")
MARKER = re.compile(r"#\s*ASSIGNMENT\b")
REFERENCE = re.compile(r"\s*\(((?:E\d|Sec\.|Fig\.)[^()]*)\)$")  # the trailing "(E2)" / "(Sec. 4)" of a marker
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
# Instructor-only files: they hold no solution, but students do not need them (and the CI check in
# tests/test_handout.py could not pass in a stubbed copy).
NOT_IN_HANDOUT = {"assignments/make_handout.py", "assignments/INSTRUCTORS.md", "tests/test_handout.py"}


class HandoutError(RuntimeError):
    """Malformed markers or an unusable --out / --only; the message is one sentence."""


@dataclass
class Region:
    path: str  # relative to the project root, '/'-separated
    n: int  # assignment number
    k: int  # 1-based index among the regions of assignment n
    what: str  # the marker's text without the trailing reference
    ref: str | None  # "(E2)", "(Sec. 4)", ... or None
    begin: int  # 0-based line index of the BEGIN marker
    end: int  # 0-based line index of the END marker
    indent: str

    @property
    def label(self) -> str:
        return f"{self.n}.{self.k}"

    def message(self) -> str:
        """The NotImplementedError text of the stub (the CI check looks for it)."""
        if self.ref is None:
            where = f"see assignments/a{self.n}.md"
        elif self.ref.startswith("(E"):
            where = f"see {self.ref} in the paper and assignments/a{self.n}.md"
        else:
            where = f"see {self.ref[1:-1]} of the paper and assignments/a{self.n}.md"
        return f"Assignment {self.n}: {self.what} -- {where}"


# ----------------------------------------------------------------------------------------------------------------
# Which files, which regions
# ----------------------------------------------------------------------------------------------------------------


def project_files(root: Path = ROOT) -> list[str]:
    """The files git tracks (an untracked file, e.g. a student's notes or a scratch copy, never ships); without git,
    a walk of the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    except (OSError, subprocess.CalledProcessError):
        names = []
        for base, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            rel = Path(base).relative_to(root)
            names += [(rel / f).as_posix() for f in files if not f.endswith(".pyc")]
        names.sort()
    return [n for n in names if (root / n).is_file() and not (set(Path(n).parts) & SKIP_DIRS)]


def find_regions(text: str, path: str) -> list[Region]:
    """The fenced regions of one file (k is filled in later); malformed markers are a HandoutError."""
    regions, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        b, e = BEGIN.match(line), END.match(line)
        if b:
            if open_ is not None:
                raise HandoutError(
                    f"{path}:{i + 1}: ASSIGNMENT {b['n']} BEGIN inside the region opened at line "
                    f"{open_.begin + 1}; regions cannot nest."
                )
            what, ref = b["what"], None
            m = REFERENCE.search(what)
            if m:
                what, ref = what[: m.start()].rstrip(), f"({m.group(1)})"
            open_ = Region(path, int(b["n"]), 0, what, ref, i, -1, b["indent"])
        elif e:
            if open_ is None or int(e["n"]) != open_.n or e["indent"] != open_.indent:
                raise HandoutError(
                    f"{path}:{i + 1}: ASSIGNMENT {e['n']} END does not close a BEGIN of the same "
                    f"number and indentation."
                )
            open_.end = i
            regions.append(open_)
            open_ = None
        elif MARKER.search(line) and line.lstrip().startswith("#"):
            raise HandoutError(
                f"{path}:{i + 1}: malformed marker {line.strip()!r}; write "
                f"'# ASSIGNMENT N BEGIN: what (E2)' or '# ASSIGNMENT N END'."
            )
    if open_ is not None:
        raise HandoutError(f"{path}:{open_.begin + 1}: ASSIGNMENT {open_.n} BEGIN has no END.")
    return regions


def all_regions(root: Path = ROOT, files: list[str] | None = None) -> list[Region]:
    """Every region of the project's Python files, numbered N.k in file then line order."""
    regions = []
    for name in files if files is not None else project_files(root):
        if name.endswith(".py") and name not in NOT_IN_HANDOUT:
            regions += find_regions((root / name).read_text(encoding="utf-8"), name)
    counts: dict[int, int] = {}
    for r in regions:
        counts[r.n] = r.k = counts.get(r.n, 0) + 1
    return regions


def parse_only(text: str | None, regions: list[Region], solved: int | None = None) -> list[Region]:
    """--only "2", "2.3" or "1,2.3": the regions to stub (all of them when None); --solved N keeps the solution of
    assignments 1..N and stubs only the later ones."""
    if solved is not None:
        if text:
            raise HandoutError("give --only or --solved, not both.")
        return [r for r in regions if r.n > solved]
    if not text:
        return regions
    chosen = []
    for item in (t.strip() for t in text.split(",")):
        hit = [r for r in regions if item in (str(r.n), r.label)]
        if not hit:
            known = ", ".join(sorted({str(r.n) for r in regions} | {r.label for r in regions}))
            raise HandoutError(f"--only {item!r} names no region; choose from: {known}.")
        chosen += [r for r in hit if r not in chosen]
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Stubbing
# ----------------------------------------------------------------------------------------------------------------


def _assigned_names(text: str) -> dict[int, str]:
    """0-based line -> the target of the assignment statement that spans it ('feats', 'rows, cols', ...)."""
    names = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            name = ", ".join(ast.unparse(t) for t in targets)
            for line in range(node.lineno - 1, node.end_lineno):
                names[line] = name
    return names


def _comments(text: str) -> dict[int, tuple[str, bool]]:
    """0-based line -> (comment text without '#', whether the line is only a comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            own_line = not tok.line[: tok.start[1]].strip()
            out[tok.start[0] - 1] = (tok.string.lstrip("#").strip(), own_line)
    return out


def stub_text(text: str, regions: list[Region], hints: bool = True) -> str:
    """Replace the inside of each region by its comments (if `hints`) and a raise NotImplementedError."""
    lines = text.splitlines(keepends=True)
    names = _assigned_names(text) if hints else {}
    comments = _comments(text) if hints else {}
    for r in sorted(regions, key=lambda r: r.begin, reverse=True):
        kept = []
        for i in range(r.begin + 1, r.end):
            if i not in comments:
                continue
            comment, own_line = comments[i]
            if not own_line and comment.startswith("(") and i in names:  # a shape comment: keep its name
                comment = f"{names[i]}: {comment}"
            kept.append(f"{r.indent}# {comment}\n")
        body = kept + [f"{r.indent}raise NotImplementedError({r.message()!r})\n"]
        lines[r.begin + 1 : r.end] = body
    return "".join(lines)


BANNER = (
    "> **Course handout.** Some functions of this project are left for you to write ({which}); the sheets are "
    "in [`assignments/`](assignments/README.md). Until a part is written, code that reaches it stops with "
    "`NotImplementedError: Assignment N: ...`; check a part with `python -m pytest -m aN -q`.\n\n"
)


def build(
    out: str | os.PathLike,
    only: str | None = None,
    root: Path = ROOT,
    force: bool = False,
    hints: bool = True,
    solved: int | None = None,
) -> list[Region]:
    """Write the handout to `out` (built in a temp folder beside it, then renamed); returns the stubbed regions."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise HandoutError(f"--out '{out}' exists and is not an empty folder; pass --force to replace it.")
        if out == root or root.is_relative_to(out):
            raise HandoutError(f"--out '{out}' would replace the project itself.")
    files = project_files(root)
    regions = all_regions(root, files)
    chosen = parse_only(only, regions, solved)
    by_file: dict[str, list[Region]] = {}
    for r in chosen:
        by_file.setdefault(r.path, []).append(r)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise HandoutError(f"cannot create the handout folder '{out}' ({exc.strerror or exc}).") from exc
    try:
        for name in files:
            if name in NOT_IN_HANDOUT:
                continue
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dst)
            if name in by_file:
                text = stub_text((root / name).read_text(encoding="utf-8"), by_file[name], hints)
                compile(text, name, "exec")  # a stub that does not parse is our bug
                dst.write_text(text, encoding="utf-8")
            elif name == "README.md":
                which = "assignments " + (", ".join(str(n) for n in sorted({r.n for r in chosen})) or "none")
                text = (root / name).read_text(encoding="utf-8")
                head, _, rest = text.partition("\n\n")
                dst.write_text(f"{head}\n\n{BANNER.format(which=which)}{rest}", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate the course handout: copy the project and replace every "
        "'# ASSIGNMENT N BEGIN/END' region by a NotImplementedError stub."
    )
    parser.add_argument("--out", help="folder to write the handout to (must not exist or be empty)")
    parser.add_argument("--only", help="stub only these: '2' (assignment 2), '2.3' (its 3rd region), '1,2'")
    parser.add_argument(
        "--solved", type=int, metavar="N", help="keep the solutions of assignments 1..N, stub the later ones"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--no-hints", action="store_true", help="drop the comments inside the stubbed regions")
    parser.add_argument("--list", action="store_true", help="print the regions and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            for r in sorted(all_regions(), key=lambda r: (r.n, r.k)):
                print(f"{r.label:>5}  {r.path}:{r.begin + 1}-{r.end + 1}  {r.message()}")
            return
        if not args.out:
            raise HandoutError("give --out DIR (or --list).")
        chosen = build(args.out, args.only, force=args.force, hints=not args.no_hints, solved=args.solved)
    except HandoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    stubbed = ", ".join(r.label for r in sorted(chosen, key=lambda r: (r.n, r.k)))
    print(f"wrote the handout to {Path(args.out).resolve()} ({len(chosen)} regions stubbed: {stubbed})")
    print(f"  cd {args.out} && python -m pytest -m a1 -q      # check assignment 1; sheets in assignments/")


if __name__ == "__main__":
    main()
