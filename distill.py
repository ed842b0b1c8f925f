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

Without `--images` the photos bundled in assets/ are used (4 to train, 2 held out): `python distill.py --backbone
tiny` runs offline in seconds on an idle 2-core CPU.  The paper's setting, on one GPU or on two (2 x 1 image):

  python distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b --max-images 25000
  torchrun --nproc_per_node=2 distill.py --backbone siglip2-b16 --images DIR --out runs/sa1b --max-images 25000

This file reads in the order of the stages: the paper's defaults (`Config`), 1-4, `main`, our variants last; the
run folder's plumbing (lock, settings check, caches, resume.pt and student.pt, torchrun) is in runfolder.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import cli
import runfolder
from cli import autocast, barrier, flag, is_main, log, rank_world
from runfolder import TRAIN_PARTS, DistillError, ImageSkip, parse_train, train_parameters
from student import BACKBONES, load_backbone
from teacher import Teacher

PAPER_TRAIN = "blk_-1,blk_-2"  # the last two blocks
EVAL_LONG_SIDES = (1024, 3072)  # held-out report: inside / beyond the paper's training sizes
TINY_SCALE = 0.25  # tiny backbone: K = 128 = 512 / 4, so every pixel size of the recipe is scaled by 1/4


@dataclass
class Config:
    """The paper's protocol, one field per flag: its default and its --help (`build_parser` makes the command
    line from it; the run's own flags are `runfolder.RunFlags`).  None: chosen by `resolve_args`."""

    # 1. augmentation: the authors' recipe (`make_recipe`); extended: fit (2560r,2560r), r~U(.2,1), the paper's best
    augment: str = flag("paper", "recipe (default: paper, the authors')", choices=("paper", "extended", "crop", "none"))
    aug_scale: float | None = flag(None, f"pixel sizes of recipe and report times this (default 1; tiny {TINY_SCALE})")
    seed: int = flag(0, "seeds the augmentation and --shuffle (default: %(default)s)")
    max_images: int | None = flag(None, "use only the first N training images (default: all; paper: 25K of SA-1B)")
    # 2. teacher targets
    stride: int = flag(24, "teacher window stride s in px (default and paper: %(default)s)")
    target_dtype: str = flag("fp16", "cached targets (default: fp16, 12 MB at 1024x2048)", choices=("fp16", "fp32"))
    # 3. regression
    train: str | None = flag(None, f"comma-separated parts to train: {TRAIN_PARTS} (default and paper: {PAPER_TRAIN})")
    epochs: int = flag(10, "epochs (default and paper: %(default)s)")
    batch_size: int = flag(2, "GLOBAL batch, batch/W images a step on each of W processes (paper: %(default)s)")
    lr: float = flag(2e-5, "AdamW learning rate, constant (default and paper: %(default)s)")
    weight_decay: float = flag(1e-4, "AdamW weight decay (default and paper: %(default)s)")
    precision: str | None = flag(None, "GPU default: fp16 + GradScaler; CPU: fp32", choices=("fp16", "bf16", "fp32"))
    shuffle: bool = flag(False, "a new seeded image order every epoch (default and paper: file order)")
    keep: str = flag("best", "student.pt: the epoch of least loss (best, paper) or the last", choices=("best", "last"))
    # 4. held-out report
    eval_sizes: str | None = flag(None, f"report's long sides, comma-separated (default {EVAL_LONG_SIDES} x scale)")


# 1. Augmentation: the authors' recipe, drawn once per image and stored with its pixels --------------------------------

# The authors' augmentation: fit (long, short) * r, r ~ U(r_min, 1); short side >= 512 ("crop": our earlier variant).
AUGMENT = {
    "paper": dict(fit=(2048, 1024), r_min=0.5),
    "extended": dict(fit=(2560, 2560), r_min=0.2),
    "crop": dict(fit=(2048, 1024), r_min=0.5),
}
MIN_SIDE = 512


def seeded_rng(*parts) -> random.Random:
    """An RNG that depends only on its parts (e.g. seed and file name), not on the order images are processed."""
    digest = hashlib.sha1(os.fsencode("/".join(str(p) for p in parts))).digest()  # any file name, even non-UTF-8
    return random.Random(int.from_bytes(digest[:8], "little"))


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


def eval_recipe(W: int, H: int, long_side: int, patch: int) -> dict:
    """Held-out images: resize keeping the ratio to the given long side, short side rounded to a multiple of p."""
    f = long_side / max(W, H)
    short = max(patch, round(min(W, H) * f / patch) * patch)
    size = [long_side, short] if W >= H else [short, long_side]
    return dict(augment="eval", r=None, resize=size, crop=None, upscale=None, final=size, flip=False)


def stage_augment(jobs: list[dict], run: str, args, patch: int) -> list[dict]:
    """1. Every image augmented once (this rank's share), stored as <id>.png + <id>.json; the records of all."""

    def augment(job: dict):
        im = runfolder.read_image(job["src"], min_side=patch)
        W, H = im.size
        if job["kind"] == "train":
            recipe = make_recipe(seeded_rng(args.seed, job["rel"]), W, H, args.augment, args.aug_scale, patch)
        else:
            recipe = eval_recipe(W, H, job["long"], patch)
        runfolder.store_augmented(run, job, recipe, apply_recipe(im, recipe), source_size=[H, W])

    valid = lambda job: runfolder.augmented(run, job)  # noqa: E731
    done, made, skipped = runfolder.cached(jobs, "1/4 augment", valid, augment, "src")
    if skipped or done:
        log(f"stage 1: {made} image(s) prepared, {done} already done in an earlier run, {skipped} skipped")
    return runfolder.augmented_items(run, jobs)


# 2. Teacher targets: the stitched sliding-window features (E1-E2), computed once and cached ---------------------------


def compute_target(teacher: Teacher, backbone, item: dict, run: str, device, dtype: str) -> torch.Tensor:
    x = backbone.normalize(runfolder.stored_image(run, item)[None].to(device).float() / 255.0)
    target = teacher(x)[0].float()  # (h, w, C): (E1) windows, (E2) stitched
    if not torch.isfinite(target).all():
        raise ImageSkip("the teacher's features are not finite")
    if dtype == "fp32":
        return target
    half = target.half()  # 12 MB instead of 24 at 1024 x 2048
    return half if torch.isfinite(half).all() else target  # fp16 unless it would overflow


def stage_teacher(items: list[dict], run: str, backbone, teacher: Teacher, args) -> list[dict]:
    """2. The missing or invalid targets (this rank's share, one writer per file); returns the valid items."""
    key = runfolder.teacher_key(backbone, args)

    def make(item: dict):
        target = compute_target(teacher, backbone, item, run, args.device, args.target_dtype)
        runfolder.store_target(run, item, key, target)

    valid = lambda item: runfolder.target_valid(run, item, key, backbone)  # noqa: E731
    cached, _, _ = runfolder.cached(items, "2/4 teacher targets", valid, make, "id")
    if cached:
        log(f"stage 2: {cached} target(s) found in the cache, teacher not run for them")
    return [it for it in items if valid(it)]


# 3. The regression (E4) -----------------------------------------------------------------------------------------------


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


def train(items: list[dict], run: str, backbone, args) -> dict:
    """3. (E4) regression; returns the training state (epoch, step, per-epoch loss history, the kept epoch)."""
    rank, world = rank_world()
    device = torch.device(args.device)
    names = select_trainable(backbone, parse_train(args.train))
    params = dict(backbone.image_tower().named_parameters())
    # fused=True on GPU: one kernel updates every parameter (matters for --train all, 93M parameters)
    optimizer = torch.optim.AdamW(
        [params[n] for n in names], lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    # loss scaling for fp16 only (the paper's GradScaler); bf16 and fp32 need none, and on CPU autocast is off
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.precision == "fp16")
    settings = dict(runfolder.run_settings(args), train_images=len(items))
    ckpt = runfolder.Checkpoints(run, backbone, names, optimizer, scaler, settings)
    state = ckpt.start(args)  # or the saved state, with --resume
    model = runfolder.ddp(backbone, device)  # DistributedDataParallel under torchrun
    per_rank, steps = args.batch_size // world, math.ceil(len(items) / args.batch_size)  # per_rank: divides
    for epoch in range(state["epoch"], args.epochs):
        order = epoch_order(len(items), args.batch_size, args.seed, epoch, args.shuffle, world, rank)
        desc = f"3/4 train epoch {epoch + 1}/{args.epochs}"
        bar = runfolder.batches(items, run, order, per_rank, state["step"], steps, args.workers, device, desc)
        base, running = state["loss_sum"], torch.zeros((), dtype=torch.float64, device=device)  # no sync per step
        for batch in bar:
            running += train_step(model, optimizer, scaler, batch, backbone, device, args.precision)
            state["step"] += 1
            state["loss_n"] += len(batch)
            ckpt.after_step(state, base, running, bar, steps, args.save_every, args.keep == "last")
        state["loss_sum"] = base + running.item()
        loss = runfolder.mean_over_ranks(state["loss_sum"], state["loss_n"], device)
        state["history"].append(dict(epoch=epoch + 1, loss=loss))
        keep = args.keep == "last" or state["kept"] is None or loss < state["kept"]["loss"]
        if keep:  # the paper keeps the epoch of lowest mean training loss
            state["kept"] = dict(epoch=epoch + 1, loss=loss)
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0)
        ckpt.end_epoch(state, keep, loss)
    return ckpt.finish(state)


# 4. Held-out report ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(backbone, items: list[dict], run: str, device, label: str, precision: str = "fp32") -> dict:
    """Per held-out size: mean over images of the (E4) MSE and of the mean per-patch cosine, student vs teacher."""
    out = {}
    for item in tqdm(items, desc=f"4/4 held-out ({label})", unit="img", leave=False, disable=not is_main()):
        x = backbone.normalize(runfolder.stored_image(run, item)[None].to(device).float() / 255.0)
        target = torch.load(runfolder.target_path(run, item), map_location=device, weights_only=True)["target"].float()
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


# Command line ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_backbone_args(parser, BACKBONES, default="siglip2-b16")
    cli.add_flags(parser, Config)  # the paper's
    cli.add_flags(parser, runfolder.RunFlags)  # the run's
    return parser


def resolve_args(args):
    """The defaults that depend on the backbone, the device or another flag; every flag checked before any work."""
    gpu = args.device.startswith("cuda")
    if args.aug_scale is None:
        args.aug_scale = TINY_SCALE if args.backbone == "tiny" else 1.0
    if args.precision is None:  # the paper: fp16 autocast + GradScaler; CPU: fp32 (exact, fast)
        args.precision = "fp16" if gpu else "fp32"
    if args.workers is None:
        args.workers = 4 if gpu else 0
    runfolder.check_flags(args)
    if args.eval_sizes is None:
        args.eval_sizes = [round(L * args.aug_scale) for L in EVAL_LONG_SIDES]
    args.eval_sizes = runfolder.parse_eval_sizes(args.eval_sizes)
    if args.train_blocks is not None:  # the deprecated spelling
        runfolder.train_blocks_alias(args)
    args.train = ",".join(parse_train(args.train or PAPER_TRAIN))
    return args


def run(args) -> dict | None:
    """The four stages, in the run folder (created, locked and checked before any work)."""
    t0, args = time.time(), resolve_args(args)
    runfolder.setup_device(args)
    folder = runfolder.open_run_folder(args.out, runfolder.run_settings(args), args.resume)
    with folder if is_main() else contextlib.nullcontext():
        barrier()
        torch.manual_seed(args.seed)
        if args.precision != "fp32" and not args.device.startswith("cuda") and is_main():
            log(f"note: --precision {args.precision} has no effect on {args.device}; it computes in fp32.")
        backbone = load_backbone(args.backbone, args.pretrained, args.device)
        cli.note_random_weights(backbone.random_weights)
        teacher = Teacher(backbone, stride=args.stride, batch_size=args.teacher_batch, precision=args.precision)
        select_trainable(backbone, parse_train(args.train))  # a part this backbone lacks: before any work
        backbone.requires_grad_(False)
        runfolder.clean_leftovers(args.out)
        items = stage_augment(runfolder.make_jobs(args, backbone.patch_size), args.out, args, backbone.patch_size)
        train_items, held = runfolder.split_items(stage_teacher(items, args.out, backbone, teacher, args))
        # "before" = the pre-trained weights in a single pass; the caches make it cheap to recompute on every run
        before = evaluate(backbone, held, args.out, args.device, "before", args.precision) if is_main() and held else {}
        state = train(train_items, args.out, backbone, args)
        metrics = None
        if is_main() and held:
            after = evaluate(backbone, held, args.out, args.device, "after", args.precision)
            settings = dict(runfolder.run_settings(args), train_images=len(train_items))
            metrics = runfolder.write_report(before, after, train_items, state, args.out, settings, time.time() - t0)
        runfolder.print_done(args.out, backbone.name, t0)
        barrier()
        return metrics


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", f"distill-{args.backbone}")
    interrupted = f"interrupted: finished work in '{args.out}' is kept; run the same command with --resume to continue."
    try:
        return cli.main_guard(lambda _: run(args), argv, interrupted)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# Our variant: the crop-based augmentation (`--augment crop`) ----------------------------------------------------------


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


if __name__ == "__main__":
    main()
