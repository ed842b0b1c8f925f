"""The paper's Table 1 from checkpoints (SPAR, CVPR 2026, Sec. 4, Table 1: zero-shot segmentation mIoU).

One command evaluates the six benchmarks (VOC21, VOC20, Context60, Context59, Cityscapes, ADE20K) for the
pre-trained single pass and for SPAR -- SigLIP2 ViT-B/16 and OpenCLIP ViT-B/16 (MaskCLIP); with --backbones also
DINOv3.txt ViT-L/16 and the SigLIP2 NaFlex baseline; with --slide the sliding-window (teacher) rows -- and writes ONE
Markdown table of our numbers beside the paper's, with the difference per cell and a mean column:

    python reproduce.py --voc VOC --context CONTEXT --cityscapes CITYSCAPES --ade ADE \\
        --siglip2-ckpt spar_siglip2.pth --maskclip-ckpt spar_maskclip.pth --out runs/reproduce

The checkpoints are the authors' released files (.pth or Lightning .ckpt) or our own student.pt; `student.py`
recognises the format by content.  Every evaluation is one `evaluate.py` run (its CLI and results JSON are the
interface; the protocol is evaluate.py's default, the authors'), so an interrupted reproduction resumes: finished
runs are skipped and a partial run continues from its last saved image.  A dataset whose root is not given is
skipped (an empty cell).  No (E1)-(E4) code lives here; this file is plumbing around evaluate.py.

`--timing` instead measures seconds per image of the single pass and of the stride-24 teacher on random images
of each dataset's typical evaluation size (random weights, so no download) and estimates the time of each split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)

HERE = Path(__file__).resolve().parent

# Table 1 columns in the paper's order: (dataset, column title, root flag, val images).
BENCHMARKS = [
    ("voc21", "VOC21", "voc", 1449),
    ("voc20", "VOC20", "voc", 1449),
    ("cityscapes", "CS", "cityscapes", 500),
    ("ade20k", "ADE", "ade", 2000),
    ("context60", "C60", "context", 5105),
    ("context59", "C59", "context", 5105),
]

# Table 1 rows: backbone -> (title, SPAR checkpoint flag or None, flag of its own base weights or None).
ROWS = {
    "siglip2-b16": ("SigLIP2 ViT-B/16", "siglip2_ckpt", None),
    "clip-b16": ("OpenCLIP ViT-B/16 (MaskCLIP)", "maskclip_ckpt", None),
    "dinov3-l16": ("DINOv3.txt ViT-L/16", "dinov3_ckpt", "dinov3_pretrained"),
    "siglip2-naflex-b16": ("SigLIP2 NaFlex B/16", None, "naflex_pretrained"),  # a single-pass baseline only
}
SLIDE = "slidelogit24"  # the sliding-window rows: stride-24 windows, cosine logits averaged where they overlap


def paper_row(voc21, voc20, cityscapes, ade20k, context60, context59, mean) -> dict:
    """One row of the paper's Table 1, in its column order (VOC21, VOC20, Cityscapes, ADE20K, Context60/59, mean)."""
    return dict(voc21=voc21, voc20=voc20, cityscapes=cityscapes, ade20k=ade20k, context60=context60,
                context59=context59, mean=mean)  # fmt: skip


# The paper's numbers (mIoU %): the pre-trained single pass, SPAR (single pass), the sliding window.
PAPER = {
    ("siglip2-b16", "pretrained"): dict(
        voc21=36.1, voc20=71.3, cityscapes=23.5, ade20k=16.8, context60=24.5, context59=26.1, mean=33.1
    ),
    ("siglip2-b16", "spar"): dict(
        voc21=47.3, voc20=81.5, cityscapes=38.4, ade20k=23.4, context60=33.8, context59=37.2, mean=43.6
    ),
    ("siglip2-b16", "slide"): paper_row(45.0, 77.5, 38.4, 21.8, 30.7, 34.0, 41.2),
    ("clip-b16", "pretrained"): paper_row(43.1, 52.3, 17.7, 11.5, 20.3, 21.4, 27.7),
    ("clip-b16", "spar"): paper_row(48.5, 57.6, 25.7, 16.2, 28.2, 30.3, 34.4),
    ("clip-b16", "slide"): paper_row(48.5, 55.1, 30.8, 15.4, 25.2, 26.6, 33.6),
    ("dinov3-l16", "pretrained"): paper_row(46.0, 89.5, 35.9, 24.4, 32.1, 34.8, 43.8),
    ("dinov3-l16", "spar"): paper_row(43.1, 91.3, 40.1, 25.4, 31.6, 35.0, 44.4),
    ("dinov3-l16", "slide"): paper_row(42.6, 90.8, 39.7, 24.9, 31.8, 34.4, 44.0),
    ("siglip2-naflex-b16", "pretrained"): paper_row(35.8, 66.6, 22.8, 16.2, 23.7, 25.2, 31.7),
    # Table 1's last rows, SPAR post-processed (refine.py): only the means are in our copy of the paper's table
    ("siglip2-b16", "lposs"): dict(mean=46.7),
    ("siglip2-b16", "anyup"): dict(mean=46.8),
}
MODEL_TITLES = {
    "pretrained": "pre-trained, single pass",
    "spar": "SPAR, single pass",
    "slide": "pre-trained, sliding window",
    "lposs": "LPOSS + SPAR",
    "anyup": "SPAR + AnyUp",
}
MODELS = ("slide", "pretrained", "spar", "lposs", "anyup")  # the table's row order per backbone


def post_rows(args, backbone: str, ckpt: str | None) -> list[tuple[str, list[str], str | None]]:
    """The post-processed SPAR rows asked for (--lposs, --anyup-weights) that the paper has for this backbone:
    (model, evaluate.py's extra flags, the weights file they read)."""
    rows = []
    if ckpt and args.lposs and (backbone, "lposs") in PAPER:
        rows.append(("lposs", ["--refine", args.lposs, "--affinity", args.affinity], None))
    if ckpt and args.anyup_weights and (backbone, "anyup") in PAPER:
        rows.append(("anyup", ["--upsample", "anyup", "--anyup-weights", args.anyup_weights], args.anyup_weights))
    return rows


def say(msg: str):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Running evaluate.py, resumably
# ----------------------------------------------------------------------------------------------------------------


def wanted_modes(args, backbone: str, ckpt: str | None) -> tuple[str, ...]:
    """evaluate.py's modes of a row: 'pretrained'; the stride-24 teacher with --slide (when the paper has the row);
    'single' (= SPAR) with a checkpoint."""
    slide = (SLIDE,) if args.slide and (backbone, "slide") in PAPER else ()
    return ("pretrained",) + slide + (("single",) if ckpt else ())


def evaluate_command(
    args, backbone: str, dataset: str, root: str, ckpt: str | None, out: Path, modes: tuple[str, ...]
) -> list[str]:
    """The evaluate.py call of one (backbone, dataset) for `modes`, with the row's own base weights if it has a flag."""
    own = ROWS.get(backbone, (None, None, None))[2]
    cmd = [
        sys.executable,
        str(HERE / "evaluate.py"),
        "--dataset",
        dataset,
        "--root",
        root,
        "--backbone",
        backbone,
        "--pretrained",
        (getattr(args, own) if own else None) or args.pretrained,
        "--modes",
        ",".join(modes),
        "--out",
        str(out),
    ]
    if ckpt:
        cmd += ["--checkpoint", ckpt]
    if backbone == "siglip2-naflex-b16":
        cmd += ["--naflex-patches", "all" if args.naflex_patches is None else str(args.naflex_patches)]
    for flag in ("device", "max_images", "short_side", "templates", "text_cache"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd


def run_tee(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with its output shown live; returns (exit status, the last error line of its stderr)."""
    proc = subprocess.Popen(cmd, cwd=HERE, stderr=subprocess.PIPE)
    tail = b""
    try:
        while True:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
    except KeyboardInterrupt:  # Ctrl-C reached evaluate.py too: let it save, then stop
        proc.wait()
        raise
    code = proc.wait()
    lines = [ln.strip() for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1][len("error:") :].strip().rstrip(".") if errors else (lines[-1] if lines else "")
    return code, last or f"exit status {code}"


def run_once(ctx: dict, key: str, cmd: list[str], out: Path, wanted, what: str, stamp: dict, note="") -> dict | None:
    """One evaluate.py run unless done.json says it finished with the same command and files: {mode: mIoU %}, or
    None when it failed (the error is recorded in ctx["errors"])."""
    from files import write_json
    from results import complete_modes

    modes = complete_modes(out)
    if ctx["done"].get(key) == stamp and all(m in modes for m in wanted):
        say(f"done already: {what} ({out})")
        return modes
    say(f"\n== {what}{note}: {' '.join(cmd[1:])}")
    code, last = run_tee(cmd)
    if code == 130:
        raise KeyboardInterrupt
    modes = complete_modes(out)
    if code != 0 or not all(m in modes for m in wanted):
        ctx["errors"].append(f"{what}: evaluate.py failed ({last})")
        say(f"error: {ctx['errors'][-1]}")
        return None
    ctx["done"][key] = stamp
    write_json(ctx["done_path"], ctx["done"])
    return modes


def run_all(args, results: dict, errors: list[str]):
    """Evaluate every (row backbone, dataset) that has a root, filling results[(backbone, model, dataset)] = mIoU %
    and `errors` as runs finish (so an interrupted reproduction still tables what is done)."""
    from files import read_json
    from results import file_stamp

    out_dir = Path(args.out)
    ctx = dict(done_path=out_dir / "done.json", errors=errors)  # done.json: run key -> the command that finished it
    ctx["done"] = read_json(ctx["done_path"]) or {}
    for backbone in args.backbones:
        ckpt = getattr(args, ROWS[backbone][1]) if ROWS[backbone][1] else None
        arch = args.smoke_backbone or backbone
        if not ckpt and ROWS[backbone][1]:
            say(f"skip: SPAR row of {ROWS[backbone][0]} (no --{ROWS[backbone][1].replace('_', '-')} given)")
        for dataset, title, flag, _ in BENCHMARKS:
            root = getattr(args, flag)
            if not root or not os.path.isdir(root):
                reason = f"no --{flag} given" if not root else f"--{flag} folder '{root}' does not exist"
                say(f"skip: {title} with {backbone} ({reason})")
                continue
            tag = "-spar" if ckpt else ""
            wanted = wanted_modes(args, backbone, ckpt)
            out = out_dir / backbone / f"{dataset}{tag}.json"
            cmd = evaluate_command(args, arch, dataset, root, ckpt, out, wanted)
            stamp = {"cmd": cmd[1:], "checkpoint": list(file_stamp(ckpt)) if ckpt else None}
            note = f" + {os.path.basename(ckpt)}" if ckpt else ""
            modes = run_once(
                ctx, f"{backbone}/{dataset}{tag}", cmd, out, wanted, f"{title} with {backbone}", stamp, note
            )
            if modes is None:
                continue
            results[(backbone, "pretrained", dataset)] = modes["pretrained"]
            if SLIDE in wanted:
                results[(backbone, "slide", dataset)] = modes[SLIDE]
            if ckpt:
                results[(backbone, "spar", dataset)] = modes["single"]
            for model, extra, weights in post_rows(args, backbone, ckpt):  # LPOSS + SPAR, SPAR + AnyUp
                out = out_dir / backbone / f"{dataset}-spar-{model}.json"
                cmd = evaluate_command(args, arch, dataset, root, ckpt, out, ("single",)) + extra
                stamp = dict(stamp, cmd=cmd[1:], weights=list(file_stamp(weights) or ()) if weights else None)
                what = f"{title} with {backbone}, {MODEL_TITLES[model]}"
                post = run_once(ctx, f"{backbone}/{dataset}-spar-{model}", cmd, out, ("single",), what, stamp)
                if post is not None:
                    results[(backbone, model, dataset)] = post["single"]


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def cell(ours: float | None, paper: float | None) -> str:
    """'ours (ours - paper)'; just 'ours' when the paper has no number; '' when we have none."""
    if ours is None:
        return ""
    return f"{ours:.1f}" if paper is None else f"{ours:.1f} ({ours - paper:+.1f})"


def markdown_table(results: dict, backbones: list[str], notes: list[str]) -> str:
    """One table: per backbone and model, the paper's row and ours with the difference per cell."""
    head = ["backbone", "model", "source"] + [t for _, t, _, _ in BENCHMARKS] + ["mean"]
    lines = [
        "# Table 1 from checkpoints (zero-shot segmentation, mIoU %)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for backbone in backbones:
        for model in (m for m in MODELS if (backbone, m) in PAPER):
            paper = PAPER[(backbone, model)]
            ours = [results.get((backbone, model, d)) for d, _, _, _ in BENCHMARKS]
            mean = statistics.fmean(ours) if all(v is not None for v in ours) else None
            first = f"| {ROWS[backbone][0]} | {MODEL_TITLES[model]} | "
            lines.append(
                first
                + "paper | "
                + " | ".join(f"{paper[d]:.1f}" if d in paper else "" for d, _, _, _ in BENCHMARKS)
                + f" | {paper['mean']:.1f} |"
            )
            lines.append(
                first
                + "ours (ours − paper) | "
                + " | ".join(
                    [cell(v, paper.get(d)) for v, (d, _, _, _) in zip(ours, BENCHMARKS)] + [cell(mean, paper["mean"])]
                )
                + " |"
            )
    lines += [
        "",
        "An empty 'ours' cell: not evaluated (dataset root or checkpoint not given, or the run failed; "
        "see the log; sliding-window rows need --slide).  Mean: over the six benchmarks, only when all six were "
        "evaluated.  Sliding window: stride-24 windows, cosine logits averaged where they overlap (slidelogit24, the "
        "authors' evaluation; docs/defaults.md).",
    ]
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


def table_notes(args) -> list[str]:
    notes = [
        f"weights: --pretrained {args.pretrained}; SPAR checkpoints: "
        + ", ".join(
            f"{ROWS[b][0]}: {os.path.basename(getattr(args, ROWS[b][1]) or '') or 'none'}"
            for b in args.backbones
            if ROWS[b][1]
        )
    ]
    if args.max_images or args.short_side:
        notes.append(
            "NOT comparable with the paper: "
            + ", ".join(
                s
                for s in (
                    f"first {args.max_images} images only" if args.max_images else "",
                    f"short side {args.short_side}" if args.short_side else "",
                )
                if s
            )
        )
    if args.smoke_backbone:
        notes.append(f"smoke test: every row ran on the '{args.smoke_backbone}' backbone, not the paper's")
    from checkpoints import random_weights
    from cli import RANDOM_WEIGHTS

    if any(
        random_weights(b, args.pretrained) for b in ([args.smoke_backbone] if args.smoke_backbone else args.backbones)
    ):
        notes.append(f"{RANDOM_WEIGHTS}: the numbers say nothing about the method")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# --timing: seconds per image at each dataset's evaluation size
# ----------------------------------------------------------------------------------------------------------------

# Typical evaluation input after the protocol resize (short side 672, VOC/Context/ADE images are mostly 4:3;
# Cityscapes 1024 x 2048), and the benchmarks evaluated at that size.
TIMING_SIZES = [((672, 896), ["voc21", "voc20", "context60", "context59", "ade20k"]), ((1024, 2048), ["cityscapes"])]
QUICK_SIZES = [((96, 128), ["voc21", "voc20", "context60", "context59", "ade20k"]), ((128, 256), ["cityscapes"])]


def _seconds(fn, device, repeats: int) -> float:
    """Median wall time of `fn()` after one warm-up call (kernels, allocator, cudnn autotuning)."""
    from cli import synchronize

    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_backbone(name: str, args) -> list[dict]:
    import torch

    from cli import autocast
    from student import load_backbone
    from teacher import Teacher

    backbone = load_backbone(name, None, args.device)
    backbone.max_patches = args.naflex_patches  # NaFlex's patch budget (only `NaFlexBackbone` reads it)
    device = backbone.device
    rows = []
    for (H, W), datasets in QUICK_SIZES if args.quick else TIMING_SIZES:
        x = backbone.normalize(torch.rand(1, 3, H, W, device=device))
        with torch.inference_mode(), autocast(device, args.precision):
            single = _seconds(lambda: backbone.dense(x), device, args.repeats)
        if not getattr(backbone, "slides", True):  # NaFlex: a single-pass baseline, no teacher
            rows.append(dict(backbone=name, size=[H, W], datasets=datasets, single_s=single, teacher_s=None,
                             windows=0, teacher_how="no teacher (single-pass baseline)"))  # fmt: skip
            continue
        teacher = Teacher(backbone, stride=24, precision=args.precision)
        n = teacher.num_windows(H, W)
        limit = args.teacher_windows or n
        if limit >= n:
            with torch.inference_mode():
                slide = _seconds(lambda: teacher(x), device, 1)
            how = f"all {n} window{'s' if n > 1 else ''}"
        else:  # a batch of `limit` windows through the model, scaled to the window count
            K = backbone.window
            crops = backbone.normalize(torch.rand(limit, 3, K, K, device=device))
            with torch.inference_mode(), autocast(device, args.precision):
                slide = _seconds(lambda: backbone.dense(crops), device, 1) * n / limit
            how = f"extrapolated from {limit} of {n} windows (model only, no stitching)"
        rows.append(
            dict(
                backbone=name,
                size=[H, W],
                datasets=datasets,
                single_s=single,
                teacher_s=slide,
                windows=n,
                teacher_how=how,
            )
        )
    return rows


def number(x: float, width: int, digits: int) -> str:
    """A table cell: `x` to `digits` places, or a dash for None (the NaFlex baseline has no teacher; null in JSON)."""
    return f"{'—':>{width}}" if x is None else f"{x:{width}.{digits}f}"


def timing(args) -> int:
    import torch

    from cli import resolve_device
    from files import write_json

    args.device = str(resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    say(
        f"seconds per image, random weights, device {args.device}, precision {args.precision}, stride-24 teacher"
        + (" (--quick: small images, not the evaluation sizes)" if args.quick else "")
    )
    rows = []
    for name in args.backbones:
        rows += time_backbone(args.smoke_backbone or name, args)
    split = {d: n for d, _, _, n in BENCHMARKS}
    say(f"\n{'backbone':<18} {'HxW':>10} {'single s':>9} {'teacher s':>10} {'ratio':>6}  teacher windows")
    for r in rows:
        t = r["teacher_s"]
        say(
            f"{r['backbone']:<18} {r['size'][0]:>4}x{r['size'][1]:<5} {r['single_s']:9.3f} "
            f"{number(t, 10, 2)} {number(t and t / r['single_s'], 6, 0)}  {r['teacher_how']}"
        )
    say(f"\n{'backbone':<18} {'dataset':<11} {'images':>6} {'single min':>11} {'teacher min':>12}")
    for r in rows:
        for d in r["datasets"]:
            say(
                f"{r['backbone']:<18} {d:<11} {split[d]:>6} {split[d] * r['single_s'] / 60:11.1f} "
                f"{number(r['teacher_s'] and split[d] * r['teacher_s'] / 60, 12, 1)}"
            )
    write_json(
        Path(args.out) / "timing.json",
        {"device": args.device, "precision": args.precision, "quick": args.quick, "rows": rows, "split_images": split},
    )
    say(f"saved {Path(args.out) / 'timing.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def add_row_flags(p: argparse.ArgumentParser):
    """Each row's SPAR checkpoint and, where a row needs its own, its base weights."""
    from cli import patch_budget

    p.add_argument("--siglip2-ckpt", help="SPAR SigLIP2 checkpoint: the authors' .pth/.ckpt or our student.pt")
    p.add_argument("--maskclip-ckpt", help="SPAR MaskCLIP (OpenCLIP ViT-B/16) checkpoint")
    p.add_argument("--dinov3-ckpt", help="SPAR DINOv3.txt checkpoint (the authors' SPAR DINOv3-TXT .pth or ours)")
    p.add_argument(
        "--dinov3-pretrained",
        help="base weights of the DINOv3.txt rows: 'BACKBONE.pth,DINOTXT.pth' (Meta's two files) or one file in "
        "the released layout (default: --pretrained)",
    )
    p.add_argument("--naflex-pretrained", help="base weights of the NaFlex row: an open_clip state dict")
    p.add_argument(
        "--naflex-patches",
        default="256",
        type=patch_budget,
        metavar="N|all",
        help="the NaFlex row's patch budget, aspect ratio kept (default: %(default)s; 'all': each image's own grid)",
    )
    p.add_argument(
        "--slide",
        action="store_true",
        help="also evaluate the sliding-window rows (slidelogit24: stride-24 windows, slow)",
    )
    p.add_argument(
        "--lposs",
        choices=("lposs", "lposs+"),
        help="also evaluate the LPOSS + SPAR row (SigLIP2) with this refinement (evaluate.py --refine; slow on CPU)",
    )
    p.add_argument("--affinity", default="self", help="the LPOSS row's affinity features (evaluate.py --affinity)")
    p.add_argument("--anyup-weights", help="also evaluate the SPAR + AnyUp row (SigLIP2) with this AnyUp weights file")


def build_parser() -> argparse.ArgumentParser:
    from cli import ArgumentParser, add_threads_arg

    p = ArgumentParser(
        description="The paper's Table 1 from checkpoints: evaluate the six benchmarks "
        "(pre-trained single pass and SPAR, SigLIP2 and OpenCLIP/MaskCLIP) "
        "with evaluate.py and write one Markdown table beside the paper's "
        "numbers.  Resumable: run the same command again."
    )
    p.add_argument("--voc", help="VOC root (VOCdevkit/VOC2012 inside): VOC21 and VOC20")
    p.add_argument("--context", help="PASCAL Context root (VOCdevkit/VOC2010 inside): Context60 and Context59")
    p.add_argument("--cityscapes", help="Cityscapes root (leftImg8bit/, gtFine/ inside)")
    p.add_argument("--ade", help="ADE20K root (ADEChallengeData2016/ inside)")
    add_row_flags(p)
    p.add_argument(
        "--backbones",
        default="siglip2-b16,clip-b16",
        help=f"rows to evaluate, comma-separated, of {', '.join(ROWS)} (default: %(default)s)",
    )
    p.add_argument(
        "--pretrained",
        default="default",
        help="base weights for every evaluate.py run: 'default' (download through open_clip, cached) "
        "or 'none' (random, offline tests)",
    )
    p.add_argument(
        "--out",
        default=str(HERE / "runs" / "reproduce"),
        help="folder for the per-run JSONs and table1.md (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="passed to evaluate.py (default: its own, cuda if available)")
    add_threads_arg(p)
    p.add_argument("--max-images", type=int, default=None, help="first N images only (a quick look; not comparable)")
    p.add_argument("--short-side", type=int, default=None, help="override the resize (tests only; not comparable)")
    p.add_argument("--templates", default=None, help="prompt templates file (default: evaluate.py's, the 80 of CLIP)")
    p.add_argument("--text-cache", default=None, help="text-embedding cache folder for evaluate.py")
    p.add_argument(
        "--smoke-backbone",
        default=None,
        help="run every row on this backbone instead (e.g. tiny, for an offline smoke test)",
    )
    t = p.add_argument_group("timing (--timing): seconds per image on random images, no datasets, no download")
    t.add_argument("--timing", action="store_true", help="measure s/image and estimate each split's time, then exit")
    t.add_argument("--quick", action="store_true", help="small images and 2 teacher windows (a CPU check)")
    t.add_argument(
        "--precision",
        default="fp32",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="autocast for --timing (default fp32, as the authors evaluate)",
    )
    t.add_argument(
        "--teacher-windows",
        type=int,
        default=None,
        help="time only this many teacher windows and extrapolate (default: all; --quick: 2)",
    )
    t.add_argument("--repeats", type=int, default=3, help="single-pass repeats, median (default 3; --quick 1)")
    return p


def _run(argv=None) -> int:
    from cli import UserError
    from files import atomic_write

    args = build_parser().parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for b in args.backbones:
        if b not in ROWS:
            raise UserError(f"unknown row backbone '{b}'; choose from {', '.join(ROWS)}.")
    for flag in ("max_images", "short_side", "teacher_windows", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    if args.timing:
        if args.quick:
            args.teacher_windows = args.teacher_windows or 2
            args.repeats = 1
        return timing(args)
    for b in args.backbones:
        ckpt = getattr(args, ROWS[b][1]) if ROWS[b][1] else None
        if ckpt and not os.path.isfile(ckpt):
            raise UserError(f"checkpoint '{ckpt}' (--{ROWS[b][1].replace('_', '-')}) does not exist.")

    results, errors, code = {}, [], 0
    try:
        run_all(args, results, errors)
    except KeyboardInterrupt:
        code = 130
        say("\ninterrupted; finished runs are kept, run the same command again to resume.")
    table = markdown_table(results, args.backbones, table_notes(args))
    path = Path(args.out) / "table1.md"
    atomic_write(path, lambda f: f.write(table.encode()))
    say("\n" + table + f"saved {path}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return code or (2 if errors else 0)


def main(argv=None) -> int:
    from cli import main_guard

    return main_guard(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
