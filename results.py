"""The results JSON of evaluate.py (not a part of the paper): where it goes, the settings and the modes it records
(`parse_modes`: --modes; `check_checkpoint`: which of them run the --checkpoint), resuming a run from it, and reading
it back (reproduce.py).

    {"settings": {dataset, root, num_images, backbone, pretrained, checkpoint, logit_scale, prob_thd, area_thd,
                  short_side, long_side, protocol, amp, templates, [refine, affinity, upsample, anyup_weights,
                  ...: refine.run_record, only when not the defaults]},
     "classes": [K names],
     "modes": {label: {images_done, seconds, seconds_per_image, miou, per_class_iou, confusion, ...}}}

A rerun with the same settings continues every mode from its last saved image (the file is rewritten atomically
every --save-every images); a rerun with other settings starts over.  Weights and checkpoints are recorded by
their content (sha1); the file is marked as ours (`RESULTS_FORMAT`): evaluate.py overwrites no file without it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from benchmarks import settings_for
from checkpoints import weights_sha1
from cli import UserError, display_name
from files import check_writable, content_sha1, lock, read_json
from naflex import DEFAULT_PATCHES

RESULTS_FORMAT = "spar-evaluate-results"  # the marker by which evaluate.py knows a results file as its own

HERE = Path(__file__).resolve().parent


def file_stamp(path: str | None) -> tuple[str, int, int] | None:
    """A file's identity for resuming (evaluate.py's settings, reproduce.py's finished runs): absolute path, size and
    modification time in whole seconds; None when it is not a file."""
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, int(st.st_mtime)


def out_path(args) -> Path:
    """--out, else runs/eval/<dataset>-<backbone>[-<checkpoint stem>][-lposs|-lposs+[-kK]][-anyup][-pN].json
    (-pN: a NaFlex patch budget other than 256, -pall for 'all')."""
    tag = f"-{Path(args.checkpoint).stem}" if args.checkpoint else ""
    post = (getattr(args, "refine", "none"), getattr(args, "upsample", "bilinear"))  # refine.py's flags
    tag += "".join(f"-{v}" for v in post if v not in ("none", "bilinear"))  # not the file of the plain run
    k = getattr(args, "lposs_k", 400)  # refine.LPOSS_K, the reference k (refine.py is imported after this file)
    tag += f"-k{k}" if post[0] != "none" and k != 400 else ""  # nor the reference k's
    budget = getattr(args, "naflex_patches", DEFAULT_PATCHES)
    tag += f"-p{budget or 'all'}" if args.backbone.endswith("naflex-b16") and budget != DEFAULT_PATCHES else ""
    return Path(args.out) if args.out else HERE / "runs" / "eval" / f"{args.dataset}-{args.backbone}{tag}.json"


def run_settings(args, num_images: int, templates: list[str], overrides: dict) -> dict:
    """The run's settings as the results file records them: the (backbone, dataset)'s, with the flags' `overrides`."""
    ckpt = content_sha1(args.checkpoint) if args.checkpoint else None  # a missing one: load_backbone says so
    return dict(
        dataset=args.dataset,
        root=os.path.abspath(args.root),
        num_images=num_images,
        backbone=args.backbone,
        pretrained=args.pretrained,
        pretrained_sha1=weights_sha1(args.pretrained),  # the weights' content, hashed once per run
        checkpoint=f"{os.path.abspath(args.checkpoint)}:{ckpt}" if ckpt else (args.checkpoint or None),
        **settings_for(args.dataset, args.backbone, **overrides),
        protocol=args.protocol,
        amp=args.amp,
        templates=hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16],
        **({"naflex_patches": getattr(args, "naflex_patches", None)} if args.backbone.endswith("naflex-b16") else {}),
        **({"window": args.window} if getattr(args, "window", None) else {}),  # the teacher's K, when not native
    )


def parse_modes(text: str) -> list[tuple[str, str, int]]:
    """ "single,slide24,slidelogit24,pretrained,student" -> [(label, kind, stride)], kind in single | pretrained |
    student | slide | slidelogit (slideN averages features over windows, slidelogitN cosine logits)."""
    modes = []
    for m in (t.strip() for t in text.split(",")):
        match = re.fullmatch(r"(slidelogit|slide)(\d*)", m)
        if m in ONE_PASS:
            modes.append((m, m, 0))
        elif match:
            kind, stride = match.group(1), int(match.group(2) or 24)
            if stride <= 0:
                raise UserError(f"mode '{m}': the stride must be positive")
            modes.append((f"{kind}{stride}", kind, stride))
        elif m:
            raise UserError(
                f"unknown mode '{m}'; use single, pretrained, student, slideN or slidelogitN (N = stride in px, e.g. "
                f"slide24)"
            )
    if not modes:
        raise UserError("no modes given; e.g. --modes single,slide24")
    return modes


ONE_PASS = ("single", "pretrained", "student")  # the modes of (E3), one pass over the whole image
STUDENT = ("single", "student")  # the modes that run the --checkpoint (single: when one is given)


def check_checkpoint(modes, checkpoint):
    """--checkpoint given, but no mode runs it, or a `student` mode without one: one sentence."""
    kinds = {kind for _, kind, _ in modes}
    if "student" in kinds and not checkpoint:
        raise UserError("mode 'student' evaluates a --checkpoint; give one (student.pt from distill.py).")
    if checkpoint and not kinds & set(STUDENT):
        raise UserError(
            f"--checkpoint is given but no mode in --modes {','.join(m for m, _, _ in modes)} runs it; add the "
            f"mode 'student' (e.g. --modes pretrained,slide24,student), or leave --checkpoint out."
        )


def ours(obj) -> bool:
    """A results file of evaluate.py: its marker, or (written before the marker) exactly our three keys."""
    return isinstance(obj, dict) and (
        obj.get("format") == RESULTS_FORMAT or set(obj) == {"settings", "classes", "modes"}
    )


def claim(out: Path):
    """Before any work: `out` can be written, is not the plot's path, and holds nothing but our own results; then
    locked against a second evaluate.py on it (the returned file holds the lock while it stays open)."""
    if out.suffix.lower() == ".png":
        raise UserError(f"--out '{display_name(out)}' is where the plot goes; give the results a .json name.")
    check_writable(out)
    if os.path.lexists(out) and not ours(read_json(out)):
        raise UserError(
            f"--out '{display_name(out)}' exists and is not a results file of evaluate.py; it is not overwritten, "
            f"give another --out."
        )
    busy = f"another evaluate.py run is writing '{display_name(out)}'; wait for it to finish or give another --out."
    return lock(str(out.parent), busy, f".{out.name}.lock")


def resumed(out: Path, record: dict, no_resume: bool = False) -> dict:
    """`record` (marked as ours) with the modes of `out` when it holds a run with the same settings (a note when it
    holds others)."""
    record = {"format": RESULTS_FORMAT, **record}
    old = read_json(out) if out.is_file() and not no_resume else None
    if old is None:
        return record
    if not ours(old) or not isinstance(old.get("modes", {}), dict):
        raise UserError(
            f"--out '{out}' holds JSON that is not a results file of evaluate.py (a {type(old).__name__}); "
            f"give another --out or remove it."
        )
    if old.get("settings") == record["settings"]:
        for label, state in old.get("modes", {}).items():
            problem = state_problem(state, len(record["classes"]), record["settings"]["num_images"])
            if problem:
                raise UserError(
                    f"--out '{display_name(out)}' holds a damaged record of mode '{label}' ({problem}); pass "
                    f"--no-resume to start over, or remove the file."
                )
        record["modes"] = old.get("modes", {})
        print(f"resuming from {display_name(out)}")
    elif old:
        print(f"note: {display_name(out)} holds results for other settings; starting over (it will be overwritten).")
    return record


def state_problem(state, K: int, num_images: int) -> str:
    """'' when a saved mode state can be resumed: images_done in 0..num_images, seconds finite >= 0, a K x K
    confusion matrix of counts >= 0, out_of_range_pixels a count; else what is wrong (one phrase)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a record"
    done, seconds, bad = state.get("images_done", 0), state.get("seconds", 0.0), state.get("out_of_range_pixels", 0)
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= num_images:
        return f"images_done {done!r} is not a count in 0..{num_images}"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        return f"seconds {seconds!r} is not a finite number >= 0"
    if isinstance(bad, bool) or not isinstance(bad, int) or bad < 0:
        return f"out_of_range_pixels {bad!r} is not a count"
    conf = state.get("confusion")
    if conf is None and done == 0:
        return ""
    rows_ok = isinstance(conf, list) and len(conf) == K and all(isinstance(r, list) and len(r) == K for r in conf)
    if not rows_ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for r in conf for v in r):
        return f"its confusion matrix is not {K} x {K} counts"
    return ""


def complete_modes(path: Path) -> dict:
    """{mode: mIoU %} of the modes of a results file that covered the whole split."""
    try:
        record = read_json(path)
        total = record["settings"]["num_images"]
        return {
            m: 100 * r["miou"]
            for m, r in record["modes"].items()
            if r.get("images_done", 0) >= total and r.get("miou") is not None
        }
    except (KeyError, TypeError, AttributeError):
        return {}
