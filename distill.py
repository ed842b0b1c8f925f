"""Self-distillation of the single-pass student from the sliding-window teacher (SPAR, CVPR 2026, Sec. 3, Fig. 2).

The frozen pre-trained ViT, looking through overlapping K x K windows (E1) whose features are stitched (E2), is the
teacher; the same ViT run once on the whole image (E3) is the student.  Only the student's last blocks are trained,
to regress the teacher's raw features:

    (E4)  L(theta) = 1 / (h * w * C) * || F_S - F_T ||^2          (MSE on raw, un-normalised features)

`python distill.py --backbone siglip2-b16 --images DIR --out runs/NAME` runs four stages, each resumable:

  1. augment   each image once, with an RNG seeded by (--seed, file name): the paper's recipe (its training details),
               stored as a lossless PNG so the teacher and the student see exactly the same pixels;
  2. teacher   stitched targets F_T (E1-E2) for every augmented image, cached as fp16 on disk, written atomically,
               skipped when already present and valid (sharded across ranks under torchrun);
  3. train     (E4) with AdamW, batch 1 image per process, bf16 autocast on GPU; a checkpoint every epoch,
               `--resume` continues bit-exactly (same weights, optimizer state, data order);
  4. report    student-vs-teacher MSE and mean cosine on held-out images, before and after distillation, at a
               resolution inside and one beyond the training range -> a table and `metrics.json`.

Without `--images`, the photos bundled in assets/ are used (4 to train, 2 held out), so that
`python distill.py --backbone tiny` runs offline in seconds on an idle 2-core CPU.  See `python distill.py --help`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import student
from files import TEMP_MARK, ImageError, WriteError, atomic_write, read_rgb, save_torch, write_json
from student import BackboneError, autocast
from teacher import Teacher

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
ASSET_HELDOUT = ("chelsea.jpg", "rocket.jpg")         # held out of the bundled six (see assets/README.md)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_ASPECT = 10.0             # longer / shorter side; beyond it the short-side upscale would explode the image

# The paper's augmentation (training details): fit (long, short) * r, r ~ U(r_min, 1); crops and short side >= 512.
AUGMENT = {"paper": dict(fit=(2048, 1024), r_min=0.5), "extended": dict(fit=(2560, 2560), r_min=0.2)}
MIN_SIDE = 512
EVAL_LONG_SIDES = (1024, 3072)                        # held-out report: inside / beyond the paper's training sizes
TINY_SCALE = 0.25             # tiny backbone: K = 128 = 512 / 4, so every pixel size of the recipe is scaled by 1/4


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
    tqdm.write(f"{prefix}{msg}", file=sys.stderr)


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


def seeded_rng(*parts) -> random.Random:
    """An RNG that depends only on its parts (e.g. seed and file name), not on the order images are processed."""
    digest = hashlib.sha1("/".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ----------------------------------------------------------------------------------------------------------------
# Images: careful reading, the augmentation recipe (stage 1)
# ----------------------------------------------------------------------------------------------------------------

def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive, sorted), as paths relative to it."""
    if not os.path.isdir(folder):
        raise DistillError(f"image folder '{folder}' does not exist; pass --images DIR with your photos.")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    if not found:
        raise DistillError(f"no images ({', '.join(IMAGE_EXTS)}) found in '{folder}'; point --images at a folder "
                           f"of photos.")
    return sorted(found)


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


def make_recipe(rng: random.Random, W: int, H: int, mode: str, scale: float, patch: int) -> dict:
    """The paper's augmentation for one W x H image, as plain numbers (stored next to the image).

    paper:    resize keeping the ratio to fit (2048 r, 1024 r) (long, short), r ~ U(0.5, 1); with p = 0.5 the
              full image, else a crop with each side ~ U[0.4 side, side] but >= 512; a short side < 512 is
              upscaled to 512; sides floored to multiples of 16 (cropping <16 px at the bottom/right);
              horizontal flip with p = 0.5.
    extended: the same with fit (2560 r, 2560 r), r ~ U(0.2, 1) (the paper's best curve, "dagger").
    none:     the image as it is (the teacher and the student pad it the same way).
    All pixel sizes are multiplied by `scale` (1 for real backbones; 1/4 for `tiny`, whose K is 512 / 4).
    """
    if mode == "none":
        return dict(augment=mode, r=None, resize=None, crop=None, upscale=None, final=[W, H], flip=False)
    cfg = AUGMENT[mode]
    min_side = max(patch, round(MIN_SIDE * scale / patch) * patch)
    r = rng.uniform(cfg["r_min"], 1.0)
    fit_long, fit_short = cfg["fit"][0] * r * scale, cfg["fit"][1] * r * scale
    f = min(fit_long / max(W, H), fit_short / min(W, H))               # mmcv-style keep-ratio "fit"
    W1, H1 = max(1, round(W * f)), max(1, round(H * f))
    crop = None
    if rng.random() >= 0.5:                                            # p = 0.5: random crop, sides >= min_side
        cw = min(W1, max(min_side, round(rng.uniform(0.4 * W1, W1))))
        ch = min(H1, max(min_side, round(rng.uniform(0.4 * H1, H1))))
        crop = [rng.randint(0, W1 - cw), rng.randint(0, H1 - ch), cw, ch]
    W2, H2 = (crop[2], crop[3]) if crop else (W1, H1)
    upscale = None
    if min(W2, H2) < min_side:                                         # short side -> min_side, keeping the ratio
        s = min_side / min(W2, H2)
        upscale = [max(min_side, round(W2 * s)), max(min_side, round(H2 * s))]
        W2, H2 = upscale
    final = [max(patch, W2 // patch * patch), max(patch, H2 // patch * patch)]
    return dict(augment=mode, r=r, resize=[W1, H1], crop=crop, upscale=upscale, final=final,
                flip=rng.random() < 0.5)


def apply_recipe(im: Image.Image, rc: dict) -> Image.Image:
    """Replay a recipe from `make_recipe` (bilinear resizes, as the mmseg pipeline the paper builds on)."""
    if rc["resize"]:
        im = im.resize(tuple(rc["resize"]), Image.BILINEAR)
    if rc["crop"]:
        x, y, w, h = rc["crop"]
        im = im.crop((x, y, x + w, y + h))
    if rc["upscale"]:
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
    return f"{stem[:40]}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}{suffix}"


def split_images(args) -> tuple[str, list[str], str, list[str]]:
    """(train folder, train files, held-out folder, held-out files), files relative to their folder."""
    if args.images is None:                                          # the bundled photos, fixed split
        files = list_images(ASSETS)
        return ASSETS, [f for f in files if f not in ASSET_HELDOUT], ASSETS, [f for f in files if f in ASSET_HELDOUT]
    files = list_images(args.images)
    if args.heldout:
        train, held_dir, held = files, args.heldout, list_images(args.heldout)
        both = {os.path.realpath(os.path.join(args.images, f)) for f in train} & \
            {os.path.realpath(os.path.join(args.heldout, f)) for f in held}
        if both:
            raise DistillError(f"{len(both)} file(s) are both in --images and --heldout (e.g. '{sorted(both)[0]}'); "
                               f"held-out images must not be trained on.")
    else:
        if len(files) < 2:
            raise DistillError(f"'{args.images}' holds {len(files)} image; distillation needs at least 2 (one is "
                               f"held out for the report), or pass --heldout DIR.")
        n = max(1, min(args.num_heldout, len(files) - 1))
        train, held_dir, held = files[:-n], args.images, files[-n:]      # the last n by name are held out
    if args.max_images:
        train = train[:args.max_images]
    return args.images, train, held_dir, held


def make_jobs(args, patch: int) -> list[dict]:
    """Stage-1 jobs: one per training image, one per (held-out image, evaluation size)."""
    train_dir, train, held_dir, held = split_images(args)
    jobs = []
    for rel in train:
        src = os.path.join(train_dir, rel)
        key = dict(source=os.path.abspath(src), bytes=os.path.getsize(src), augment=args.augment,
                   scale=args.aug_scale, seed=args.seed, patch=patch)
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
        if meta and meta.get("key") == job["key"] and os.path.isfile(os.path.join(run, meta["image"])):
            done += 1
            continue                                                   # finished in an earlier run
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
        out.save(buf, format="PNG", compress_level=1)                 # lossless: teacher and student see these pixels
        png = buf.getvalue()
        rel_png = os.path.join(os.path.basename(job_dir(run, job)), job["id"] + ".png")
        atomic_write(os.path.join(run, rel_png), lambda f: f.write(png))
        write_json(meta_path, dict(id=job["id"], kind=job["kind"], key=job["key"], recipe=recipe, image=rel_png,
                                   size=[out.height, out.width], sha1=hashlib.sha1(png).hexdigest(),
                                   source_size=[H, W]))                # written last: its presence means "done"
        made += 1
    if skipped or done:
        log(f"stage 1: {made} image(s) prepared, {done} already done in an earlier run, {skipped} skipped")
    barrier()
    items = []
    for job in jobs:                                                   # every rank reads every rank's results
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
    return dict(backbone=backbone.name, pretrained=str(args.pretrained), window=backbone.window, stride=args.stride)


def target_valid(path: str, item: dict, key: dict, dim: int, patch: int) -> bool:
    """Present, readable, made by this teacher from these exact pixels, with the right shape (mmap: no full read)."""
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        H, W = item["size"]
        meta = {k: v for k, v in obj["meta"].items() if k != "rank"}      # rank: who wrote it (for the record)
        return (meta == dict(key, image_sha1=item["sha1"]) and
                tuple(obj["target"].shape) == (math.ceil(H / patch), math.ceil(W / patch), dim))
    except Exception:                                                  # truncated / foreign file: recompute it
        log(f"recomputing '{path}': the cached file is unreadable or stale.")
        return False


def compute_target(teacher: Teacher, backbone, item: dict, run: str, device) -> torch.Tensor:
    try:
        img = image_tensor(os.path.join(run, item["image"]))
    except OSError as exc:
        raise ImageSkip(f"its stored image '{item['image']}' is unreadable ({exc}); delete it to redo it") from exc
    x = backbone.normalize(img[None].to(device).float() / 255.0)
    target = teacher(x)[0].float()                                     # (h, w, C): (E1) windows, (E2) stitched
    if not torch.isfinite(target).all():
        raise ImageSkip("the teacher's features are not finite")
    half = target.half()
    return half if torch.isfinite(half).all() else target              # fp16 unless it would overflow


def stage_teacher(items: list[dict], run: str, backbone, args) -> list[dict]:
    """Compute the missing or invalid targets (this rank's share, one writer per file); returns the valid items."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    key = teacher_key(backbone, args)
    p, C = backbone.patch_size, backbone.dim
    teacher = Teacher(backbone, stride=args.stride, batch_size=args.teacher_batch)
    os.makedirs(os.path.join(run, "targets"), exist_ok=True)
    mine = [it for i, it in enumerate(items) if i % world == rank]
    cached = skipped = 0
    for item in tqdm(mine, desc="2/4 teacher targets", unit="img", disable=not is_main()):
        path = target_path(run, item)
        if target_valid(path, item, key, C, p):
            cached += 1
            continue
        try:
            target = compute_target(teacher, backbone, item, run, args.device)
        except (ImageSkip, torch.cuda.OutOfMemoryError) as exc:
            log(f"skip: '{item['id']}': {str(exc).splitlines()[0]}.")
            skipped += 1
            continue
        save_torch(path, dict(target=target.cpu().contiguous(), meta=dict(key, image_sha1=item["sha1"], rank=rank)))
    if cached:
        log(f"stage 2: {cached} target(s) found in the cache, teacher not run for them")
    barrier()
    return [it for it in items if target_valid(target_path(run, it), it, key, C, p)]


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
            raise DistillError(f"the cached image or target of '{item['id']}' vanished or is corrupt; run the same "
                               f"command again with --resume (it is recomputed, training continues).") from exc
        return img, target


def select_trainable(backbone, spec: str) -> list[str]:
    """Unfreeze the last N blocks (or the whole image tower for 'all'); names relative to image_tower()."""
    tower = backbone.image_tower()
    tower.requires_grad_(False)
    if spec == "all":
        tower.requires_grad_(True)
    else:
        for blk in list(backbone.blocks)[-int(spec):]:                 # range checked in run()
            blk.requires_grad_(True)
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
    return names


def epoch_order(n: int, seed: int, epoch: int, world: int, rank: int) -> list[int]:
    """This rank's images for one epoch: a permutation seeded by (seed, epoch), padded to a multiple of world."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    perm += perm[:(-n) % world]
    return perm[rank::world]


LOSS_SYNC_EVERY = 20          # read the loss back to the host (a GPU sync) only every N steps


def train_step(model, optimizer, scaler, img, target, backbone, device) -> torch.Tensor:
    """One image: (E3) single pass, (E4) MSE on raw features against the cached (E1-E2) target."""
    x = backbone.normalize(img.to(device, non_blocking=True)[None].float() / 255.0)
    target = target.to(device, non_blocking=True)[None].float()
    with autocast(device):
        feats = model(x)                                              # (1, h, w, C)
    loss = F.mse_loss(feats.float(), target)                          # (E4): mean over h * w * C
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_settings(args, backbone, n_train: int) -> dict:
    """What a run must keep constant to be resumed; stored in both the checkpoint and the resume state."""
    return dict(backbone=backbone.name, pretrained=str(args.pretrained), stride=args.stride,
                train_blocks=args.train_blocks, lr=args.lr, weight_decay=args.weight_decay,
                augment=args.augment, aug_scale=args.aug_scale, seed=args.seed, max_images=args.max_images,
                images=os.path.abspath(args.images) if args.images else "assets", train_images=n_train,
                world_size=dist.get_world_size() if dist.is_initialized() else 1)


def save_state(run, backbone, names, optimizer, scaler, state, settings):
    """resume.pt (weights of the trained parameters + optimizer + position) first, then student.pt."""
    tower = backbone.image_tower()
    params = dict(tower.named_parameters())
    save_torch(os.path.join(run, "resume.pt"), dict(
        format="spar-resume", settings=settings, trainable=names, state=state,
        params={n: params[n].detach().cpu() for n in names},
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict()))
    save_torch(os.path.join(run, "student.pt"), dict(
        format=student.CHECKPOINT_FORMAT, backbone=backbone.name,
        settings=dict(settings, epochs_done=state["epoch"], step_in_epoch=state["step"]),
        image_tower={k: v.detach().cpu() for k, v in tower.state_dict().items()}))


def load_state(run, backbone, names, optimizer, scaler, settings) -> dict:
    """Restore the trained parameters and the optimizer from resume.pt; returns the saved position."""
    path = os.path.join(run, "resume.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DistillError(f"cannot read '{path}' ({type(exc).__name__}); the run cannot be resumed, start it "
                           f"again without --resume (the caches are kept).") from exc
    old = {k: v for k, v in ck["settings"].items()}
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise DistillError(f"cannot resume: '{run}' was trained with {k}={old.get(k)!r}, now {settings[k]!r}; "
                           f"use the same settings (only --epochs may change) or a new --out.")
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
    """(E4) regression; returns the training state (epoch, step, per-epoch loss history)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    settings = train_settings(args, backbone, len(items))
    names = select_trainable(backbone, args.train_blocks)
    params = dict(backbone.image_tower().named_parameters())
    # fused=True on GPU: one kernel updates every parameter (matters for --train-blocks all, 93M parameters)
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # bf16 needs no loss scaling; only GPUs without bf16 autocast in fp16 and need the scaler.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    state = dict(epoch=0, step=0, loss_sum=0.0, loss_n=0, history=[])
    resume_path = os.path.join(run, "resume.pt")
    if args.resume and os.path.isfile(resume_path):
        state = load_state(run, backbone, names, optimizer, scaler, settings)
        if is_main() and state["epoch"] >= args.epochs:
            log(f"'{resume_path}': training already finished ({state['epoch']} epochs)")
        elif is_main():
            log(f"resuming from '{resume_path}': epoch {state['epoch'] + 1}, step {state['step']}")
    finished_before = state["epoch"] >= args.epochs
    model = backbone
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None)
    data = CachedPairs(items, run)
    steps = math.ceil(len(items) / world)
    n_trainable = sum(params[n].numel() for n in names)
    if is_main() and state["epoch"] < args.epochs:
        log(f"stage 3: {len(items)} training image(s), {world} process(es), {steps} step(s)/epoch, "
            f"{n_trainable / 1e6:.2f}M trainable parameters ("
            f"{'whole image tower' if args.train_blocks == 'all' else 'last ' + args.train_blocks + ' blocks'})")
    for epoch in range(state["epoch"], args.epochs):
        order = epoch_order(len(items), args.seed, epoch, world, rank)[state["step"]:]
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=order, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")
        bar = tqdm(loader, total=steps, initial=state["step"], desc=f"3/4 train epoch {epoch + 1}/{args.epochs}",
                   unit="img", disable=not is_main())
        base = state["loss_sum"]
        running = torch.zeros((), dtype=torch.float64, device=device)     # summed on the device: no sync per step
        for img, target in bar:
            running += train_step(model, optimizer, scaler, img, target, backbone, device)
            state["step"] += 1
            state["loss_n"] += 1
            saving = args.save_every and state["step"] % args.save_every == 0 and state["step"] < steps
            if saving or state["step"] % LOSS_SYNC_EVERY == 0:
                state["loss_sum"] = base + running.item()
                bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.4g}")
            if saving and is_main():
                save_state(run, backbone, names, optimizer, scaler, state, settings)
        state["loss_sum"] = base + running.item()
        mean = torch.tensor([state["loss_sum"], state["loss_n"]], dtype=torch.float64, device=device)  # NCCL: GPU
        if world > 1:
            dist.all_reduce(mean)
        state["history"].append(dict(epoch=epoch + 1, loss=(mean[0] / max(mean[1], 1)).item()))
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
        if is_main():
            save_state(run, backbone, names, optimizer, scaler, state, settings)   # atomically, every epoch
            log(f"epoch {epoch + 1}: mean loss {state['history'][-1]['loss']:.5g}; checkpoint '{run}/student.pt'")
        barrier()
    if is_main() and finished_before:        # a kill or a full disk may have left student.pt one save behind
        save_state(run, backbone, names, optimizer, scaler, state, settings)
    backbone.requires_grad_(False)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: held-out report
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(backbone, items: list[dict], run: str, device, label: str) -> dict:
    """Per held-out size: mean over images of the (E4) MSE and of the mean per-patch cosine, student vs teacher."""
    out = {}
    for item in tqdm(items, desc=f"4/4 held-out ({label})", unit="img", leave=False, disable=not is_main()):
        x = backbone.normalize(image_tensor(os.path.join(run, item["image"]))[None].to(device).float() / 255.0)
        target = torch.load(target_path(run, item), map_location=device, weights_only=True)["target"].float()
        with autocast(device):
            feats = backbone.dense(x)[0].float()
        row = out.setdefault(item["key"]["long"], dict(mse=0.0, cos=0.0, images=0))
        row["mse"] += F.mse_loss(feats, target).item()
        row["cos"] += F.cosine_similarity(feats, target, dim=-1).mean().item()
        row["images"] += 1
    for row in out.values():
        row["mse"] /= row["images"]
        row["cos"] /= row["images"]
    return out


def report(before: dict, after: dict, train_items: list[dict], history: list, run: str, settings: dict,
           wall: float) -> dict:
    longs = [max(it["size"]) for it in train_items]
    lo, hi = min(longs), max(longs)
    rows = []
    for L in sorted(before):
        rows.append(dict(long_side=L, images=before[L]["images"], seen_in_training=bool(lo <= L <= hi),
                         before=dict(mse=before[L]["mse"], cos=before[L]["cos"]),
                         after=dict(mse=after[L]["mse"], cos=after[L]["cos"])))
    print(f"\nheld-out student vs teacher (training long sides {lo}-{hi} px)")
    print(f"{'long side':>9} {'images':>6} {'in training?':>13} | {'MSE before':>10} {'MSE after':>10} | "
          f"{'cos before':>10} {'cos after':>10}")
    for r in rows:
        seen = "yes" if r["seen_in_training"] else "no (unseen)"
        print(f"{r['long_side']:>9} {r['images']:>6} {seen:>13} | {r['before']['mse']:>10.5g} "
              f"{r['after']['mse']:>10.5g} | {r['before']['cos']:>10.4f} {r['after']['cos']:>10.4f}")
    metrics = dict(heldout=rows, train_loss=history, train_long_sides=[lo, hi], settings=settings,
                   wall_time_s=round(wall, 1))
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
                    "targets, 3 train, 4 held-out report; each resumes without redoing finished work.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python distill.py --backbone tiny                      # offline demo, bundled photos\n"
               "  python distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b\n"
               "  torchrun --nproc_per_node=8 distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b")
    student.add_backbone_args(parser, default="siglip2-b16")
    parser.add_argument("--images", default=None, help="folder of training photos, searched recursively "
                        "(default: the 6 bundled photos in assets/, 4 train + 2 held out)")
    parser.add_argument("--heldout", default=None, help="folder of held-out photos for the report (default: the "
                        "last --num-heldout files of --images, by name, are held out)")
    parser.add_argument("--num-heldout", type=int, default=2, help="images held out of --images (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/distill-BACKBONE)")
    parser.add_argument("--stride", type=int, default=24, help="teacher window stride s in px (default and paper: 24)")
    parser.add_argument("--train-blocks", default="2", help="train the last N transformer blocks, or 'all' for "
                        "the whole image tower (default and paper: 2)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default and paper: 10)")
    parser.add_argument("--lr", type=float, default=2e-5,
                        help="AdamW learning rate, constant (default and paper: 2e-5)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default and paper: 1e-4)")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N training images "
                        "(default: all; paper: the first 25K of SA-1B)")
    parser.add_argument("--augment", choices=("paper", "extended", "none"), default="paper",
                        help="paper (default): fit (2048r,1024r), r~U(.5,1), crop, flip; extended: fit (2560r,2560r), "
                             "r~U(.2,1); none: the images as they are")
    parser.add_argument("--aug-scale", type=float, default=None, help="multiply every pixel size of the "
                        f"augmentation and of --eval-sizes by this (default: 1, or {TINY_SCALE} = 128/512 for tiny)")
    parser.add_argument("--eval-sizes", default=None, help="comma-separated long sides (px) of the held-out "
                        f"report (default: {','.join(map(str, EVAL_LONG_SIDES))} times --aug-scale)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the augmentation and the data order (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue the training run in --out from its "
                        "last checkpoint (same weights, optimizer state and data order)")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps within an "
                        "epoch (0: only at the end of each epoch)")
    parser.add_argument("--teacher-batch", type=int, default=None, help="teacher windows per forward "
                        "(default: auto)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 4 on GPU, "
                        "0 on CPU)")
    return parser


def resolve_args(args):
    """Fill the defaults that depend on the backbone, validate, and turn strings into numbers."""
    if args.aug_scale is None:
        args.aug_scale = TINY_SCALE if args.backbone == "tiny" else 1.0
    if args.eval_sizes is None:
        args.eval_sizes = [int(round(L * args.aug_scale)) for L in EVAL_LONG_SIDES]
    elif isinstance(args.eval_sizes, str):
        try:
            args.eval_sizes = [int(v) for v in args.eval_sizes.split(",") if v.strip()]
        except ValueError:
            raise DistillError(f"--eval-sizes '{args.eval_sizes}' must be comma-separated integers, e.g. 1024,3072.")
    if len(args.eval_sizes) < 1 or min(args.eval_sizes) < 16:
        raise DistillError("--eval-sizes needs at least one long side of 16 px or more.")
    if args.train_blocks != "all" and not args.train_blocks.isdigit():
        raise DistillError(f"--train-blocks must be a number or 'all', not '{args.train_blocks}'.")
    if args.epochs < 0 or args.stride <= 0 or args.lr <= 0 or args.aug_scale <= 0:
        raise DistillError("--epochs must be >= 0 and --stride, --lr, --aug-scale > 0.")
    if args.max_images is not None and args.max_images < 1:
        raise DistillError("--max-images must be at least 1.")
    if args.images is not None and args.heldout is None and args.num_heldout < 1:
        raise DistillError("--num-heldout must be at least 1 (the report needs held-out images).")
    return args


def setup_device(args):
    """Single process by default; under torchrun one process per GPU (NCCL) or per CPU slot (gloo)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"--device {args.device} was asked for but no CUDA GPU is available; pass --device cpu.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0


def run(args) -> dict | None:
    t0 = time.time()
    args = resolve_args(args)
    setup_device(args)
    torch.manual_seed(args.seed)
    try:
        backbone = student.load_backbone(args.backbone, args.pretrained, args.device)
    except BackboneError as exc:
        raise DistillError(str(exc)) from exc
    if args.train_blocks != "all" and not 1 <= int(args.train_blocks) <= len(backbone.blocks):
        raise DistillError(f"--train-blocks {args.train_blocks} is out of range: {backbone.name} has "
                           f"{len(backbone.blocks)} blocks; pass 1..{len(backbone.blocks)} or 'all'.")
    run_dir = args.out
    if os.path.isfile(os.path.join(run_dir, "resume.pt")) and not args.resume:     # fail before any work
        raise DistillError(f"'{run_dir}' already holds a training run; pass --resume to continue it, or a new "
                           f"--out (delete {run_dir}/resume.pt to retrain there with the cached targets).")
    if is_main():
        os.makedirs(run_dir, exist_ok=True)
        for sub in ("augment", "heldout", "targets"):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        if clean_temp_files(run_dir):
            log("removed temp files left by an interrupted run")
    barrier()
    jobs = make_jobs(args, backbone.patch_size)
    items = stage_augment(jobs, run_dir, args, backbone.patch_size)
    items = stage_teacher(items, run_dir, backbone, args)
    train = [it for it in items if it["kind"] == "train"]
    held = [it for it in items if it["kind"] == "heldout"]
    if not train:
        raise DistillError("no usable training images are left after skipping the unreadable ones (see the log "
                           "above); check --images.")
    if not held and is_main():
        log("warning: no usable held-out image; the report is skipped.")
    # "before" = the pre-trained weights in a single pass; the caches make it cheap to recompute on every run.
    before = evaluate(backbone, held, run_dir, args.device, "before") if is_main() and held else {}
    state = stage_train(train, run_dir, backbone, args)
    metrics = None
    if is_main() and held:
        after = evaluate(backbone, held, run_dir, args.device, "after")
        metrics = report(before, after, train, state["history"], run_dir,
                         train_settings(args, backbone, len(train)), time.time() - t0)
    if is_main():
        print(f"student checkpoint: {os.path.join(run_dir, 'student.pt')} (load it with "
              f"student.load_backbone('{backbone.name}', checkpoint=PATH)); {time.time() - t0:.1f} s in all")
    barrier()
    return metrics


def _terminate(signum, frame):
    raise KeyboardInterrupt                                            # unwind: temp files removed, caches kept


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", f"distill-{args.backbone}")
    try:
        old = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:                                                 # not the main thread (e.g. a notebook worker)
        old = None
    try:
        return run(args)
    except (DistillError, WriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"interrupted: finished work in '{args.out}' is kept; run the same command with --resume to continue.",
              file=sys.stderr)
        raise SystemExit(130)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
