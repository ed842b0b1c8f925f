"""The results JSON of evaluate.py (not a part of the paper): where it goes, the settings it records, resuming a run
from it, and reading it back (reproduce.py).

    {"settings": {dataset, root, num_images, backbone, pretrained, checkpoint, logit_scale, prob_thd, area_thd,
                  short_side, long_side, protocol, amp, templates},
     "classes": [K names],
     "modes": {label: {images_done, seconds, seconds_per_image, miou, per_class_iou, confusion, ...}}}

A rerun with the same settings continues every mode from its last saved image (the file is rewritten atomically
every --save-every images); a rerun with other settings starts over.  A checkpoint is recorded by `file_stamp`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from benchmarks import settings_for
from cli import UserError, display_name
from files import read_json

HERE = Path(__file__).resolve().parent


def file_stamp(path: str | None) -> tuple[str, int, int] | None:
    """A file's identity for resuming (evaluate.py's settings, reproduce.py's finished runs): absolute path, size and
    modification time in whole seconds; None when it is not a file."""
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, int(st.st_mtime)


def out_path(args) -> Path:
    """--out, else runs/eval/<dataset>-<backbone>[-<checkpoint stem>].json."""
    tag = f"-{Path(args.checkpoint).stem}" if args.checkpoint else ""
    return Path(args.out) if args.out else HERE / "runs" / "eval" / f"{args.dataset}-{args.backbone}{tag}.json"


def run_settings(args, num_images: int, templates: list[str], overrides: dict) -> dict:
    """The run's settings as the results file records them: the (backbone, dataset)'s, with the flags' `overrides`."""
    stamp = file_stamp(args.checkpoint)  # a missing checkpoint is reported by load_backbone
    return dict(
        dataset=args.dataset,
        root=os.path.abspath(args.root),
        num_images=num_images,
        backbone=args.backbone,
        pretrained=args.pretrained,
        checkpoint=":".join(str(v) for v in stamp) if stamp else (args.checkpoint or None),
        **settings_for(args.dataset, args.backbone, **overrides),
        protocol=args.protocol,
        amp=args.amp,
        templates=hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16],
    )


def resumed(out: Path, record: dict, no_resume: bool = False) -> dict:
    """`record` with the modes of `out` when it holds a run with the same settings (a note when it holds others)."""
    old = read_json(out) if out.is_file() and not no_resume else None
    if old is None:
        return record
    if not isinstance(old, dict) or not isinstance(old.get("modes", {}), dict):
        raise UserError(
            f"--out '{out}' holds JSON that is not a results file of evaluate.py (a {type(old).__name__}); "
            f"give another --out or remove it."
        )
    if old.get("settings") == record["settings"]:
        record["modes"] = old.get("modes", {})
        print(f"resuming from {display_name(out)}")
    elif old:
        print(f"note: {display_name(out)} holds results for other settings; starting over (it will be overwritten).")
    return record


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
