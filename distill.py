"""Self-distillation of the single-pass student from the sliding-window teacher (SPAR, CVPR 2026, Sec. 3, Fig. 2).

The frozen pre-trained ViT, looking through overlapping K x K windows (E1) whose features are stitched (E2), is the
teacher; the same ViT run once on the whole image (E3) is the student.  Only the student's last blocks are trained,
to regress the teacher's raw features:

    (E4)  L(theta) = 1 / (h * w * C) * || F_S - F_T ||^2          (MSE on raw, un-normalised features)

`python distill.py --backbone siglip2-b16 --images DIR --out runs/NAME` runs four stages, each resumable:

  1. augment   each image once, with an RNG seeded by (--seed, file name): the authors' recipe (random keep-ratio
               resize, stretch or crop to multiples of 16, flip), stored as a lossless PNG so the teacher and the
               student see exactly the same pixels;
  2. teacher   stitched targets F_T (E1-E2) for every augmented image, cached as fp16 on disk, written atomically,
               skipped when already present and valid (sharded across ranks under torchrun);
  3. train     (E4) with AdamW, a global batch of 2 images (the paper: 2 GPUs x 1 image), images in file order,
               fp16 autocast + GradScaler on GPU; a checkpoint every epoch, the kept one is the epoch with the
               lowest training loss; `--resume` continues bit-exactly (same weights, optimizer state, data order);
  4. report    student-vs-teacher MSE and mean cosine on held-out images, before and after distillation, at a
               resolution inside and one beyond the training range -> a table and `metrics.json`.

Without `--images`, the photos bundled in assets/ are used (4 to train, 2 held out), so that
`python distill.py --backbone tiny` runs offline in seconds on an idle 2-core CPU.  See `python distill.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import stat
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import student
from checkpoints import save_student
from files import TEMP_MARK, ImageError, WriteError, atomic_write, read_rgb, save_torch, write_json
from student import BackboneError, autocast
from teacher import Teacher, TeacherError, grid_size

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
ASSET_HELDOUT = ("chelsea.jpg", "rocket.jpg")  # held out of the bundled six (see assets/README.md)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_ASPECT = 10.0  # longer / shorter side; beyond it the short-side upscale would explode the image

# The authors' augmentation: fit (long, short) * r, r ~ U(r_min, 1); short side >= 512 ("crop": our earlier variant).
AUGMENT = {
    "paper": dict(fit=(2048, 1024), r_min=0.5),
    "extended": dict(fit=(2560, 2560), r_min=0.2),
    "crop": dict(fit=(2048, 1024), r_min=0.5),
}
MIN_SIDE = 512
TRAIN_PARTS = (
    "blk_N, qkv_N, mlp_N (N may be negative: blk_-1 is the last block), attn_pool_kv, posembed, patchembed, all"
)
EVAL_LONG_SIDES = (1024, 3072)  # held-out report: inside / beyond the paper's training sizes
TINY_SCALE = 0.25  # tiny backbone: K = 128 = 512 / 4, so every pixel size of the recipe is scaled by 1/4


class DistillError(RuntimeError):
    """Bad input or environment; the message is one sentence saying what happened and what to do."""


class ImageSkip(Exception):
    """This one image cannot be used; the message is the reason (logged, the run goes on)."""


# ----------------------------------------------------------------------------------------------------------------
# Small utilities: logging, atomic writes, distributed helpers
# ----------------------------------------------------------------------------------------------------------------


def log(msg: str):
    """One line to stderr that does not break the tqdm bars; prefixed with the rank under torchrun."""
    prefix = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
    tqdm.write(printable(f"{prefix}{msg}"), file=sys.stderr)


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes shown as \\xNN escapes: any stream can print it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def clean_temp_files(run_dir: str) -> int:
    """Remove temp files left by a killed writer (never a finished file)."""
    n = 0
    for root, _, files in os.walk(run_dir):
        for name in files:
            if TEMP_MARK in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    n += 1
    return n


def file_sha1(path: str) -> str | None:
    """sha1 of a file's bytes, None when it cannot be read (a stored PNG is verified before it is trusted)."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def seeded_rng(*parts) -> random.Random:
    """An RNG that depends only on its parts (e.g. seed and file name), not on the order images are processed."""
    digest = hashlib.sha1(os.fsencode("/".join(str(p) for p in parts))).digest()  # any file name, even non-UTF-8
    return random.Random(int.from_bytes(digest[:8], "little"))


# ----------------------------------------------------------------------------------------------------------------
# Images: careful reading, the augmentation recipe (stage 1)
# ----------------------------------------------------------------------------------------------------------------


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: sa_2.jpg before sa_10.jpg (SA-1B ids)."""
    return [int(tok) if i % 2 else tok for i, tok in enumerate(re.split(r"(\d+)", name))]  # odd: the digit runs


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive, numbers in names sorted by value), as paths relative to it."""
    if not os.path.isdir(folder):
        raise DistillError(f"image folder '{folder}' does not exist; pass --images DIR with your photos.")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".") and regular_file(os.path.join(root, f)):
                found.append(os.path.relpath(os.path.join(root, f), folder))
    if not found:
        raise DistillError(
            f"no images ({', '.join(IMAGE_EXTS)}) found in '{folder}'; point --images at a folder of photos."
        )
    return sorted(found, key=lambda f: (natural_key(f), f))


def regular_file(path: str) -> bool:
    """True for a readable regular file; a dangling link, a link loop, a pipe ... is logged as a skip."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return True
        reason = "not a regular file"
    except FileNotFoundError:
        reason = "a symbolic link to nothing (its target does not exist)"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__  # e.g. "Too many levels of symbolic links" (a loop)
    log(f"skip: '{path}': {reason}.")
    return False


def read_image(path: str, min_side: int = 16) -> Image.Image:
    """An image file as 8-bit RGB (`files.read_rgb`); raises ImageSkip with the reason when it is unusable."""
    try:
        rgb = read_rgb(path)
    except ImageError as exc:
        raise ImageSkip(f"cannot read it ({exc.reason})") from exc
    W, H = rgb.size
    if min(W, H) < min_side:
        raise ImageSkip(f"it is {W}x{H} px, smaller than one {min_side} px patch")
    if max(W, H) / min(W, H) > MAX_ASPECT:
        raise ImageSkip(f"its aspect ratio {max(W, H) / min(W, H):.0f}:1 is beyond {MAX_ASPECT:.0f}:1")
    return rgb


def image_tensor(path: str) -> torch.Tensor:
    """A stored (augmented) PNG as a (3, H, W) uint8 tensor: small to pin and to copy to the GPU."""
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def min_side(scale: float, patch: int) -> int:
    """The recipe's 512 px minimum side, times --aug-scale, as a multiple of the patch (128 for tiny)."""
    return max(patch, round(MIN_SIDE * scale / patch) * patch)


def make_recipe(rng: random.Random, W: int, H: int, mode: str, scale: float, patch: int) -> dict:
    """The authors' augmentation for one W x H image, as plain numbers (stored next to the image).

    paper (the authors' code, step by step; every pixel size times `scale`, the multiple 16 = the patch stays):
      1. r ~ U(0.5, 1); keep-ratio resize by f = min(int(2048 r) / long, int(1024 r) / short), each side
         int(side * f + 0.5), bilinear without antialias (OpenCV INTER_LINEAR);
      2. short side < 512: stretch the whole image to max(int(side * 512 / short), 512), floored to 16; no crop;
      3. else with p = 0.5 the full image, stretched to (16 floor(W / 16), 16 floor(H / 16));
      4. else a crop: each side max(randint(floor(0.4 side), side), 512) floored to 16, at a uniform offset;
      5. horizontal flip with p = 0.5.
    extended: the same with int(2560 r) for both sides, r ~ U(0.2, 1) (the paper's best curve, "dagger").
    crop:     our earlier variant (`crop_recipe`); none: the image as it is (the teacher and the student pad it).
    """
    if mode == "none":
        return dict(augment=mode, r=None, resize=None, stretch=None, crop=None, final=[W, H], flip=False)
    if mode == "crop":
        return crop_recipe(rng, W, H, scale, patch)
    cfg, m = AUGMENT[mode], min_side(scale, patch)
    r = rng.uniform(cfg["r_min"], 1.0)
    fit_long, fit_short = int(cfg["fit"][0] * scale * r), int(cfg["fit"][1] * scale * r)
    f = min(fit_long / max(W, H), fit_short / min(W, H))
    W1, H1 = int(W * f + 0.5), int(H * f + 0.5)  # step 1 (rounding half up, as the authors)
    stretch = crop = None
    if min(W1, H1) < m:  # step 2: upscale, never crop
        s = m / min(W1, H1)
        stretch = [max(int(W1 * s), m) // patch * patch, max(int(H1 * s), m) // patch * patch]
    elif rng.random() < 0.5:  # step 3: the full image
        stretch = [W1 // patch * patch, H1 // patch * patch]
    else:  # step 4: a crop, sides in [0.4 side, side]
        ch = max(rng.randint(2 * H1 // 5, H1), m) // patch * patch
        cw = max(rng.randint(2 * W1 // 5, W1), m) // patch * patch
        y, x = rng.randint(0, H1 - ch), rng.randint(0, W1 - cw)
        crop = [x, y, cw, ch]
    final = stretch if stretch else crop[2:]
    return dict(
        augment=mode, r=r, resize=[W1, H1], stretch=stretch, crop=crop, final=list(final), flip=rng.random() < 0.5
    )  # step 5


def crop_recipe(rng: random.Random, W: int, H: int, scale: float, patch: int) -> dict:
    """Our earlier crop-based variant (`--augment crop`): fit (2048 r, 1024 r) with round(); with p = 0.5 a crop of
    sides ~ U[0.4, 1] * side (>= 512); a short side < 512 upscaled to 512 after the crop; sides floored to 16 by
    cropping the bottom/right; PIL's (antialiased) bilinear resizes; flip with p = 0.5."""
    cfg, m = AUGMENT["crop"], min_side(scale, patch)
    r = rng.uniform(cfg["r_min"], 1.0)
    fit_long, fit_short = cfg["fit"][0] * r * scale, cfg["fit"][1] * r * scale
    f = min(fit_long / max(W, H), fit_short / min(W, H))  # mmcv-style keep-ratio "fit"
    W1, H1 = max(1, round(W * f)), max(1, round(H * f))
    crop = None
    if rng.random() >= 0.5:  # p = 0.5: random crop, sides >= min side
        cw = min(W1, max(m, round(rng.uniform(0.4 * W1, W1))))
        ch = min(H1, max(m, round(rng.uniform(0.4 * H1, H1))))
        crop = [rng.randint(0, W1 - cw), rng.randint(0, H1 - ch), cw, ch]
    W2, H2 = (crop[2], crop[3]) if crop else (W1, H1)
    upscale = None
    if min(W2, H2) < m:  # short side -> min side, keeping the ratio
        s = m / min(W2, H2)
        upscale = [max(m, round(W2 * s)), max(m, round(H2 * s))]
        W2, H2 = upscale
    final = [max(patch, W2 // patch * patch), max(patch, H2 // patch * patch)]
    return dict(augment="crop", r=r, resize=[W1, H1], crop=crop, upscale=upscale, final=final, flip=rng.random() < 0.5)


def resize_bilinear(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size[1], size[0]) uint8: bilinear, pixel centres (align_corners=False), NO antialias
    when shrinking -- OpenCV's INTER_LINEAR, which the authors use (PIL's bilinear would blur every SA-1B image)."""
    W, H = size
    if tuple(x.shape[-2:]) == (H, W):
        return x
    y = F.interpolate(x[None].float(), size=(H, W), mode="bilinear", align_corners=False, antialias=False)[0]
    return y.round().clamp(0, 255).to(torch.uint8)


def apply_recipe(im: Image.Image, rc: dict) -> Image.Image:
    """Replay a recipe from `make_recipe` (or `eval_recipe`) on an RGB image."""
    if rc["augment"] in ("crop", "eval"):
        return apply_pil_recipe(im, rc)
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    if rc["resize"]:
        x = resize_bilinear(x, rc["resize"])  # step 1
    if rc["stretch"]:
        x = resize_bilinear(x, rc["stretch"])  # steps 2-3
    if rc["crop"]:
        cx, cy, cw, ch = rc["crop"]
        x = x[:, cy : cy + ch, cx : cx + cw]  # step 4
    if rc["flip"]:
        x = x.flip(-1)  # step 5
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def apply_pil_recipe(im: Image.Image, rc: dict) -> Image.Image:
    """`--augment crop` and the held-out resizes: PIL's bilinear (antialiased when shrinking)."""
    if rc["resize"]:
        im = im.resize(tuple(rc["resize"]), Image.BILINEAR)
    if rc["crop"]:
        x, y, w, h = rc["crop"]
        im = im.crop((x, y, x + w, y + h))
    if rc.get("upscale"):
        im = im.resize(tuple(rc["upscale"]), Image.BILINEAR)
    if list(im.size) != list(rc["final"]):
        im = im.crop((0, 0, *rc["final"]))
    return ImageOps.mirror(im) if rc["flip"] else im


def eval_recipe(W: int, H: int, long_side: int, patch: int) -> dict:
    """Held-out images: resize keeping the ratio to the given long side, short side rounded to a multiple of p."""
    f = long_side / max(W, H)
    short = max(patch, round(min(W, H) * f / patch) * patch)
    size = [long_side, short] if W >= H else [short, long_side]
    return dict(augment="eval", r=None, resize=size, crop=None, upscale=None, final=size, flip=False)


# ----------------------------------------------------------------------------------------------------------------
# Jobs: which image goes where
# ----------------------------------------------------------------------------------------------------------------


def item_id(rel: str, suffix: str = "") -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(os.path.basename(rel))[0])
    return f"{stem[:40]}-{hashlib.sha1(os.fsencode(rel)).hexdigest()[:8]}{suffix}"  # fsencode: any file name


def split_images(args) -> tuple[str, list[str], str, list[str]]:
    """(train folder, train files, held-out folder, held-out files), files relative to their folder."""
    if args.images is None:  # the bundled photos, fixed split
        files = list_images(ASSETS)
        return ASSETS, [f for f in files if f not in ASSET_HELDOUT], ASSETS, [f for f in files if f in ASSET_HELDOUT]
    files = list_images(args.images)
    if args.heldout:
        train, held_dir, held = files, args.heldout, list_images(args.heldout)
        both = {os.path.realpath(os.path.join(args.images, f)) for f in train} & {
            os.path.realpath(os.path.join(args.heldout, f)) for f in held
        }
        if both:
            raise DistillError(
                f"{len(both)} file(s) are both in --images and --heldout (e.g. '{sorted(both)[0]}'); "
                f"held-out images must not be trained on."
            )
    else:
        if len(files) < 2:
            raise DistillError(
                f"'{args.images}' holds {len(files)} image; distillation needs at least 2 (one is "
                f"held out for the report), or pass --heldout DIR."
            )
        n = max(1, min(args.num_heldout, len(files) - 1))
        train, held_dir, held = files[:-n], args.images, files[-n:]  # the last n by name are held out
    if args.max_images:
        train = train[: args.max_images]
    return args.images, train, held_dir, held


def make_jobs(args, patch: int) -> list[dict]:
    """Stage-1 jobs: one per training image, one per (held-out image, evaluation size)."""
    train_dir, train, held_dir, held = split_images(args)
    jobs = []
    for rel in train:
        src = os.path.join(train_dir, rel)
        key = dict(
            source=os.path.abspath(src),
            bytes=os.path.getsize(src),
            augment=args.augment,
            scale=args.aug_scale,
            seed=args.seed,
            patch=patch,
        )
        jobs.append(dict(id=item_id(rel), kind="train", src=src, rel=rel, key=key))
    for rel in held:
        src = os.path.join(held_dir, rel)
        for L in args.eval_sizes:
            key = dict(source=os.path.abspath(src), bytes=os.path.getsize(src), long=L, patch=patch)
            jobs.append(dict(id=item_id(rel, f"-L{L}"), kind="heldout", src=src, rel=rel, key=key, long=L))
    return jobs


def job_dir(run: str, job: dict) -> str:
    return os.path.join(run, "augment" if job["kind"] == "train" else "heldout")


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: augment once, store the pixels
# ----------------------------------------------------------------------------------------------------------------


def stage_augment(jobs: list[dict], run: str, args, patch: int) -> list[dict]:
    """Write <id>.png + <id>.json for every job (this rank's share); returns the items usable by every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [j for i, j in enumerate(jobs) if i % world == rank]
    done = skipped = made = 0
    for job in tqdm(mine, desc="1/4 augment", unit="img", disable=not is_main()):
        meta_path = os.path.join(job_dir(run, job), job["id"] + ".json")
        meta = read_json(meta_path)
        if meta and meta.get("key") == job["key"]:
            if file_sha1(os.path.join(run, meta["image"])) == meta.get("sha1"):
                done += 1
                continue  # finished in an earlier run
            log(f"redo: '{meta['image']}' is missing or corrupt (its sha1 differs from the one recorded).")
        try:
            im = read_image(job["src"], min_side=patch)
        except ImageSkip as exc:
            log(f"skip: '{job['src']}': {exc}.")
            skipped += 1
            continue
        W, H = im.size
        if job["kind"] == "train":
            recipe = make_recipe(seeded_rng(args.seed, job["rel"]), W, H, args.augment, args.aug_scale, patch)
        else:
            recipe = eval_recipe(W, H, job["long"], patch)
        out = apply_recipe(im, recipe)
        buf = io.BytesIO()
        out.save(buf, format="PNG", compress_level=1)  # lossless: teacher and student see these pixels
        png = buf.getvalue()
        rel_png = os.path.join(os.path.basename(job_dir(run, job)), job["id"] + ".png")
        atomic_write(os.path.join(run, rel_png), lambda f: f.write(png))
        write_json(
            meta_path,
            dict(
                id=job["id"],
                kind=job["kind"],
                key=job["key"],
                recipe=recipe,
                image=rel_png,
                size=[out.height, out.width],
                sha1=hashlib.sha1(png).hexdigest(),
                source_size=[H, W],
            ),
        )  # written last: its presence means "done"
        made += 1
    if skipped or done:
        log(f"stage 1: {made} image(s) prepared, {done} already done in an earlier run, {skipped} skipped")
    barrier()
    items = []
    for job in jobs:  # every rank reads every rank's results
        meta = read_json(os.path.join(job_dir(run, job), job["id"] + ".json"))
        if meta and meta.get("key") == job["key"]:
            items.append(meta)
    return items


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: cached teacher targets (E1-E2)
# ----------------------------------------------------------------------------------------------------------------


def target_path(run: str, item: dict) -> str:
    return os.path.join(run, "targets", item["id"] + ".pt")


def teacher_key(backbone, args) -> dict:
    return dict(
        backbone=backbone.name,
        pretrained=str(args.pretrained),
        window=backbone.window,
        stride=args.stride,
        precision=args.precision,
        target_dtype=args.target_dtype,
    )


def target_valid(path: str, item: dict, key: dict, backbone) -> bool:
    """Present, readable, made by this teacher from these exact pixels, with the right shape (mmap: no full read)."""
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        H, W = item["size"]
        meta = {k: v for k, v in obj["meta"].items() if k != "rank"}  # rank: who wrote it (for the record)
        return meta == dict(key, image_sha1=item["sha1"]) and tuple(obj["target"].shape) == (
            *grid_size(backbone, H, W),
            backbone.dim,
        )
    except Exception:  # truncated / foreign file: recompute it
        log(f"recomputing '{path}': the cached file is unreadable or stale.")
        return False


def compute_target(teacher: Teacher, backbone, item: dict, run: str, device, dtype: str) -> torch.Tensor:
    try:
        img = image_tensor(os.path.join(run, item["image"]))
    except OSError as exc:
        raise ImageSkip(f"its stored image '{item['image']}' is unreadable ({exc}); delete it to redo it") from exc
    x = backbone.normalize(img[None].to(device).float() / 255.0)
    target = teacher(x)[0].float()  # (h, w, C): (E1) windows, (E2) stitched
    if not torch.isfinite(target).all():
        raise ImageSkip("the teacher's features are not finite")
    if dtype == "fp32":
        return target
    half = target.half()  # 12 MB instead of 24 at 1024 x 2048
    return half if torch.isfinite(half).all() else target  # fp16 unless it would overflow


def stage_teacher(items: list[dict], run: str, backbone, teacher: Teacher, args) -> list[dict]:
    """Compute the missing or invalid targets (this rank's share, one writer per file); returns the valid items."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    key = teacher_key(backbone, args)
    os.makedirs(os.path.join(run, "targets"), exist_ok=True)
    mine = [it for i, it in enumerate(items) if i % world == rank]
    cached = skipped = 0
    for item in tqdm(mine, desc="2/4 teacher targets", unit="img", disable=not is_main()):
        path = target_path(run, item)
        if target_valid(path, item, key, backbone):
            cached += 1
            continue
        try:
            target = compute_target(teacher, backbone, item, run, args.device, args.target_dtype)
        except (ImageSkip, torch.cuda.OutOfMemoryError) as exc:
            log(f"skip: '{item['id']}': {str(exc).splitlines()[0]}.")
            skipped += 1
            continue
        save_torch(path, dict(target=target.cpu().contiguous(), meta=dict(key, image_sha1=item["sha1"], rank=rank)))
    if cached:
        log(f"stage 2: {cached} target(s) found in the cache, teacher not run for them")
    barrier()
    return [it for it in items if target_valid(target_path(run, it), it, key, backbone)]


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: the regression (E4)
# ----------------------------------------------------------------------------------------------------------------


class CachedPairs(torch.utils.data.Dataset):
    """(augmented image as uint8, cached teacher target) pairs, read from the run folder."""

    def __init__(self, items: list[dict], run: str):
        self.items, self.run = items, run

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            img = image_tensor(os.path.join(self.run, item["image"]))
            target = torch.load(target_path(self.run, item), map_location="cpu", weights_only=True)["target"]
        except Exception as exc:
            raise DistillError(
                f"the cached image or target of '{item['id']}' vanished or is corrupt; run the same "
                f"command again with --resume (it is recomputed, training continues)."
            ) from exc
        return img, target


def parse_train(spec: str) -> list[str]:
    """--train "blk_-1,blk_-2" -> ["blk_-1", "blk_-2"]; unknown parts are an error (before any work)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in parts if not re.fullmatch(r"(blk|qkv|mlp)_-?\d+|attn_pool_kv|posembed|patchembed|all", p)]
    if bad or not parts:
        raise DistillError(f"--train: unknown part '{bad[0] if bad else spec}'; use comma-separated {TRAIN_PARTS}.")
    return parts


def train_parameters(backbone, parts: list[str]) -> list[torch.nn.Parameter]:
    """The parameters each --train part names (the authors' vocabulary), for SigLIP-style and OpenCLIP towers."""
    tower = backbone.image_tower()
    trunk = getattr(tower, "trunk", tower)  # SigLIP / tiny: the timm trunk; OpenCLIP: the tower itself
    blocks = list(backbone.blocks)
    chosen = []
    for part in parts:
        if part == "all":
            chosen += tower.parameters()
        elif part == "posembed":
            chosen.append(trunk.pos_embed if hasattr(trunk, "pos_embed") else trunk.positional_embedding)
        elif part == "patchembed":
            chosen += (trunk.patch_embed if hasattr(trunk, "patch_embed") else trunk.conv1).parameters()
        elif part == "attn_pool_kv":
            pool = getattr(trunk, "attn_pool", None)
            if pool is None or not hasattr(pool, "kv"):
                raise DistillError(
                    f"--train attn_pool_kv: {backbone.name} has no attention-pooling head (it pools "
                    f"with a CLS token); name other parts ({TRAIN_PARTS})."
                )
            chosen += pool.kv.parameters()
        else:
            kind, n = part.split("_")
            if not -len(blocks) <= int(n) < len(blocks):
                raise DistillError(
                    f"--train {part}: {backbone.name} has {len(blocks)} blocks, numbered 0.."
                    f"{len(blocks) - 1} or -1..-{len(blocks)} from the end."
                )
            blk = blocks[int(n)]
            if kind == "blk":
                chosen += blk.parameters()
            elif kind == "mlp":
                chosen += blk.mlp.parameters()
            elif hasattr(blk.attn, "qkv"):  # timm: one fused Linear
                chosen += blk.attn.qkv.parameters()
            else:  # nn.MultiheadAttention (OpenCLIP)
                chosen += [p for p in (blk.attn.in_proj_weight, blk.attn.in_proj_bias) if p is not None]
    return chosen


def select_trainable(backbone, parts: list[str]) -> list[str]:
    """Unfreeze the parts of --train (the final trunk norm and the pooling head only if named); names relative to
    image_tower()."""
    # ASSIGNMENT 5 BEGIN: unfreeze the named parts the dense features use, and nothing else (E4)
    tower = backbone.image_tower()
    tower.requires_grad_(False)
    for prm in train_parameters(backbone, parts):
        prm.requires_grad_(True)
    # Parameters the dense path never touches (e.g. the pooling head's query for SigLIP) would get no gradient:
    # keep them frozen, so that AdamW leaves them untouched and DDP does not wait for their gradients.
    x = torch.zeros(1, 3, backbone.window, backbone.window, device=backbone.device)
    backbone.dense(x).float().square().mean().backward()
    names = []
    for name, prm in tower.named_parameters():
        if prm.requires_grad and prm.grad is None:
            prm.requires_grad_(False)
        elif prm.requires_grad:
            names.append(name)
        prm.grad = None
    # ASSIGNMENT 5 END
    if not names:
        raise DistillError(
            f"--train {','.join(parts)} names no parameter that the dense features use; name "
            f"blocks, e.g. blk_-1,blk_-2."
        )
    return names


def epoch_order(n: int, batch: int, seed: int, epoch: int, shuffle: bool, world: int, rank: int) -> list[int]:
    """This rank's images for one epoch, batch / world of them per step: file order (the paper) or, with --shuffle,
    a permutation seeded by (seed, epoch); padded with the first images to whole global batches (DDP's sampler)."""
    order = list(range(n))
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    total = math.ceil(n / batch) * batch
    order = (order * math.ceil(total / n))[:total]
    return order[rank::world]  # step k of every rank together: order[k * batch:(k + 1) * batch]


LOSS_SYNC_EVERY = 20  # read the loss back to the host (a GPU sync) only every N steps


def image_loss(model, img, target, backbone, device, precision: str) -> torch.Tensor:
    """One image: (E3) single pass, (E4) MSE on raw features against its cached (E1-E2) target."""
    # ASSIGNMENT 5 BEGIN: the loss of one image, MSE on raw features (E4)
    x = backbone.normalize(img.to(device, non_blocking=True)[None].float() / 255.0)
    target = target.to(device, non_blocking=True)[None].float()
    with autocast(device, precision):
        feats = model(x)  # (1, h, w, C)
    return F.mse_loss(feats.float(), target)  # (E4): mean over h * w * C
    # ASSIGNMENT 5 END


def train_step(model, optimizer, scaler, batch: list, backbone, device, precision: str) -> torch.Tensor:
    """One optimizer step on this process's (image, target) pairs of a global batch; returns their summed loss.

    Each loss is divided by the number of pairs, so the accumulated gradient is their mean; DDP then averages
    over the processes: the gradient of the mean loss of the global batch (the paper: 2 GPUs x 1 image).
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (img, target) in enumerate(batch):
        syncs = i == len(batch) - 1 or not hasattr(model, "no_sync")  # DDP: one all-reduce, after the last image
        with contextlib.nullcontext() if syncs else model.no_sync():
            loss = image_loss(model, img, target, backbone, device, precision)
            scaler.scale(loss / len(batch)).backward()
        total += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return total


def run_settings(args) -> dict:
    """What a run must keep constant to be resumed (all that changes targets, augmentation or training; not
    --epochs): written to OUT/settings.json before any work and checked there by --resume."""
    return dict(
        backbone=args.backbone,
        pretrained=str(args.pretrained),
        stride=args.stride,
        train=args.train,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        precision=args.precision,
        target_dtype=args.target_dtype,
        augment=args.augment,
        aug_scale=args.aug_scale,
        seed=args.seed,
        shuffle=args.shuffle,
        keep=args.keep,
        max_images=args.max_images,
        images=os.path.abspath(args.images) if args.images else "assets",
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
    )


def save_state(run, backbone, names, optimizer, scaler, state, settings, with_student: bool = True):
    """student.pt (when this state is the one kept) first, then resume.pt (trained parameters + optimizer +
    position): a kill between the two makes --resume redo that step, which rewrites the same student.pt."""
    tower = backbone.image_tower()
    if with_student:
        kept_loss = state["kept"]["loss"] if state["kept"] else None
        info = dict(settings, epochs_done=state["epoch"], step_in_epoch=state["step"], train_loss=kept_loss)
        save_student(os.path.join(run, "student.pt"), backbone, info)
    params = dict(tower.named_parameters())
    save_torch(
        os.path.join(run, "resume.pt"),
        dict(
            format="spar-resume",
            settings=settings,
            trainable=names,
            state=state,
            params={n: params[n].detach().cpu() for n in names},
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
        ),
    )


def load_state(run, backbone, names, optimizer, scaler, settings) -> dict:
    """Restore the trained parameters and the optimizer from resume.pt; returns the saved position."""
    path = os.path.join(run, "resume.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DistillError(
            f"cannot read '{path}' ({type(exc).__name__}); the run cannot be resumed, start it "
            f"again without --resume (the caches are kept)."
        ) from exc
    old = {k: v for k, v in ck["settings"].items()}
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise DistillError(
            f"cannot resume: '{run}' was trained with {k}={old.get(k)!r}, now {settings[k]!r}; "
            f"use the same settings (only --epochs may change) or a new --out."
        )
    if ck["trainable"] != names:
        raise DistillError(f"cannot resume: '{path}' trained other parameters than these; use a new --out.")
    params = dict(backbone.image_tower().named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(ck["params"][n])
    optimizer.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    return ck["state"]


def stage_train(items: list[dict], run: str, backbone, args) -> dict:
    """(E4) regression; returns the training state (epoch, step, per-epoch loss history, the kept epoch)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    settings = dict(run_settings(args), train_images=len(items))
    names = select_trainable(backbone, parse_train(args.train))
    params = dict(backbone.image_tower().named_parameters())
    # fused=True on GPU: one kernel updates every parameter (matters for --train all, 93M parameters)
    optimizer = torch.optim.AdamW(
        [params[n] for n in names], lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    # loss scaling for fp16 only (the paper's GradScaler); bf16 and fp32 need none, and on CPU autocast is off
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.precision == "fp16")
    state = dict(epoch=0, step=0, loss_sum=0.0, loss_n=0, history=[], kept=None)
    resume_path, student_path = os.path.join(run, "resume.pt"), os.path.join(run, "student.pt")
    if args.resume and os.path.isfile(resume_path):
        state = load_state(run, backbone, names, optimizer, scaler, settings)
        if is_main() and state["epoch"] >= args.epochs:
            log(f"'{resume_path}': training already finished ({state['epoch']} epochs)")
        elif is_main():
            log(f"resuming from '{resume_path}': epoch {state['epoch'] + 1}, step {state['step']}")
    model = backbone
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None
        )
    data = CachedPairs(items, run)
    per_rank = args.batch_size // world  # images per process and step (divides: checked)
    steps = math.ceil(len(items) / args.batch_size)
    n_trainable = sum(params[n].numel() for n in names)
    if is_main() and state["epoch"] < args.epochs:
        log(
            f"stage 3: {len(items)} training image(s), {world} process(es), global batch {args.batch_size} "
            f"({per_rank} per process), {steps} step(s)/epoch, {n_trainable / 1e6:.2f}M trainable parameters "
            f"(--train {args.train})"
        )
    for epoch in range(state["epoch"], args.epochs):
        order = epoch_order(len(items), args.batch_size, args.seed, epoch, args.shuffle, world, rank)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=per_rank,
            sampler=order[state["step"] * per_rank :],
            collate_fn=list,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        bar = tqdm(
            loader,
            total=steps,
            initial=state["step"],
            desc=f"3/4 train epoch {epoch + 1}/{args.epochs}",
            unit="step",
            disable=not is_main(),
        )
        base = state["loss_sum"]
        running = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        for batch in bar:
            running += train_step(model, optimizer, scaler, batch, backbone, device, args.precision)
            state["step"] += 1
            state["loss_n"] += len(batch)
            saving = args.save_every and state["step"] % args.save_every == 0 and state["step"] < steps
            if saving or state["step"] % LOSS_SYNC_EVERY == 0:
                state["loss_sum"] = base + running.item()
                bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.4g}")
            if saving and is_main():
                save_state(run, backbone, names, optimizer, scaler, state, settings, args.keep == "last")
        state["loss_sum"] = base + running.item()
        mean = torch.tensor([state["loss_sum"], state["loss_n"]], dtype=torch.float64, device=device)  # NCCL: GPU
        if world > 1:
            dist.all_reduce(mean)
        loss = (mean[0] / max(mean[1], 1)).item()
        state["history"].append(dict(epoch=epoch + 1, loss=loss))
        keep = args.keep == "last" or state["kept"] is None or loss < state["kept"]["loss"]
        if keep:  # the paper keeps the epoch of lowest mean training loss
            state["kept"] = dict(epoch=epoch + 1, loss=loss)
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
        if is_main():
            save_state(run, backbone, names, optimizer, scaler, state, settings, keep)  # atomically, every epoch
            log(
                f"epoch {epoch + 1}: mean loss {loss:.5g}; "
                + (
                    f"checkpoint '{student_path}'"
                    if keep
                    else f"'{student_path}' keeps epoch {state['kept']['epoch']} (lower loss)"
                )
            )
        barrier()
    if is_main() and not os.path.isfile(student_path):  # --epochs 0: the pre-trained weights
        save_state(run, backbone, names, optimizer, scaler, state, settings)
    if is_main() and state["kept"] and state["kept"]["epoch"] != state["epoch"]:  # report the kept weights
        kept = torch.load(student_path, map_location="cpu", weights_only=True)["image_tower"]
        backbone.image_tower().load_state_dict(kept)
    backbone.requires_grad_(False)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: held-out report
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(backbone, items: list[dict], run: str, device, label: str, precision: str = "fp32") -> dict:
    """Per held-out size: mean over images of the (E4) MSE and of the mean per-patch cosine, student vs teacher."""
    out = {}
    for item in tqdm(items, desc=f"4/4 held-out ({label})", unit="img", leave=False, disable=not is_main()):
        x = backbone.normalize(image_tensor(os.path.join(run, item["image"]))[None].to(device).float() / 255.0)
        target = torch.load(target_path(run, item), map_location=device, weights_only=True)["target"].float()
        with autocast(device, precision):
            feats = backbone.dense(x)[0].float()
        row = out.setdefault(item["key"]["long"], dict(mse=0.0, cos=0.0, images=0))
        row["mse"] += F.mse_loss(feats, target).item()
        row["cos"] += F.cosine_similarity(feats, target, dim=-1).mean().item()
        row["images"] += 1
    for row in out.values():
        row["mse"] /= row["images"]
        row["cos"] /= row["images"]
    return out


def report(
    before: dict, after: dict, train_items: list[dict], state: dict, run: str, settings: dict, wall: float
) -> dict:
    longs = [max(it["size"]) for it in train_items]
    lo, hi = min(longs), max(longs)
    rows = []
    for L in sorted(before):
        rows.append(
            dict(
                long_side=L,
                images=before[L]["images"],
                seen_in_training=bool(lo <= L <= hi),
                before=dict(mse=before[L]["mse"], cos=before[L]["cos"]),
                after=dict(mse=after[L]["mse"], cos=after[L]["cos"]),
            )
        )
    kept = state["kept"]["epoch"] if state["kept"] else 0
    print(f"\nheld-out student vs teacher (training long sides {lo}-{hi} px; after = the kept epoch {kept})")
    print(
        f"{'long side':>9} {'images':>6} {'in training?':>13} | {'MSE before':>10} {'MSE after':>10} | "
        f"{'cos before':>10} {'cos after':>10}"
    )
    for r in rows:
        seen = "yes" if r["seen_in_training"] else "no (unseen)"
        print(
            f"{r['long_side']:>9} {r['images']:>6} {seen:>13} | {r['before']['mse']:>10.5g} "
            f"{r['after']['mse']:>10.5g} | {r['before']['cos']:>10.4f} {r['after']['cos']:>10.4f}"
        )
    metrics = dict(
        heldout=rows,
        train_loss=state["history"],
        kept_epoch=kept,
        train_long_sides=[lo, hi],
        settings=settings,
        wall_time_s=round(wall, 1),
    )
    write_json(os.path.join(run, "metrics.json"), metrics)
    print(f"saved {os.path.join(run, 'metrics.json')}")
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SPAR self-distillation (Sec. 3, Fig. 2): train the single-pass student (E3) to regress the "
        "sliding-window teacher (E1-E2) with the MSE of (E4).  Stages: 1 augment, 2 cache teacher "
        "targets, 3 train, 4 held-out report; each resumes without redoing finished work.  The "
        "defaults are the authors' protocol.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python distill.py --backbone tiny                      # offline demo, bundled photos\n"
        "  python distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b --max-images 25000\n"
        "  torchrun --nproc_per_node=2 distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b",
    )
    student.add_backbone_args(parser, default="siglip2-b16")
    parser.add_argument(
        "--images",
        default=None,
        help="folder of training photos, searched recursively, used in "
        "file-name order with numbers by value (default: the 6 bundled photos in assets/, 4 train "
        "+ 2 held out)",
    )
    parser.add_argument(
        "--heldout",
        default=None,
        help="folder of held-out photos for the report (default: the "
        "last --num-heldout files of --images, by name, are held out)",
    )
    parser.add_argument("--num-heldout", type=int, default=2, help="images held out of --images (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/distill-BACKBONE)")
    parser.add_argument("--stride", type=int, default=24, help="teacher window stride s in px (default and paper: 24)")
    parser.add_argument(
        "--train",
        default=None,
        help=f"comma-separated parts to train: {TRAIN_PARTS} (default and paper: blk_-1,blk_-2, the last two blocks)",
    )
    parser.add_argument(
        "--train-blocks", default=None, help="deprecated: N = --train blk_-1,...,blk_-N; all = --train all"
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default and paper: 10)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="GLOBAL batch: each of the W processes "
        "accumulates gradients over batch/W images per step (default and paper: 2 = 2 GPUs x 1)",
    )
    parser.add_argument(
        "--lr", type=float, default=2e-5, help="AdamW learning rate, constant (default and paper: 2e-5)"
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default and paper: 1e-4)")
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16", "fp32"),
        default=None,
        help="autocast of training, "
        "teacher targets and report (default: fp16 + GradScaler on GPU, the paper; fp32 on CPU)",
    )
    parser.add_argument(
        "--target-dtype",
        choices=("fp16", "fp32"),
        default="fp16",
        help="how the teacher targets are cached (default: fp16, 12 MB per 1024x2048 image; fp32 doubles it)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use only the first N training images (default: all; paper: the first 25K of SA-1B)",
    )
    parser.add_argument(
        "--augment",
        choices=("paper", "extended", "crop", "none"),
        default="paper",
        help="paper (default): the authors' recipe, fit (2048r,1024r), r~U(.5,1), full image "
        "stretched to multiples of 16 or a crop, flip; extended: fit (2560r,2560r), r~U(.2,1); "
        "crop: our earlier crop-based variant; none: the images as they are",
    )
    parser.add_argument(
        "--aug-scale",
        type=float,
        default=None,
        help="multiply every pixel size of the "
        f"augmentation and of --eval-sizes by this (default: 1, or {TINY_SCALE} = 128/512 for tiny)",
    )
    parser.add_argument(
        "--eval-sizes",
        default=None,
        help="comma-separated long sides (px) of the held-out "
        f"report (default: {','.join(map(str, EVAL_LONG_SIDES))} times --aug-scale)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the augmentation and --shuffle (default: 0)")
    parser.add_argument(
        "--shuffle", action="store_true", help="a new seeded image order every epoch (default and paper: file order)"
    )
    parser.add_argument(
        "--keep",
        choices=("best", "last"),
        default="best",
        help="student.pt holds the epoch of lowest mean training loss (best: default and paper) or the last one",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the training run in --out from its "
        "last checkpoint (same weights, optimizer state and data order)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also checkpoint every N steps within an epoch (0: only at the end of each epoch)",
    )
    parser.add_argument("--teacher-batch", type=int, default=None, help="teacher windows per forward (default: auto)")
    parser.add_argument(
        "--workers", type=int, default=None, help="data-loading processes (default: 4 on GPU, 0 on CPU)"
    )
    return parser


def resolve_args(args):
    """Fill the defaults that depend on the backbone, validate, and turn strings into numbers."""
    if args.aug_scale is None:
        args.aug_scale = TINY_SCALE if args.backbone == "tiny" else 1.0
    for flag, value, least in (
        ("--epochs", args.epochs, 0),
        ("--stride", args.stride, 1),
        ("--save-every", args.save_every, 0),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--teacher-batch", args.teacher_batch, 1),
        ("--max-images", args.max_images, 1),
    ):
        if value is not None and value < least:
            raise DistillError(f"{flag} must be at least {least}, not {value}.")
    for flag, value, rule in (
        ("--lr", args.lr, "> 0"),
        ("--aug-scale", args.aug_scale, "> 0"),
        ("--weight-decay", args.weight_decay, ">= 0"),
    ):
        if not (math.isfinite(value) and (value > 0 or rule == ">= 0" and value == 0)):  # nan and inf too
            raise DistillError(f"{flag} must be a finite number {rule}, not {value}.")
    if args.eval_sizes is None:
        args.eval_sizes = [int(round(L * args.aug_scale)) for L in EVAL_LONG_SIDES]
    elif isinstance(args.eval_sizes, str):
        try:
            args.eval_sizes = [int(v) for v in args.eval_sizes.split(",") if v.strip()]
        except ValueError:
            raise DistillError(f"--eval-sizes '{args.eval_sizes}' must be comma-separated integers, e.g. 1024,3072.")
    if len(args.eval_sizes) < 1 or min(args.eval_sizes) < 16:
        raise DistillError("--eval-sizes needs at least one long side of 16 px or more.")
    if args.train_blocks is not None:  # the deprecated spelling
        if args.train is not None or not (args.train_blocks == "all" or args.train_blocks.isdigit()):
            raise DistillError(
                "--train-blocks (deprecated) takes a number or 'all' and cannot be combined with "
                "--train; use --train, e.g. --train blk_-1,blk_-2."
            )
        n = args.train_blocks
        args.train = "all" if n == "all" else ",".join(f"blk_-{i}" for i in range(1, int(n) + 1))
        log(f"warning: --train-blocks is deprecated; this is --train {args.train}.")
    args.train = ",".join(parse_train(args.train or "blk_-1,blk_-2"))
    if args.images is not None and args.heldout is None and args.num_heldout < 1:
        raise DistillError("--num-heldout must be at least 1 (the report needs held-out images).")
    return args


def setup_device(args):
    """Single process by default; under torchrun one process per GPU (NCCL) or per CPU slot (gloo)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"--device {args.device} was asked for but no CUDA GPU is available; pass --device cpu.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise DistillError(
            f"--batch-size {args.batch_size} is the global batch and does not divide by the {world} "
            f"processes; pass a multiple of {world}."
        )
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    if args.precision is None:  # the paper: fp16 autocast + GradScaler; CPU: fp32 (exact, fast)
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"


# ----------------------------------------------------------------------------------------------------------------
# The run folder: created, locked and checked before any work (plumbing)
# ----------------------------------------------------------------------------------------------------------------

OURS = (".lock", "settings.json")  # what a run writes before any work: a folder holding only these is empty


@contextlib.contextmanager
def open_run_folder(run: str, settings: dict, resume: bool):
    """Create `run`, lock it against a second run, refuse a --resume whose settings changed, record the settings;
    when the run then fails, a folder this run created and left without work is removed again."""
    created = not os.path.lexists(run)
    try:
        os.makedirs(run, exist_ok=True)
        lock = open(os.path.join(run, ".lock"), "a")
    except OSError as exc:
        why = "it exists and is not a folder" if os.path.lexists(run) and not os.path.isdir(run) else exc.strerror
        raise DistillError(f"cannot create the run folder '{run}' ({why or exc}); pass another --out.") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however
        except OSError:
            raise DistillError(
                f"another distill.py run is using '{run}' (it holds {run}/.lock); wait for it to "
                f"finish or pass another --out."
            ) from None
        check_settings(run, settings, resume)
        write_json(os.path.join(run, "settings.json"), settings)
        yield
    except BaseException:
        if created:
            remove_if_empty(run)
        raise
    finally:
        lock.close()


def check_settings(run: str, settings: dict, resume: bool):
    """Before any work: a finished or started training run is continued only with --resume and the same settings."""
    if os.path.isfile(os.path.join(run, "resume.pt")) and not resume:
        raise DistillError(
            f"'{run}' already holds a training run; pass --resume to continue it, or a new "
            f"--out (delete {run}/resume.pt to retrain there with the cached targets)."
        )
    old = read_json(os.path.join(run, "settings.json"))
    if resume and isinstance(old, dict):
        for k in settings:
            if old.get(k) != settings[k]:
                raise DistillError(
                    f"cannot resume: '{run}' was run with {k}={old.get(k)!r}, now {settings[k]!r}; "
                    f"use the same settings (only --epochs may change) or a new --out."
                )


def remove_if_empty(run: str):
    """Remove `run` if it holds nothing but the lock, the settings and empty folders."""
    for root, dirs, files in os.walk(run):
        if any(root != run or f not in OURS for f in files):
            return
    for name in OURS:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run, name))
    for root, _, _ in sorted(os.walk(run), key=lambda t: -len(t[0])):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(root)


# ----------------------------------------------------------------------------------------------------------------
# The four stages
# ----------------------------------------------------------------------------------------------------------------


def run(args) -> dict | None:
    t0 = time.time()
    args = resolve_args(args)
    setup_device(args)
    run_dir = args.out
    with open_run_folder(run_dir, run_settings(args), args.resume) if is_main() else contextlib.nullcontext():
        barrier()
        return run_stages(args, run_dir, t0)


def run_stages(args, run_dir: str, t0: float) -> dict | None:
    torch.manual_seed(args.seed)
    if args.precision != "fp32" and not args.device.startswith("cuda") and is_main():
        log(f"note: --precision {args.precision} has no effect on {args.device}; it computes in fp32.")
    try:
        backbone = student.load_backbone(args.backbone, args.pretrained, args.device)
        teacher = Teacher(backbone, stride=args.stride, batch_size=args.teacher_batch, precision=args.precision)
    except (BackboneError, TeacherError) as exc:
        raise DistillError(str(exc).rstrip(".") + ".") from exc
    select_trainable(backbone, parse_train(args.train))  # a part this backbone lacks: before any work
    backbone.requires_grad_(False)
    if is_main() and clean_temp_files(run_dir):
        log("removed temp files left by an interrupted run")
    barrier()
    jobs = make_jobs(args, backbone.patch_size)
    items = stage_augment(jobs, run_dir, args, backbone.patch_size)
    items = stage_teacher(items, run_dir, backbone, teacher, args)
    train = [it for it in items if it["kind"] == "train"]
    held = [it for it in items if it["kind"] == "heldout"]
    if not train:
        raise DistillError(
            "no usable training images are left after skipping the unreadable ones (see the log above); check --images."
        )
    if not held and is_main():
        log("warning: no usable held-out image; the report is skipped.")
    # "before" = the pre-trained weights in a single pass; the caches make it cheap to recompute on every run.
    before = evaluate(backbone, held, run_dir, args.device, "before", args.precision) if is_main() and held else {}
    state = stage_train(train, run_dir, backbone, args)
    metrics = None
    if is_main() and held:
        after = evaluate(backbone, held, run_dir, args.device, "after", args.precision)
        metrics = report(
            before, after, train, state, run_dir, dict(run_settings(args), train_images=len(train)), time.time() - t0
        )
    if is_main():
        print(
            printable(
                f"student checkpoint: {os.path.join(run_dir, 'student.pt')} (load it with "
                f"student.load_backbone('{backbone.name}', checkpoint=PATH)); {time.time() - t0:.1f} s in all"
            )
        )
    barrier()
    return metrics


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwind: temp files removed, caches kept


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", f"distill-{args.backbone}")
    try:
        old = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. a notebook worker)
        old = None
    try:
        return run(args)
    except (DistillError, WriteError) as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(
            printable(
                f"interrupted: finished work in '{args.out}' is kept; run the same command with --resume to continue."
            ),
            file=sys.stderr,
        )
        raise SystemExit(130)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
