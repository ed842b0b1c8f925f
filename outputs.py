"""What segment.py writes and prints, for one image or a folder of them (not a part of the paper).

* `output_files` -- the files of one image: [<stem>.pt (--save-features)], [<stem>.png mask, <stem>_overlay.png];
* `save_features` -- the fp16 (h, w, C) dense features of one image and what made them (grid, sizes, backbone, mode);
* `save_pictures` -- the mask and the overlay of one image (`pictures.py`);
* `print_report` -- one image's summary: sizes, settings, per-class pixel shares, timings, files written;
* `plan_folder` -- every image of DIR (`files.list_images` order, an OUTDIR inside DIR left out) and the output
                   files of each under OUTDIR, the folder locked and checked against its settings record
                   (`OUTDIR/segment.json`) BEFORE any work: an OUTDIR written with other settings is refused;
                   an image whose outputs all exist (newer than the image) under the same record is done, one
                   skipped before and unchanged since (`OUTDIR/segment.skipped.json`) is skipped again;
* `run_folder`  -- the pending images through `work(path, outputs)` under a tqdm bar; an image that cannot be
                   used gets one `skip: 'path': reason.` line and the run goes on.

Each output is written atomically by `work` (`files.atomic_write`), so Ctrl-C loses no finished image and the
same command run again does only what is left.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from cli import UserError, display_name, hxw, log
from files import (
    WriteError,
    check_writable,
    clean_temp_files,
    file_sha1,
    list_images,
    lock,
    read_json,
    save_torch,
    write_json,
)
from naflex import DEFAULT_PATCHES
from pictures import check_mask_path, class_shares, overlay_path, save_mask, save_overlay
from refine import RefineSettings


def output_files(stem: str | Path, features: bool, masks: bool) -> list[Path]:
    """The files of one image, in the order they are written (the last one marks it done)."""
    mask = Path(stem).with_suffix(".png")
    return [mask.with_suffix(".pt")] * features + [mask, overlay_path(mask)] * masks


def default_mask(image: str) -> Path:
    """Where one image's mask goes without --out: runs/segment/<image stem>.png (runs/ is ignored by git)."""
    return Path("runs") / "segment" / (Path(image).stem + ".png")


def check_outputs(args, folder: bool) -> bool:
    """Refuse an --out that cannot be used BEFORE any work; True when masks are made (classes are given), False
    for --save-features alone."""
    masks = not args.save_features or bool(args.classes or args.class_file)
    if folder and not args.out:
        raise UserError("a folder of images needs --out OUTDIR, the folder the outputs go to.")
    if args.save_features and args.mode == "slidelogit":
        raise UserError("mode 'slidelogit' gives logits, not features: --save-features needs single or slide.")
    if not folder:
        out = Path(args.out or default_mask(args.image))
        check_mask_path(out) if masks else check_writable(out.with_suffix(".pt"))
    return masks


def save_features(path: Path, feats: torch.Tensor, image_hw, run_hw, backbone, settings):
    """(h, w, C) features as fp16, with the grid (h, w), the image's (H, W), the size it ran at and what made them
    (backbone name, patch size, mode, stride): a dict in a `.pt` file, written atomically."""
    feats = feats.half().cpu().contiguous()
    grid = list(feats.shape[:2])
    sizes = {"image_size": list(image_hw), "run_size": list(run_hw)}
    what = {"backbone": backbone.name, "patch_size": backbone.patch_size, "mode": settings.mode}
    save_torch(path, {"features": feats, "grid": grid, **sizes, **what, "stride": settings.stride})


def save_pictures(image: torch.Tensor, labels, names: list[str], outs: list[Path], title: str):
    """The mask and the overlay of one image (1, 3, H, W) in [0, 1] and its (H, W) label map, atomically."""
    save_mask(labels, len(names), outs[0], names)
    save_overlay(image[0].permute(1, 2, 0).numpy(), labels, names, outs[1], title)


def folder_record(args, settings, checkpoint, classes, templates) -> dict:
    """What decides a folder's outputs; a rerun with a different record is refused (see `plan_folder`)."""
    post = {f.name: f.default for f in fields(RefineSettings)}  # refine.py's fields: left out at their defaults,
    kept = {k: v for k, v in asdict(settings).items() if k not in post or v != post[k]}  # so older records match
    record = {"backbone": args.backbone, "pretrained": args.pretrained, "settings": kept}
    if args.backbone.endswith("naflex-b16") and args.naflex_patches != DEFAULT_PATCHES:  # a budget that is not
        record["naflex_patches"] = args.naflex_patches  # the reference one decides the outputs (older records match)
    return record | {"checkpoint": checkpoint and file_sha1(checkpoint), "classes": classes, "templates": templates}


def print_report(name: str, seg, names: list[str] | None, setup: str, args, seconds, outs: list[Path]):
    """One image's summary: its size and the run's setup (and `args.protocol`, `args.amp`), the per-class pixel
    shares of `seg` (a Segmentation; None: features only), the timings (model load, text, total), the files."""
    if seg is not None:
        labels = seg.labels[0].cpu().numpy()
        H, W = labels.shape
        precision = "amp" if args.amp else "fp32"
        print(f"{name}: {hxw(H, W)} px {setup}, protocol {args.protocol}, {precision}, {len(names)} classes")
        shares, order = class_shares(labels, len(names))
        width = max(len(n) for n in names)
        for k in order:
            print(f"  {names[k]:<{width}}  {100 * shares[k]:6.2f} %")
        load, text, total = seconds
        print(f"segmentation {seg.seconds:.3f} s (model load {load:.2f} s, text {text:.2f} s, total {total:.2f} s)")
    what = {".png": "mask, pixel value = class index", ".pt": "fp16 features"}
    what = [what[p.suffix] if not p.stem.endswith("_overlay") else "overlay + legend" for p in outs]
    print("wrote " + " and ".join(f"{display_name(p)} ({w})" for p, w in zip(outs, what)))


@dataclass
class FolderPlan:
    folder: Path
    out_dir: Path
    jobs: list[tuple[Path, list[Path]]]  # (image, its output files), in list_images order
    pending: list[tuple[Path, list[Path]]] = field(default_factory=list)  # the jobs not done yet
    skipped: dict = field(default_factory=dict)  # image (relative) -> [size, mtime_ns, reason] of the skips
    lock: object = None  # the open flock on out_dir, held for the run


def done(image: Path, outputs: list[Path]) -> bool:
    """Every output exists and is not older than the image (an edited image is done again)."""
    try:
        mtime = image.stat().st_mtime
        return all(p.stat().st_mtime >= mtime for p in outputs)
    except OSError:
        return False


def file_key(image: Path) -> list:
    """What marks an image as unchanged since it was skipped: its size and mtime."""
    try:
        st = image.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return []


def folder_jobs(folder: Path, out_dir: Path, outputs) -> list[tuple[Path, list[Path]]]:
    """(image, its outputs under out_dir) for every image of folder (an out_dir inside it left out); two images
    that would write the same file (a.jpg, a.png) are refused."""
    inside = out_dir.resolve().is_relative_to(folder.resolve())
    jobs, owner = [], {}
    for rel in map(Path, list_images(str(folder))):
        if inside and (folder / rel).resolve().is_relative_to(out_dir.resolve()):
            continue
        outs = [out_dir / p for p in outputs(rel.with_suffix(""))]
        for p in outs:
            if p in owner:
                raise UserError(f"'{display_name(rel)}' and '{display_name(owner[p])}' would both write "
                                f"'{display_name(p)}'; rename one of them.")  # fmt: skip
            owner[p] = rel
        jobs.append((folder / rel, outs))
    return jobs


def check_record(out_dir: Path, record: dict, name: str) -> bool:
    """Write `record` to out_dir/name, or check it equals the one there -> True when the folder's outputs were
    made with these settings (False: a new folder, nothing in it is trusted)."""
    old = read_json(out_dir / name)
    if old is not None and old != record:
        changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        raise UserError(
            f"'{display_name(out_dir)}' holds outputs made with other settings ({', '.join(changed)} differ); "
            f"give another --out or delete that folder."
        )
    if old is None:
        write_json(out_dir / name, record)
    return old is not None


def plan_folder(folder: str, out_dir: str, outputs, record: dict, name: str = "segment") -> FolderPlan:
    """The images of `folder`, `outputs(relative path without suffix) -> [Path]` under `out_dir`, and the ones
    still to do, decided before any work: `record` (JSON-able settings) goes to out_dir/<name>.json or must
    equal the one there; images skipped before (out_dir/<name>.skipped.json) and unchanged are skipped again."""
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out '{display_name(out_dir)}' is a file; for a folder of images give an output folder.")
    jobs = folder_jobs(folder, out_dir, outputs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create --out '{display_name(out_dir)}' ({exc.strerror}).") from exc
    held = lock(str(out_dir), f"another run is writing to '{display_name(out_dir)}'; wait for it to finish.")
    clean_temp_files(str(out_dir))
    trusted = check_record(out_dir, record, f"{name}.json")
    skipped = (read_json(out_dir / f"{name}.skipped.json") or {}) if trusted else {}
    plan = FolderPlan(folder, out_dir, jobs, [], {}, held)
    for image, outs in jobs:
        rel = str(image.relative_to(folder))
        if rel in skipped and skipped[rel][:2] == file_key(image):  # unchanged since: skip it again, no work
            plan.skipped[rel] = skipped[rel]
            log(f"skip: '{display_name(image)}': {skipped[rel][2]}")
        elif not (trusted and done(image, outs)):
            plan.pending.append((image, outs))
    if not plan.pending:
        held.close()
        print(f"nothing to do: the {len(jobs)} images are done or skipped in {display_name(out_dir)}")
    return plan


def run_folder(plan: FolderPlan, work, desc: str = "images", name: str = "segment") -> tuple[int, int]:
    """`work(image, outputs)` for each pending image, under a tqdm bar, then a summary line -> (images done,
    images skipped).  A UserError of one image (unreadable, too small) is its `skip:` line, remembered in
    out_dir/<name>.skipped.json; a write error stops the run."""
    from tqdm import tqdm

    n_done = n_skip = 0
    t0 = time.perf_counter()
    with plan.lock:  # released at the end, Ctrl-C included
        for image, outs in tqdm(plan.pending, desc=desc, unit="img", dynamic_ncols=True):
            try:
                work(image, outs)
                n_done += 1
            except WriteError:
                raise
            except UserError as exc:
                n_skip += 1
                reason = f"{exc.reason}." if getattr(exc, "reason", None) else str(exc)  # ImageError: the why
                log(f"skip: '{display_name(image)}': {reason}")
                plan.skipped[str(image.relative_to(plan.folder))] = [*file_key(image), reason]
                write_json(plan.out_dir / f"{name}.skipped.json", plan.skipped)
    seconds = time.perf_counter() - t0
    print(
        f"{n_done} images in {seconds:.1f} s ({n_done / max(seconds, 1e-9):.2f} images/s), {n_skip} skipped, "
        f"{len(plan.jobs) - len(plan.pending)} done before; outputs in {display_name(plan.out_dir)}"
    )
    return n_done, n_skip
