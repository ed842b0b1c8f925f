"""The paper's figures, one command each (SPAR, CVPR 2026: Fig. 1, Fig. 3, Fig. 5 and the ablations of Sec. 4).

Every figure is plumbing around evaluate.py and distill.py: each (dataset, mode) is one evaluate.py run into
OUT/<figure>/<dataset>[-...].json (its results file, so an interrupted figure resumes and a rerun recomputes
nothing), and the figure writes OUT/<figure>.json, OUT/<figure>.md (our numbers beside the paper's) and
OUT/<figure>.png.  No (E1)-(E6) code lives here.

    python figures.py fig1 --roots voc21=VOC voc20=VOC cityscapes=CS ade20k=ADE context60=CTX context59=CTX \\
        --backbone siglip2-b16 --checkpoint SPAR=spar.pth --out runs/figures
    python figures.py fig3 --dataset cityscapes --root CS --checkpoint "SPAR ALL dagger=spar_all_ext.pth"
    python figures.py fig5 --dataset voc21 --root VOC --max-images 4 --checkpoint SPAR=spar.pth
    python figures.py ablate --train blk_-1,blk_-2 --train all --epochs 1,3 --dataset voc21 --root VOC
    python figures.py fig1 --backbone tiny --synthetic /tmp/syn --strides 64,24   # offline plumbing check

fig1   speed vs accuracy: the mean mIoU over the six benchmarks against seconds per image (log x) of the
       pre-trained single pass, the sliding-window teacher at --strides ("ND": a stride not divisible by the patch)
       and each --checkpoint; the paper's points (SigLIP2 B/16, their GPU) in grey.
fig3   accuracy and seconds vs resolution: each image resized keeping its ratio to an AREA (--areas, sides of the
       square of equal area), for the pre-trained single pass, the teacher at strides 256 and 24 (skipped, and said,
       where the image is smaller than the window K) and each --checkpoint; the paper's Cityscapes numbers tabled.
       With --naflex-pretrained PATH also the NaFlex baseline (siglip2-naflex-b16); else a logged `skip:` line.
fig5   qualitative maps: image | label | segmentation of the single pass, the teacher, each checkpoint | a PCA view
       of each one's dense features (three components fitted jointly, `pictures.pca_rgb`); each (image, model)
       pair cached under OUT/fig5/cache, keyed by content, so a rerun recomputes nothing and is bit-identical.
ablate a grid of distill.py settings (trained parts x teacher stride x images x epochs), each trained into
       OUT/ablate/<name>/ and evaluated; one table.  (distill.py has no teacher --window flag: not in the grid.)

--window K (fig1, fig3, fig5): the teacher's window instead of the backbone's native K (each window's position
embeddings resized, (E3)).  Each backbone is loaded once per command (`reuse_backbones`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import time
from pathlib import Path

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import numpy as np
import torch

import benchmarks
from cli import (
    WINDOW_HELP,
    ArgumentParser,
    UserError,
    add_backbone_args,
    check_numbers,
    check_window_fits,
    display_name,
    main_guard,
    note_random_weights,
    patch_budget,
    resolve_device,
)
from files import atomic_write, check_writable, content_sha1, read_json, save_torch, write_json
from pictures import class_colours, pca_rgb
from refine import LPOSS_K
from results import complete_modes, run_settings

SIX = ("voc21", "voc20", "cityscapes", "ade20k", "context60", "context59")
FIG1_STRIDES = (512, 256, 128, 64, 32, 16, 56, 40, 24, 8)
FIG3_AREAS = (512, 1024, 1536, 2048, 3072)
# Fig. 1 of the paper (SigLIP2 B/16, mean of the six, seconds per 1024 x 2048 image on their GPU): (seconds, mIoU).
PAPER_FIG1 = {
    "pretrained": (0.48, 33.0),
    "SPAR": (0.48, 43.6),
    "slide24": (25.0, 41.2),
    "slide256": (0.35, 35.5),
    "slide512": (0.13, 33.9),
    "slide8": (210.0, 41.5),
}
# Fig. 3 of the paper (Cityscapes), per area side 512 .. 3072.
PAPER_FIG3 = {
    "SPAR ALL † (paper)": dict(miou=[29.7, 36.8, 40.9, 41.2, 37.4], seconds=[0.026, 0.15, 0.62, 1.9, 9.3]),
    "pretrained (paper)": dict(miou=[22.3, 23.0, 23.2, 21.5, 17.8], seconds=None),
}


class FigureError(UserError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Flags shared by the figures
# ----------------------------------------------------------------------------------------------------------------


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise FigureError(f"{what} must be comma-separated whole numbers, got '{text}'.") from None
    if not values or min(values) <= 0:
        raise FigureError(f"{what} must be positive whole numbers, got '{text}'.")
    return values


def parse_named(items: list[str] | None, what: str, must_exist: bool = True, bare: str | None = None) -> dict[str, str]:
    """["NAME=PATH" | "PATH", ...] -> {NAME: PATH}, each name once, each path an existing file or folder; with
    `bare`, a lone PATH is named `bare` (the next ones `bare` <its folder's name>, e.g. SPAR distill-all)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep and bare and item.strip():
            name, sep, path = (bare if bare not in out else f"{bare} {Path(item).parent.name}"), "=", item
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise FigureError(f"{what} takes NAME=PATH, got '{item}'.")
        if name in out:
            raise FigureError(f"{what}: the name '{name}' is given twice.")
        if must_exist and not os.path.exists(path):
            raise FigureError(f"{what} {name}: '{path}' does not exist.")
        out[name] = path
    return out


def add_common(p: argparse.ArgumentParser, datasets: bool = True, teacher: bool = True, checkpoints: bool = True):
    from student import BACKBONES

    add_backbone_args(p, BACKBONES, default="siglip2-b16")
    p.add_argument("--out", default="runs/figures", help="output folder (default: %(default)s)")
    if checkpoints:
        p.add_argument(
            "--checkpoint",
            action="append",
            metavar="[NAME=]PATH",
            help="a student checkpoint (repeatable; a bare PATH is named SPAR)",
        )
    if teacher:
        p.add_argument("--window", type=int, default=None, metavar="K", help=WINDOW_HELP)
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of each split")
    p.add_argument("--short-side", type=int, default=None, help="override the datasets' short side (evaluate.py)")
    p.add_argument("--long-side", type=int, default=None, help="override the datasets' long side (evaluate.py)")
    p.add_argument("--templates", default=str(benchmarks.DEFAULT_TEMPLATES))
    p.add_argument("--text-cache", default=None, help="text-embedding cache folder ('none' disables)")
    if datasets:
        p.add_argument("--synthetic", metavar="DIR", help="make (once) and use the synthetic sets under DIR (tests)")
        p.add_argument("--num-synthetic", type=int, default=2, help="images per synthetic set (default 2)")
        p.add_argument("--quiet", action="store_true", help="hide evaluate.py's per-run output")


def synthetic_root(folder: str, name: str, count: int) -> str:
    """A synthetic `name` set under folder/name, written once (benchmarks.make_synthetic)."""
    root = Path(folder) / name
    if not (root / ".complete").is_file():
        benchmarks.make_synthetic(name, root, count)
        (root / ".complete").write_text("done\n")
    return str(root)


def dataset_roots(args, names, roots: dict | None) -> dict[str, str]:
    if args.synthetic:
        check_numbers([("--num-synthetic", args.num_synthetic, (">=", 1))])
        return {n: synthetic_root(args.synthetic, n, args.num_synthetic) for n in names}
    roots = roots or {}
    missing = [n for n in names if n not in roots]
    if missing:
        raise FigureError(f"no folder for {', '.join(missing)}: give --roots NAME=DIR for each (or --synthetic DIR).")
    return {n: roots[n] for n in names}


# ----------------------------------------------------------------------------------------------------------------
# One evaluate.py run per (dataset, modes), skipped when its results file already covers them
# ----------------------------------------------------------------------------------------------------------------


def eval_argv(
    args, dataset: str, root: str, out: Path, modes: list[str], ckpt: str | None = None, side=None, model=None
):
    """evaluate.py's command line for one results file; `model`: another (backbone, pretrained, more flags)."""
    short, long = side if side else (args.short_side, args.long_side)
    backbone, pretrained, more = model or (args.backbone, args.pretrained, [])
    argv = ["--dataset", dataset, "--root", root, "--backbone", backbone, "--pretrained", pretrained, *more]
    argv += ["--device", args.device, "--modes", ",".join(modes), "--out", str(out), "--templates", args.templates]
    if getattr(args, "window", None) and any(m.startswith("slide") for m in modes):
        argv += ["--window", str(args.window)]
    for flag, value in (
        ("--checkpoint", ckpt),
        ("--max-images", args.max_images),
        ("--short-side", short),
        ("--long-side", long),
        ("--text-cache", args.text_cache),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def expected_settings(argv: list[str]) -> dict:
    """The settings evaluate.py would record for `argv` (results.run_settings), to know a file is ours."""
    import evaluate

    a = evaluate.build_parser().parse_args(argv)
    samples, _ = benchmarks.benchmark(a.dataset, a.root, a.max_images)
    templates = benchmarks.read_templates(a.templates)
    return run_settings(a, len(samples), templates, {k: getattr(a, k) for k in benchmarks.SETTINGS})


def missing_modes(argv: list[str], out: Path, modes: list[str]) -> list[str]:
    record = read_json(out) if out.is_file() else None
    if not isinstance(record, dict) or record.get("settings") != expected_settings(argv):
        return list(modes)
    done = complete_modes(out)
    return [m for m in modes if m not in done]


def run_modes(args, argv: list[str], out: Path, modes: list[str]) -> dict:
    """evaluate.py for the modes `out` lacks (its own resume continues a partial one); -> {mode: results}."""
    import evaluate

    todo = missing_modes(argv, out, modes)
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        i = argv.index("--modes")
        run = argv[: i + 1] + [",".join(todo)] + argv[i + 2 :]
        with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
            evaluate.main(run)
    record = read_json(out)
    return {m: record["modes"][m] for m in modes}


def point(r: dict) -> dict:
    return dict(miou=100 * r["miou"], seconds=r["seconds_per_image"], images=r["images_done"])


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run")


_LOADED: dict[tuple, object] = {}  # the backbones loaded by this figure command (`reuse_backbones`)


def load_model(name: str, pretrained, device="cpu", checkpoint: str | None = None):
    """`student.load_backbone`, once per (backbone, weights, device, checkpoint) and figure command: the weights
    and the checkpoint are keyed by their content, so a changed file is loaded anew.  Only for inference (the
    models are frozen and in eval mode; distill.py, which trains its model in place, loads its own)."""
    import student
    from checkpoints import weights_sha1

    ckpt = (os.path.abspath(checkpoint), content_sha1(checkpoint)) if checkpoint else None
    key = (name, str(pretrained), weights_sha1(pretrained), str(torch.device(device)), ckpt)
    if key not in _LOADED:
        _LOADED[key] = student.load_backbone(name, pretrained, device, checkpoint=checkpoint)
    return _LOADED[key]


@contextlib.contextmanager
def reuse_backbones():
    """While a figure runs, evaluate.py's runs take their backbones from `load_model` (one load per backbone, not
    one per results file); afterwards the models are released."""
    import evaluate

    real = evaluate.load_backbone
    evaluate.load_backbone = load_model
    try:
        yield
    finally:
        evaluate.load_backbone = real
        _LOADED.clear()


def load_base(args):
    backbone = load_model(args.backbone, args.pretrained, resolve_device(args.device))
    return note_random_weights(backbone.random_weights) or backbone


def teacher_window(args, backbone, sizes=()) -> int:
    """The teacher's K: --window, checked (a positive multiple of the patch, as `Teacher` checks it, and no larger
    than an image of `sizes`, the (h, w) the images run at), else the backbone's native window."""
    from teacher import Teacher

    if getattr(args, "window", None) is None:
        return backbone.window
    Teacher(backbone, window=args.window, stride=backbone.patch_size)  # TeacherError: one sentence
    for h, w in sizes:
        check_window_fits(args.window, h, w)
    return args.window


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def write_outputs(out: Path, name: str, record: dict, markdown: str, draw):
    write_json(out / f"{name}.json", record)
    atomic_write(out / f"{name}.md", lambda f: f.write(markdown.encode()))
    draw(out / f"{name}.png")
    print(f"saved {display_name(out / name)}.json, .md, .png")


def savefig(fig, path: Path):
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Fig. 1: speed vs accuracy, mean of six datasets
# ----------------------------------------------------------------------------------------------------------------


def run_hw(sample, dataset: str, args) -> tuple[int, int]:
    """The size evaluate.py runs a sample at (the dataset's protocol resize, with the flags' overrides)."""
    from PIL import Image

    with Image.open(sample.image) as im:
        W, H = im.size
    s = benchmarks.settings_for(dataset, args.backbone, short_side=args.short_side, long_side=args.long_side)
    return benchmarks.resized_hw(H, W, s["short_side"], s["long_side"])


def window_seconds(backbone, K: int, repeats: int = 3) -> float:
    """Measured seconds of one K x K window's forward pass (the unit of the time estimate)."""
    from cli import synchronize

    device = backbone.device
    x = backbone.normalize(torch.rand(1, 3, K, K, device=device))
    with torch.inference_mode():
        backbone.dense(x)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            backbone.dense(x)
        synchronize(device)
    return (time.perf_counter() - t0) / repeats


def estimate_seconds(sizes: list[tuple[int, int]], strides: list[int], K: int, per_window: float) -> dict:
    """{mode: estimated seconds} for images of `sizes`: windows x per-window time (single: area / K^2 windows)."""
    from stitch import window_grid

    est = {"pretrained": sum(h * w / K**2 for h, w in sizes) * per_window}
    for s in strides:
        est[f"slide{s}"] = sum(len(window_grid(max(h, K), max(w, K), K, s)) for h, w in sizes) * per_window
    return est


def fig1_plan(args, backbone, roots: dict) -> tuple:
    strides = parse_ints(args.strides, "--strides")
    sizes = []
    for name, root in roots.items():
        samples, _ = benchmarks.benchmark(name, root, args.max_images)
        sizes += [run_hw(smp, name, args) for smp in samples]
    K, patch = teacher_window(args, backbone, sizes), backbone.patch_size
    skipped = [f"stride {s} > K = {K} (no window would see the strips between)" for s in strides if s > K]
    for note in skipped:
        print(f"skipping {note}")
    strides = [s for s in strides if s <= K]
    per_window = window_seconds(backbone, K)
    est = estimate_seconds(sizes, strides, K, per_window)
    total = sum(est.values()) + len(args.checkpoint or []) * est["pretrained"]  # a student costs a single pass
    print(
        f"{len(sizes)} images over {len(roots)} datasets, {per_window * 1e3:.1f} ms per {K}x{K} window on "
        f"{device_name(backbone.device)}: estimated {total:.0f} s in all ("
        + ", ".join(f"{m} {v:.0f} s" for m, v in est.items())
        + ")"
    )
    labels = ["pretrained"] + [f"slide{s}" for s in strides]
    return strides, labels, dict(total=total, per_window=per_window, modes=est), skipped, patch


def fig1(args) -> dict:
    out = Path(args.out)
    check_writable(out / "fig1.json")
    check_numbers([("--max-images", args.max_images, (">=", 1))])
    names = [args.dataset] if args.dataset else [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in benchmarks.DATASETS]
    if unknown or not names:
        raise FigureError(f"--datasets: unknown {', '.join(unknown) or '(none)'}; use names of {', '.join(SIX)}.")
    parse_ints(args.strides, "--strides")
    ckpts = parse_named(args.checkpoint, "--checkpoint", bare="SPAR")
    roots = parse_named(args.roots, "--roots") | ({args.dataset: args.root} if args.dataset and args.root else {})
    roots = dataset_roots(args, names, roots)
    backbone = load_base(args)
    strides, modes, estimate, skipped, patch = fig1_plan(args, backbone, roots)
    per_dataset = {}
    bar = progress(len(roots) * (len(modes) + len(ckpts)), "fig1")
    for name, root in roots.items():
        res = out / "fig1" / (f"{name}-K{args.window}.json" if args.window else f"{name}.json")
        got = run_modes(args, eval_argv(args, name, root, res, modes), res, modes)
        bar.update(len(modes))
        for cname, path in ckpts.items():
            res_c = out / "fig1" / f"{name}-{safe(cname)}.json"
            got[cname] = run_modes(args, eval_argv(args, name, root, res_c, ["single"], path), res_c, ["single"])[
                "single"
            ]
            bar.update(1)
        per_dataset[name] = {m: point(r) for m, r in got.items()}
    bar.close()
    labels = modes + list(ckpts)
    mean = {m: {k: float(np.mean([per_dataset[d][m][k] for d in names])) for k in ("miou", "seconds")} for m in labels}
    points = [
        dict(label=m, **mean[m], nd=m.startswith("slide") and int(m[5:]) % patch != 0, paper=paper_point(m))
        for m in labels
    ]
    record = dict(
        figure="fig1",
        backbone=args.backbone,
        device=device_name(backbone.device),
        datasets=names,
        estimate_seconds=estimate,
        skipped=skipped,
        per_dataset=per_dataset,
        points=points,
        paper={m: dict(seconds=s, miou=v) for m, (s, v) in PAPER_FIG1.items()},
    )
    write_outputs(out, "fig1", record, fig1_markdown(record), lambda p: fig1_plot(record, p))
    return record


def paper_point(label: str) -> dict | None:
    """The paper's Fig. 1 point of a mode (a checkpoint named like 'SPAR...' is compared with SPAR)."""
    key = "SPAR" if label.upper().startswith("SPAR") else label
    return dict(zip(("seconds", "miou"), PAPER_FIG1[key])) if key in PAPER_FIG1 else None


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def fig1_markdown(r: dict) -> str:
    lines = [
        f"# Fig. 1: speed vs accuracy, mean of {len(r['datasets'])} datasets ({', '.join(r['datasets'])})",
        "",
        f"Ours: {r['backbone']} on {r['device']}, seconds per image at the datasets' evaluation sizes. Paper: "
        "SigLIP2 B/16, seconds per 1024x2048 image on their GPU.",
        "",
        "| mode | ND | mIoU (ours) | s/image (ours) | mIoU (paper) | s/image (paper) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in r["points"]:
        paper = p["paper"] or dict(miou="", seconds="")
        lines.append(
            f"| {p['label']} | {'ND' if p['nd'] else ''} | {p['miou']:.2f} | {p['seconds']:.4g} | "
            f"{paper['miou']} | {paper['seconds']} |"
        )
    lines += ["", *(f"- skipped: {s}" for s in r["skipped"])]
    return "\n".join(lines) + "\n"


def slide_nd(p: dict) -> bool | None:
    """None for a single pass, else whether the teacher's stride is ND (not divisible by the patch)."""
    return p["nd"] if p["label"].startswith("slide") else None


def fig1_points(ax, r: dict, fontsize: int = 8):
    for nd in (False, True):  # one dashed line through the strides, largest first; ND separately
        line = sorted((-int(p["label"][5:]), p["seconds"], p["miou"]) for p in r["points"] if slide_nd(p) == nd)
        if len(line) > 1:
            ax.plot([x[1] for x in line], [x[2] for x in line], "--", color="tab:orange" if nd else "tab:blue", lw=1)
    for k, p in enumerate(r["points"]):
        slide = p["label"].startswith("slide")
        colour = "tab:orange" if p["nd"] else ("tab:blue" if slide else "tab:red")
        ax.scatter(
            p["seconds"], p["miou"], color=colour, marker="o" if slide else "*", s=45 if slide else 130, zorder=3
        )
        tag = p["label"] + (" ND" if p["nd"] else "")
        offset = (5, 5) if k % 2 == 0 else (5, -11)  # alternate, so that neighbours' labels do not overlap
        ax.annotate(tag, (p["seconds"], p["miou"]), xytext=offset, textcoords="offset points", fontsize=fontsize)


def fig1_plot(r: dict, path: Path):
    """Left: our points (blue: teacher strides, orange: ND strides, red stars: single passes). Right: the paper's
    points in grey with ours on the same axes (the scales differ when ours are the toy's)."""
    plt = pyplot()
    fig, (ours, both) = plt.subplots(1, 2, figsize=(12, 4.6))
    fig1_points(ours, r)
    ours.set_title(f"ours: {r['backbone']} on {r['device']}", fontsize=9)
    for m, (s, v) in PAPER_FIG1.items():
        both.scatter(s, v, color="0.6", marker="^", s=40, zorder=2)
        both.annotate(f"{m} (paper)", (s, v), xytext=(4, -10), textcoords="offset points", fontsize=7, color="0.45")
    fig1_points(both, r, fontsize=6)
    both.set_title("with the paper's points (grey: SigLIP2 B/16, their GPU, 1024x2048)", fontsize=9)
    n = len(r["datasets"])
    for ax in (ours, both):
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (log scale)")
        ax.set_ylabel(f"mean mIoU over {n} dataset{'s' if n > 1 else ''} (%)")
        ax.grid(True, which="both", alpha=0.3)
    ours.margins(x=0.25, y=0.25)
    fig.suptitle("Fig. 1, speed vs accuracy", fontsize=10)
    fig.tight_layout()
    savefig(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Fig. 3: accuracy and time vs resolution (images resized to a pixel area)
# ----------------------------------------------------------------------------------------------------------------


def area_sides(samples, area: int) -> tuple[int, int]:
    """(short side, long side) that resize every sample to about `area` pixels keeping its ratio (one pair for
    the whole split, so its images must share one aspect ratio, as Cityscapes' do)."""
    from PIL import Image

    sizes = set()
    for smp in samples:
        with Image.open(smp.image) as im:
            sizes.add(benchmarks.area_hw(im.size[1], im.size[0], area))
    if len({(min(s), max(s)) for s in sizes}) > 1:
        raise FigureError(
            f"fig3 resizes by one short/long side pair, so the images must share one aspect ratio (as Cityscapes');"
            f" at area {area} they give {len(sizes)} sizes."
        )
    h, w = sizes.pop()
    return min(h, w), max(h, w)


NAFLEX = "siglip2-naflex-b16"  # the NaFlex single-pass baseline of Fig. 3 (naflex.py)


def fig3_jobs(args, K: int, samples, areas, strides, ckpts):
    """[{side, short, long, modes, name: checkpoint name | "NaFlex" | None}] and the skipped (area, mode) notes."""
    jobs, skipped = [], []
    for side in areas:
        short, long = area_sides(samples, side * side)
        modes = ["pretrained"]
        for s in strides:
            if s > K or short < K:
                why = f"stride {s} > K = {K}" if s > K else f"the short side {short} px is below the {K} px window K"
                skipped.append(f"slide{s} at {side}^2: {why}")
            else:
                modes.append(f"slide{s}")
        size = dict(side=side, short=short, long=long)
        jobs.append(dict(size, modes=modes, name=None))
        jobs += [dict(size, modes=["single"], name=c) for c in ckpts]
        if args.naflex_pretrained:
            jobs.append(dict(size, modes=["pretrained"], name="NaFlex"))
    if not args.naflex_pretrained:
        skipped.append(f"NaFlex: the {NAFLEX} baseline needs its weights, --naflex-pretrained PATH (or 'none')")
    for note in skipped:
        print(f"skip: {note}" if note.startswith("NaFlex") else f"skipping {note}")
    return jobs, skipped


def fig3_root(args) -> str:
    if args.synthetic:
        return synthetic_root(args.synthetic, args.dataset, args.num_synthetic)
    if not args.root:
        raise FigureError("--root is required (the dataset folder), or use --synthetic DIR.")
    return args.root


def fig3_run(args, job: dict, root: str, out: Path, ckpts: dict) -> dict:
    """One results file of Fig. 3 (evaluate.py at the job's size): {mode or checkpoint name: point}."""
    name, side, modes = job["name"], job["side"], job["modes"]
    tag = f"-K{args.window}" if args.window and name is None else ""
    res = out / "fig3" / (f"{args.dataset}-{side}" + (f"-{safe(name)}" if name else tag) + ".json")
    budget = ["--naflex-patches", "all" if args.naflex_patches is None else str(args.naflex_patches)]
    naflex = (NAFLEX, args.naflex_pretrained, budget) if name == "NaFlex" else None
    argv = eval_argv(args, args.dataset, root, res, modes, ckpts.get(name), (job["short"], job["long"]), naflex)
    return {name or m: point(r) for m, r in run_modes(args, argv, res, modes).items()}


def fig3(args) -> dict:
    out = Path(args.out)
    check_writable(out / "fig3.json")
    check_numbers([("--max-images", args.max_images, (">=", 1))])
    areas, strides = parse_ints(args.areas, "--areas"), parse_ints(args.strides, "--strides")
    root = fig3_root(args)
    ckpts = parse_named(args.checkpoint, "--checkpoint", bare="SPAR")
    if args.naflex_pretrained and args.naflex_pretrained.lower() != "none":
        parse_named([f"NaFlex={args.naflex_pretrained}"], "--naflex-pretrained")  # the file exists
    backbone = load_base(args)
    samples, _ = benchmarks.benchmark(args.dataset, root, args.max_images)
    jobs, skipped = fig3_jobs(args, teacher_window(args, backbone), samples, areas, strides, ckpts)
    results, run_size = {}, {}
    bar = progress(sum(len(j["modes"]) for j in jobs), "fig3")
    for job in jobs:
        for label, pt in fig3_run(args, job, root, out, ckpts).items():
            results.setdefault(label, {})[str(job["side"])] = pt
        short, long = job["short"], job["long"]
        h, w = run_hw(
            samples[0], args.dataset, argparse.Namespace(backbone=args.backbone, short_side=short, long_side=long)
        )
        run_size[str(job["side"])] = dict(short=short, long=long, run_hw=[h, w], area=h * w, target=job["side"] ** 2)
        bar.update(len(job["modes"]))
    bar.close()
    record = dict(
        figure="fig3",
        dataset=args.dataset,
        backbone=args.backbone,
        window=teacher_window(args, backbone),
        naflex=dict(backbone=NAFLEX, patches=args.naflex_patches or "all") if args.naflex_pretrained else None,
        device=device_name(backbone.device),
        areas=areas,
        run_size=run_size,
        skipped=skipped,
        results=results,
        paper=dict(areas=list(FIG3_AREAS), **PAPER_FIG3),
    )
    write_outputs(out, "fig3", record, fig3_markdown(record), lambda p: fig3_plot(record, p))
    return record


def fig3_markdown(r: dict) -> str:
    sides = [str(a) for a in r["areas"]]
    head = "| mode | " + " | ".join(f"{s}^2" for s in sides) + " |"
    lines = [f"# Fig. 3: mIoU (%) / seconds per image vs resolution, {r['dataset']} ({r['backbone']}, {r['device']})"]
    lines += ["", head, "|---|" + "---:|" * len(sides)]
    for mode, by_side in r["results"].items():
        cells = [f"{by_side[s]['miou']:.1f} / {by_side[s]['seconds']:.3g}" if s in by_side else "--" for s in sides]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    paper = r["paper"]
    lines += ["", "Paper (Cityscapes, SigLIP2 B/16, their GPU):", ""]
    lines += ["| mode | " + " | ".join(f"{a}^2" for a in paper["areas"]) + " |", "|---|" + "---:|" * 5]
    for name in PAPER_FIG3:
        secs = paper[name]["seconds"] or [None] * 5
        cells = [f"{v:.1f}" + (f" / {s:g}" if s else "") for v, s in zip(paper[name]["miou"], secs)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- skipped: {s}" for s in r["skipped"])]
    return "\n".join(lines) + "\n"


def fig3_plot(r: dict, path: Path):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, by_side in r["results"].items():
        xs = [a for a in r["areas"] if str(a) in by_side]
        a1.plot(xs, [by_side[str(a)]["miou"] for a in xs], "o-", label=mode)
        a2.plot(xs, [by_side[str(a)]["seconds"] for a in xs], "o-", label=mode)
    for name, ref in PAPER_FIG3.items():
        a1.plot(FIG3_AREAS, ref["miou"], "^:", color="0.6", label=name)
        if ref["seconds"]:
            a2.plot(FIG3_AREAS, ref["seconds"], "^:", color="0.6", label=name)
    for ax, what in ((a1, "mIoU (%)"), (a2, "seconds per image (log)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted(set(r["areas"]) | set(FIG3_AREAS)), [str(a) for a in sorted(set(r["areas"]) | set(FIG3_AREAS))]
        )
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("resolution: side of the square of equal area (px, log)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    a2.set_yscale("log")
    a1.legend(fontsize=7)
    fig.suptitle(f"Fig. 3, {r['dataset']}, {r['backbone']} on {r['device']} (grey: paper)", fontsize=10)
    fig.tight_layout()
    savefig(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Fig. 5: qualitative maps and the PCA view of the dense features
# ----------------------------------------------------------------------------------------------------------------


def fig5_models(args, backbone) -> list[tuple[str, object, str | None]]:
    """[(name, SegmentSettings, checkpoint | None)]: the pre-trained single pass, the teacher at --stride (and
    --window), each checkpoint; the teacher's settings checked before any work."""
    from segment import SegmentSettings, check_stride, window_teacher

    sides = dict(short_side=args.short_side, long_side=args.long_side)
    single = SegmentSettings(mode="single", **sides)
    slide = SegmentSettings(mode="slide", stride=args.stride, window=args.window, **sides)
    window_teacher(backbone, slide)  # a bad --window (first) or --stride: TeacherError, one sentence
    check_stride(args.stride, backbone, "--stride", args.window)
    teacher = f"teacher s={args.stride}" + (f" K={args.window}" if args.window else "")
    models = [("single pass", single, None), (teacher, slide, None)]
    return models + [(n, single, p) for n, p in parse_named(args.checkpoint, "--checkpoint", bare="SPAR").items()]


def fig5_key(args, image: str, how, checkpoint: str | None, text_id: str) -> dict:
    """What one (image, model) panel pair depends on, by content: the image's bytes, the weights', the checkpoint's,
    the settings, the device kind and the class text; a cached pair made with other values is recomputed."""
    from checkpoints import weights_sha1

    settings = {k: v for k, v in dataclasses.asdict(how).items() if (k, v) != ("lposs_k", LPOSS_K)}  # as before it
    return dict(
        format=1,
        image_sha1=content_sha1(image),
        backbone=args.backbone,
        pretrained=str(args.pretrained),
        pretrained_sha1=weights_sha1(args.pretrained),
        checkpoint_sha1=content_sha1(checkpoint) if checkpoint else None,
        settings=settings,
        device=resolve_device(args.device).type,
        text=text_id,
    )


def fig5_cached(path: Path, key: dict) -> dict | None:
    """A cached pair {labels, feats} made with `key`, else None (missing, another key, or unreadable)."""
    try:
        got = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or corrupt: recomputed
        return None
    ok = (
        isinstance(got, dict)
        and got.get("key") == key
        and all(torch.is_tensor(got.get(k)) for k in ("labels", "feats"))
    )
    return got if ok else None


def fig5_compute(args, image: torch.Tensor, how, checkpoint, text) -> dict:
    """One image through one model: its label map at the image's size and its dense features on its grid."""
    from segment import dense_features, resize_image, run_size, segment, window_teacher

    model = load_model(args.backbone, args.pretrained, resolve_device(args.device), checkpoint)
    teacher = window_teacher(model, how) if how.mode == "slide" else None
    seg = segment(model, image.to(model.device), text, how, teacher=teacher)
    x = model.normalize(resize_image(image.to(model.device), run_size(*image.shape[-2:], how, model.patch_size)))
    return dict(labels=seg.labels[0].cpu(), feats=dense_features(model, x, how, teacher)[0].cpu())


def fig5_inputs(args) -> tuple[list[tuple[str, str | None]], list[list[str]]]:
    """[(image path, label path | None)] and the class list."""
    if args.images:
        if not args.classes:
            raise FigureError("--images needs --classes 'a,b,c' (or use --dataset with --root / --synthetic).")
        return [(p, None) for p in args.images], benchmarks.parse_classes(args.classes)
    root = synthetic_root(args.synthetic, args.dataset, args.num_synthetic) if args.synthetic else args.root
    if not root:
        raise FigureError("give --images PATH... with --classes, or --dataset with --root DIR (or --synthetic DIR).")
    samples, classes = benchmarks.benchmark(args.dataset, root, args.max_images or 3)
    return [(s.image, s) for s in samples], classes


def fig5_row(args, image_path, sample, models, text, text_id: str, cache: Path) -> dict:
    """One image through every model (each (image, model) pair from the cache when it holds it, else computed and
    cached atomically, so an interrupted figure resumes): label maps at the image size, dense features."""
    from files import load_image

    if sample is not None:
        image, label = benchmarks.read_sample(sample)
        image, label = image[None].float() / 255, label.numpy()
    else:
        image, label = load_image(image_path), None
    row = dict(image=image[0].permute(1, 2, 0).numpy(), label=label, labels=[], feats=[], computed=0)
    for _, how, checkpoint in models:
        key = fig5_key(args, image_path, how, checkpoint, text_id)
        path = cache / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".pt")
        got = fig5_cached(path, key)
        if got is None:
            got = dict(key=key, **fig5_compute(args, image, how, checkpoint, text))
            save_torch(path, got)
            row["computed"] += 1
        row["labels"].append(got["labels"].numpy())
        row["feats"].append(got["feats"])
    return row


def fig5(args) -> dict:
    from tqdm import tqdm

    from segment import run_size, text_embeddings, window_teacher
    from textcache import cache_dir_arg

    out = Path(args.out)
    check_writable(out / "fig5.json")
    check_numbers([("--max-images", args.max_images, (">=", 1)), ("--stride", args.stride, (">=", 1))])
    inputs, classes = fig5_inputs(args)
    backbone = load_base(args)
    models = fig5_models(args, backbone)
    hws = [run_size(*image_hw(path), models[1][1], backbone.patch_size) for path, _ in inputs]
    K, teacher = teacher_window(args, backbone, hws), window_teacher(backbone, models[1][1])
    templates = benchmarks.read_templates(args.templates)
    text = text_embeddings(backbone, classes, templates, cache_dir_arg(args.text_cache))
    text_id = hashlib.sha256(json.dumps([classes, templates]).encode()).hexdigest()[:16]
    rows, summary, computed = [], [], 0
    for (path, sample), hw in zip(tqdm(inputs, desc="fig5", unit="img"), hws):
        row = fig5_row(args, path, sample, models, text, text_id, out / "fig5" / "cache")
        view = pca_rgb(row["feats"])
        row["pca"], computed = view.images, computed + row["computed"]
        rows.append(row)
        summary.append(fig5_summary(path, row, view, [m[0] for m in models], text.num_classes))
        summary[-1]["teacher_windows"] = teacher.num_windows(*hw)  # (E1): K x K windows at --stride
    print(f"fig5: {computed} of {len(inputs) * len(models)} (image, model) pairs computed, the others cached")
    record = dict(figure="fig5", backbone=args.backbone, window=K, models=[m[0] for m in models], images=summary)
    md = "# Fig. 5: qualitative maps and PCA\n\n" + "\n".join(
        f"- {display_name(s['image'])}: " + ", ".join(f"{m} pixel acc {a}" for m, a in s["pixel_accuracy"].items())
        for s in summary
    )
    write_outputs(out, "fig5", record, md + "\n", lambda p: fig5_plot(rows, record, p))
    return record


def image_hw(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def fig5_summary(path, row, view, names, num_classes) -> dict:
    label = row["label"]
    acc = {}
    for name, lab in zip(names, row["labels"]):
        keep = label != benchmarks.IGNORE if label is not None else None
        acc[name] = round(float((lab[keep] == label[keep]).mean()), 4) if keep is not None and keep.any() else None
    return dict(
        image=str(path),
        grids=[list(f.shape[:2]) for f in row["feats"]],
        pixel_accuracy=acc,
        pca_components=view.components.round(6).tolist(),
        pca_mean_rgb=[img.reshape(-1, 3).mean(0).round(6).tolist() for img in view.images],
    )


def fig5_plot(rows, record, path: Path):
    plt = pyplot()
    names = record["models"]
    cols = 2 + 2 * len(names)
    aspect = max(0.35, min(1.5, rows[0]["image"].shape[0] / rows[0]["image"].shape[1]))  # row height / width
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, (1.9 * aspect + 0.3) * len(rows)), squeeze=False)
    palette = np.vstack([class_colours(256)[:255], [[0, 0, 0]]]).astype(np.float32) / 255
    for r, row in enumerate(rows):
        panels = [("image", row["image"]), ("label", None if row["label"] is None else palette[row["label"]])]
        panels += [(n, palette[np.minimum(lab, 255)]) for n, lab in zip(names, row["labels"])]
        panels += [(f"PCA {n}", img) for n, img in zip(names, row["pca"])]
        for ax, (title, img) in zip(axes[r], panels):
            ax.axis("off")
            if img is not None:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"Fig. 5, {record['backbone']}: maps and PCA (3 components fitted jointly per image)", fontsize=9)
    fig.tight_layout()
    savefig(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Ablations: a grid of distill.py settings, each trained and evaluated
# ----------------------------------------------------------------------------------------------------------------


def ablate_grid(args) -> list[dict]:
    parts = args.train or ["blk_-1,blk_-2"]
    strides, counts = parse_ints(args.strides, "--strides"), parse_ints(args.num_images, "--num-images")
    epochs = parse_ints(args.epochs, "--epochs")
    grid = []
    for train, stride, n, ep in itertools.product(parts, strides, counts, epochs):
        name = safe(f"{train}_s{stride}_n{n}_e{ep}")
        grid.append(dict(name=name, train=train, stride=stride, images=n, epochs=ep))
    return grid


def ablate_one(args, cell: dict, out: Path, dataset) -> dict:
    import distill

    run = out / "ablate" / cell["name"]
    ckpt = run / "student.pt"
    if not (ckpt.is_file() and (run / "metrics.json").is_file()):
        argv = ["--backbone", args.backbone, "--pretrained", args.pretrained, "--device", args.device, "--resume"]
        argv += ["--out", str(run), "--train", cell["train"], "--stride", str(cell["stride"])]
        argv += ["--max-images", str(cell["images"]), "--epochs", str(cell["epochs"])]
        argv += (["--images", args.images] if args.images else []) + shlex.split(args.distill_args or "")
        with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
            distill.main(argv)
    metrics = read_json(run / "metrics.json") or {}
    held = metrics.get("heldout") or [{}]
    result = dict(cell, heldout=held, train_loss=metrics.get("train_loss"))
    if dataset:
        name, root = dataset
        res = run / f"eval-{name}.json"
        result["miou"] = point(
            run_modes(args, eval_argv(args, name, root, res, ["single"], str(ckpt)), res, ["single"])["single"]
        )
    return result


def ablate(args) -> dict:
    out = Path(args.out)
    check_writable(out / "ablate.json")
    check_numbers([("--max-images", args.max_images, (">=", 1))])
    grid = ablate_grid(args)
    dataset = None
    if args.dataset:
        root = synthetic_root(args.synthetic, args.dataset, args.num_synthetic) if args.synthetic else args.root
        if not root:
            raise FigureError("--dataset needs --root DIR (or --synthetic DIR).")
        dataset = (args.dataset, root)
    from tqdm import tqdm

    rows = [ablate_one(args, cell, out, dataset) for cell in tqdm(grid, desc="ablate", unit="run")]
    record = dict(figure="ablate", backbone=args.backbone, dataset=args.dataset, rows=rows)
    write_outputs(out, "ablate", record, ablate_markdown(record), lambda p: ablate_plot(record, p))
    return record


def ablate_markdown(r: dict) -> str:
    lines = ["# Ablations (distill.py settings)", "", "Held-out student vs teacher per report size (long side), after"]
    lines += ["distillation (before in brackets); mIoU of the student (mode single) where --dataset was given.", ""]
    lines += [
        "| run | train | stride | max images | epochs | long side | MSE after (before) | cos after (before) | mIoU |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        miou = f"{row['miou']['miou']:.2f}" if row.get("miou") else "--"
        for h in [h for h in row["heldout"] if h] or [None]:
            mse = f"{h['after']['mse']:.4g} ({h['before']['mse']:.4g})" if h else "--"
            cos = f"{h['after']['cos']:.4f} ({h['before']['cos']:.4f})" if h else "--"
            lines.append(
                f"| {row['name']} | {row['train']} | {row['stride']} | {row['images']} | {row['epochs']} | "
                f"{h['long_side'] if h else '--'} | {mse} | {cos} | {miou} |"
            )
    return "\n".join(lines) + "\n"


def ablate_plot(r: dict, path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(r["rows"])), 3.5))
    names = [row["name"] for row in r["rows"]]
    after = [
        row["heldout"][0]["after"]["cos"] if row["heldout"] and row["heldout"][0] else math.nan for row in r["rows"]
    ]
    before = [
        row["heldout"][0]["before"]["cos"] if row["heldout"] and row["heldout"][0] else math.nan for row in r["rows"]
    ]
    x = np.arange(len(names))
    ax.bar(x - 0.2, before, 0.4, label="before", color="0.7")
    ax.bar(x + 0.2, after, 0.4, label="after", color="tab:blue")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out cosine, student vs teacher")
    finite = [v for v in before + after if not math.isnan(v)]
    if finite:  # the cosines sit near 1: zoom in
        ax.set_ylim(max(-1.0, min(finite) - 0.02), min(1.0, max(finite) + 0.01))
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="The paper's figures, one command each (resumable; JSON + Markdown + PNG under --out).",
        epilog="e.g. python figures.py fig1 --backbone tiny --synthetic /tmp/syn --strides 64,24",
    )
    sub = p.add_subparsers(dest="figure", required=True)
    f1 = sub.add_parser("fig1", help="speed vs accuracy, mean of the six benchmarks")
    add_common(f1)
    f1.add_argument("--roots", nargs="*", metavar="NAME=DIR", help="each dataset's folder, e.g. voc21=VOC")
    f1.add_argument("--datasets", default=",".join(SIX), help="comma-separated (default: the six)")
    f1.add_argument("--dataset", choices=list(benchmarks.DATASETS), help="one dataset instead (with --root)")
    f1.add_argument("--root", help="the --dataset folder")
    f1.add_argument("--strides", default=",".join(map(str, FIG1_STRIDES)), help="teacher strides (default %(default)s)")
    f3 = sub.add_parser("fig3", help="accuracy and seconds vs resolution (pixel area)")
    add_common(f3)
    f3.add_argument("--dataset", default="cityscapes", choices=list(benchmarks.DATASETS))
    f3.add_argument("--root", help="the dataset folder")
    f3.add_argument("--areas", default=",".join(map(str, FIG3_AREAS)), help="sides of the equal-area squares")
    f3.add_argument("--strides", default="256,24", help="teacher strides (default %(default)s)")
    f3.add_argument(
        "--naflex-pretrained",
        metavar="PATH|none",
        help=f"also the NaFlex baseline ({NAFLEX}): its weights, a local open_clip state dict ('none': random; "
        "it has no released weights in open_clip); without it the line is skipped, and said",
    )
    f3.add_argument(
        "--naflex-patches",
        default="all",
        type=patch_budget,
        metavar="N|all",
        help="the NaFlex baseline's patch budget (default: all, the image's own grid at each area; a number: "
        "every area resized to that many patches)",
    )
    f5 = sub.add_parser("fig5", help="qualitative maps and PCA of the dense features")
    add_common(f5)
    f5.add_argument("--images", nargs="*", help="image files (with --classes) instead of a dataset")
    f5.add_argument("--classes", help="comma-separated class names for --images")
    f5.add_argument("--dataset", default="voc21", choices=list(benchmarks.DATASETS))
    f5.add_argument("--root", help="the dataset folder (its first --max-images images, default 3)")
    f5.add_argument("--stride", type=int, default=24, help="the teacher's stride (default %(default)s)")
    ab = sub.add_parser("ablate", help="a grid of distill.py settings, trained and evaluated")
    add_common(ab, teacher=False, checkpoints=False)  # it trains its own students, with distill.py's teacher
    ab.add_argument("--train", action="append", help="trained parts, repeatable (e.g. blk_-1,blk_-2; all)")
    ab.add_argument("--strides", default="24", help="teacher strides (default %(default)s)")
    ab.add_argument("--num-images", default="4", help="training images, comma-separated (default %(default)s)")
    ab.add_argument("--epochs", default="1", help="epochs, comma-separated (default %(default)s)")
    ab.add_argument("--images", help="training images folder (default: distill.py's, assets/)")
    ab.add_argument("--distill-args", help="more distill.py flags, e.g. '--aug-scale 0.25 --eval-sizes 192'")
    ab.add_argument("--dataset", choices=list(benchmarks.DATASETS), help="also evaluate each student here")
    ab.add_argument("--root", help="the --dataset folder")
    return p


def _run(argv=None):
    args = build_parser().parse_args(argv)
    with reuse_backbones():
        return {"fig1": fig1, "fig3": fig3, "fig5": fig5, "ablate": ablate}[args.figure](args)


def main(argv=None):
    return main_guard(_run, argv, "interrupted; finished runs are kept under --out and a rerun resumes from there.")


if __name__ == "__main__":
    main()
