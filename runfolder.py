"""The run folder of distill.py: what makes a distillation run safe to kill, to resume and to share between
processes (not a part of the paper; distill.py calls it).

* flags          -- `RunFlags`, the flags of the run itself (distill.Config holds the paper's), the `flag` /
                    `add_flags` pair that makes argparse flags of a dataclass, `check_flags` (every number, one
                    sentence each), `parse_eval_sizes`, the deprecated `--train-blocks` (`train_blocks_alias`);
* --train        -- `parse_train` and `train_parameters`: the authors' names for the trainable parts;
* the run folder -- `open_run_folder` creates OUT, locks it (`files.lock`), refuses a --resume whose settings
                    changed (`refuse_changed`, the one "cannot resume" check, also applied to resume.pt), records
                    OUT/settings.json, and removes a folder it created and left without work (`remove_if_empty`);
* torchrun       -- `setup_device` (NCCL per GPU or gloo per CPU slot), `ddp`, `batches`, `mean_over_ranks`;
* stage caches   -- `split_images` / `make_jobs` (which image goes where, its id and cache key) and `cached`, the
                    one helper each cached stage calls: "valid in the cache? else compute and write atomically",
                    with the checks and writers of stage 1 (sha1-checked PNG + JSON record) and stage 2 (targets);
                    `CachedPairs`, the (image, target) pairs of stage 3;
* `Checkpoints`  -- resume.pt (trained parameters, AdamW and GradScaler state, position) and student.pt;
* `write_report` -- the held-out table and OUT/metrics.json.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoints import save_student, weights_sha1
from cli import UserError, barrier, check_numbers, flag, hxw, is_main, log, printable, rank_world
from files import (
    ImageError,
    atomic_write,
    clean_temp_files,
    content_sha1,
    file_sha1,
    list_images,
    lock,
    read_json,
    read_rgb,
    save_torch,
    write_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
ASSET_HELDOUT = ("chelsea.jpg", "rocket.jpg")  # held out of the bundled six (see assets/README.md)
OURS = (".lock", "settings.json")  # what a run writes before any work: a folder holding only these is empty
LOSS_SYNC_EVERY = 20  # read the training loss back to the host (a GPU sync) only every N steps
MAX_ASPECT = 10.0  # longer / shorter side; beyond it the short-side upscale would explode the image
TRAIN_PARTS = (
    "blk_N, qkv_N, mlp_N (N may be negative: blk_-1 is the last block), attn_pool_kv, posembed, patchembed, all"
)


class DistillError(UserError):
    """Bad input or environment of a distillation run; the message is one sentence: what happened, what to do."""


class ImageSkip(Exception):
    """This one image cannot be used; the message is the reason (logged as a skip, the run goes on)."""


# ----------------------------------------------------------------------------------------------------------------
# Flags: the run's own flags, a dataclass of flags made into argparse flags, the checks of every flag
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunFlags:
    """The flags of the run itself, not of the method: where the images are, where the run goes, how it runs."""

    images: str | None = flag(
        None,
        "folder of training photos, searched recursively, used in file-name order with numbers by value "
        "(default: the 6 bundled photos in assets/, 4 train + 2 held out)",
    )
    heldout: str | None = flag(
        None,
        "folder of held-out photos for the report (default: the last --num-heldout files of --images, "
        "by name, are held out)",
    )
    num_heldout: int = flag(2, "images held out of --images (default: %(default)s)")
    out: str | None = flag(None, "run folder (default: runs/distill-BACKBONE)")
    resume: bool = flag(
        False,
        "continue the training run in --out from its last checkpoint (same weights, optimizer state and data order)",
    )
    save_every: int = flag(0, "also checkpoint every N steps within an epoch (0: only at the end of each epoch)")
    teacher_batch: int | None = flag(None, "teacher windows per forward (default: auto)")
    workers: int | None = flag(None, "data-loading processes (default: 4 on GPU, 0 on CPU)")
    train_blocks: str | None = flag(None, "deprecated: N = --train blk_-1,...,blk_-N; all = --train all")


def check_flags(args):
    """Every number of the command line, one sentence each (`cli.check_numbers`), before any work."""
    check_numbers(
        [
            ("--epochs", args.epochs, (">=", 0)),
            ("--stride", args.stride, (">=", 1)),
            ("--save-every", args.save_every, (">=", 0)),
            ("--batch-size", args.batch_size, (">=", 1)),
            ("--workers", args.workers, (">=", 0)),
            ("--teacher-batch", args.teacher_batch, (">=", 1)),
            ("--max-images", args.max_images, (">=", 1)),
        ],
        DistillError,
    )
    # cli.check_numbers words these "finite number >0"; distill's message (and its tests) say "> 0"
    for name, value, rule in (
        ("--lr", args.lr, "> 0"),
        ("--aug-scale", args.aug_scale, "> 0"),
        ("--weight-decay", args.weight_decay, ">= 0"),
    ):
        if not (math.isfinite(value) and (value > 0 or rule == ">= 0" and value == 0)):  # nan and inf too
            raise DistillError(f"{name} must be a finite number {rule}, not {value}.")
    if args.images is not None and args.heldout is None and args.num_heldout < 1:
        raise DistillError("--num-heldout must be at least 1 (the report needs held-out images).")


def parse_eval_sizes(text) -> list[int]:
    """--eval-sizes "1024,3072" -> [1024, 3072] (a list is returned as it is), each at least 16 px."""
    sizes = text
    if isinstance(text, str):
        try:
            sizes = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise DistillError(f"--eval-sizes '{text}' must be comma-separated integers, e.g. 1024,3072.") from None
    if len(sizes) < 1 or min(sizes) < 16:
        raise DistillError("--eval-sizes needs at least one long side of 16 px or more.")
    return sizes


def train_blocks_alias(args):
    """distill.py's deprecated --train-blocks N = --train blk_-1,...,blk_-N (all = --train all)."""
    if args.train is not None or not (args.train_blocks == "all" or args.train_blocks.isdigit()):
        raise DistillError(
            "--train-blocks (deprecated) takes a number or 'all' and cannot be combined with "
            "--train; use --train, e.g. --train blk_-1,blk_-2."
        )
    n = args.train_blocks
    args.train = "all" if n == "all" else ",".join(f"blk_-{i}" for i in range(1, int(n) + 1))
    log(f"warning: --train-blocks is deprecated; this is --train {args.train}.")


# ----------------------------------------------------------------------------------------------------------------
# The --train vocabulary: the authors' names for the parts of the image tower that train
# ----------------------------------------------------------------------------------------------------------------


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
            pos = trunk.pos_embed if hasattr(trunk, "pos_embed") else trunk.positional_embedding
            if pos is None:  # DINOv3: rotary position encoding, computed, not learned
                raise DistillError(f"--train posembed: {backbone.name} has no position embeddings (it uses RoPE).")
            chosen.append(pos)
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
            elif hasattr(blk.attn, "qkv"):  # timm: one fused Linear (DINOv3 / Eva: q and v biases beside it)
                chosen += blk.attn.qkv.parameters()
                chosen += [
                    b for b in (getattr(blk.attn, "q_bias", None), getattr(blk.attn, "v_bias", None)) if b is not None
                ]
            else:  # nn.MultiheadAttention (OpenCLIP)
                chosen += [p for p in (blk.attn.in_proj_weight, blk.attn.in_proj_bias) if p is not None]
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# The run folder: created, locked and checked before any work
# ----------------------------------------------------------------------------------------------------------------


def run_settings(args) -> dict:
    """What a run must keep constant to be resumed (all that changes targets, augmentation or training; not
    --epochs): written to OUT/settings.json before any work and checked there by --resume."""
    return dict(
        backbone=args.backbone,
        pretrained=str(args.pretrained),
        pretrained_sha1=weights_sha1(args.pretrained),  # a weights file: its content, hashed once per run
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
        world_size=rank_world()[1],
    )


@contextlib.contextmanager
def open_run_folder(run: str, settings: dict, resume: bool):
    """Create `run`, lock it against a second run, refuse a --resume whose settings changed, record the settings;
    when the run then fails, a folder this run created and left without work is removed again."""
    created = not os.path.lexists(run)
    busy = (
        f"another distill.py run is using '{run}' (it holds {run}/.lock); wait for it to finish or pass another --out."
    )
    try:
        os.makedirs(run, exist_ok=True)
        held = lock(run, busy)  # released when this process ends, however
    except OSError as exc:
        why = "it exists and is not a folder" if os.path.lexists(run) and not os.path.isdir(run) else exc.strerror
        raise DistillError(f"cannot create the run folder '{run}' ({why or exc}); pass another --out.") from None
    try:
        if os.path.isfile(os.path.join(run, "resume.pt")) and not resume:
            raise DistillError(
                f"'{run}' already holds a training run; pass --resume to continue it, or a new "
                f"--out (delete {run}/resume.pt to retrain there with the cached targets)."
            )
        old = read_json(os.path.join(run, "settings.json"))
        if resume and not isinstance(old, dict):  # missing or corrupt: what the caches say, before touching any
            old = recorded_settings(run)
            settings_known = {k: v for k, v in settings.items() if k in old}
            refuse_changed(run, old, settings_known, "run")
        elif resume:
            refuse_changed(run, old, settings, "run")
        write_json(os.path.join(run, "settings.json"), settings)
        yield
    except BaseException:
        if created:
            remove_if_empty(run)
        raise
    finally:
        held.close()


def recorded_settings(run: str) -> dict:
    """The settings of a run whose settings.json is missing or corrupt, from the files' own metadata: resume.pt's
    copy, else those that made one cached target and one augmentation record ({} for a folder without them)."""
    with contextlib.suppress(Exception):
        ck = torch.load(os.path.join(run, "resume.pt"), map_location="cpu", weights_only=True, mmap=True)
        return {k: v for k, v in ck["settings"].items() if k != "train_images"}
    found = {}
    targets = sorted(glob.glob(os.path.join(glob.escape(run), "targets", "*.pt")))[:1]
    with contextlib.suppress(Exception):
        meta = torch.load(targets[0], map_location="cpu", weights_only=True, mmap=True)["meta"]
        names = ("backbone", "pretrained", "pretrained_sha1", "stride", "precision", "target_dtype")
        found.update({k: meta[k] for k in names if k in meta})
    records = sorted(glob.glob(os.path.join(glob.escape(run), "augment", "*.json")))[:1]
    with contextlib.suppress(Exception):
        key = read_json(records[0])["key"]
        found.update({name: key[k] for k, name in (("augment", "augment"), ("scale", "aug_scale"), ("seed", "seed"))})
    return found


def refuse_changed(run: str, old: dict, new: dict, verb: str):
    """The one "cannot resume" check: every setting in `new` must be as recorded in `old` (settings.json before any
    work; resume.pt's own copy when training resumes)."""
    for k in new:
        if old.get(k) != new[k]:
            raise DistillError(
                f"cannot resume: '{run}' was {verb} with {k}={old.get(k)!r}, now {new[k]!r}; "
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


LEGACY_TEMP = re.compile(
    r"((augment|heldout|targets)/[^/]+\.(png|json|pt)|resume\.pt|student\.pt|settings\.json|metrics\.json)\.tmp\.\d+"
)


def clean_leftovers(run: str):
    """Temp files of a writer killed mid-write are removed (never a finished file, never a user's file) before any
    stage runs: our '<name>.tmp.spar-<pid>', and an older version's '<our file>.tmp.<pid>' where we write."""
    if is_main() and clean_temp_files(run, lambda rel: LEGACY_TEMP.fullmatch(rel) is not None):
        log("removed temp files left by an interrupted run")
    barrier()


# ----------------------------------------------------------------------------------------------------------------
# torchrun: one process per GPU or CPU slot; the batches of one epoch
# ----------------------------------------------------------------------------------------------------------------


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


def ddp(backbone, device: torch.device):
    """The model a training step calls: the backbone itself, or its DistributedDataParallel wrapper (torchrun)."""
    if rank_world()[1] == 1:
        return backbone
    return torch.nn.parallel.DistributedDataParallel(
        backbone, device_ids=[device.index] if device.type == "cuda" else None
    )


def batches(items: list[dict], run: str, order: list[int], per_rank: int, done: int, steps: int, workers, device, desc):
    """This process's batches of one epoch, from the step `done` on (a resumed epoch skips the steps already
    done), with a progress bar on the main process."""
    loader = torch.utils.data.DataLoader(
        CachedPairs(items, run),
        batch_size=per_rank,
        sampler=order[done * per_rank :],
        collate_fn=list,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    return tqdm(loader, total=steps, initial=done, desc=desc, unit="step", disable=not is_main())


def mean_over_ranks(loss_sum: float, n: int, device) -> float:
    """sum / count of every process's losses (all-reduced on the device: NCCL needs GPU tensors)."""
    mean = torch.tensor([loss_sum, n], dtype=torch.float64, device=device)
    if rank_world()[1] > 1:
        dist.all_reduce(mean)
    return (mean[0] / max(mean[1], 1)).item()


# ----------------------------------------------------------------------------------------------------------------
# Jobs and the stage caches: which image goes where; stage 1 (PNG + record) and stage 2 (teacher targets)
# ----------------------------------------------------------------------------------------------------------------


def item_id(rel: str, suffix: str = "") -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(os.path.basename(rel))[0])
    return f"{stem[:40]}-{hashlib.sha1(os.fsencode(rel)).hexdigest()[:8]}{suffix}"  # fsencode: any file name


def split_images(args) -> tuple[str, list[str], str, list[str]]:
    """(train folder, train files, held-out folder, held-out files), files relative to their folder."""
    if args.images is None:  # the bundled photos, fixed split
        files = list_images(ASSETS, DistillError)
        train, held = [f for f in files if f not in ASSET_HELDOUT], [f for f in files if f in ASSET_HELDOUT]
        return ASSETS, train[: args.max_images] if args.max_images else train, ASSETS, held
    files = list_images(args.images, DistillError)
    if args.heldout:
        train, held_dir, held = files, args.heldout, list_images(args.heldout, DistillError)
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
    """Stage-1 jobs: one per training image, one per (held-out image, evaluation size); the key says what makes
    the stored image (a job whose record has another key is redone)."""
    train_dir, train, held_dir, held = split_images(args)
    jobs = []
    for rel in train:
        src = os.path.join(train_dir, rel)
        key = dict(
            source=os.path.abspath(src),
            sha1=content_sha1(src),  # the photo's content: another photo under the same name is redone
            augment=args.augment,
            scale=args.aug_scale,
            seed=args.seed,
            patch=patch,
        )
        jobs.append(dict(id=item_id(rel), kind="train", src=src, rel=rel, key=key))
    for rel in held:
        src = os.path.join(held_dir, rel)
        for L in args.eval_sizes:
            key = dict(source=os.path.abspath(src), sha1=content_sha1(src), long=L, patch=patch)
            jobs.append(dict(id=item_id(rel, f"-L{L}"), kind="heldout", src=src, rel=rel, key=key, long=L))
    return jobs


def read_image(path: str, min_side: int = 16) -> Image.Image:
    """An image file as 8-bit RGB (`files.read_rgb`); raises ImageSkip with the reason when it is unusable."""
    try:
        rgb = read_rgb(path)
    except ImageError as exc:
        raise ImageSkip(f"cannot read it ({exc.reason})") from exc
    W, H = rgb.size
    if min(W, H) < min_side:
        raise ImageSkip(f"it is {hxw(H, W)} px, smaller than one {min_side} px patch")
    if max(W, H) / min(W, H) > MAX_ASPECT:
        raise ImageSkip(f"its aspect ratio {max(W, H) / min(W, H):.0f}:1 is beyond {MAX_ASPECT:.0f}:1")
    return rgb


def cached(items: list[dict], desc: str, valid, make, label: str) -> tuple[int, int, int]:
    """One cached stage over this process's share of `items`: an item whose output is `valid(item)` is kept, the
    others are made by `make(item)`, which computes and writes atomically; an ImageSkip (or a GPU out of memory)
    skips that item, logged with its `label` field and the reason.  Waits for every process; returns (found in
    the cache, made, skipped)."""
    rank, world = rank_world()
    done = made = skipped = 0
    for item in tqdm(items[rank::world], desc=desc, unit="img", disable=not is_main()):
        if valid(item):
            done += 1
            continue
        try:
            make(item)
            made += 1
        except (ImageSkip, torch.cuda.OutOfMemoryError) as exc:
            log(f"skip: '{item[label]}': {str(exc).splitlines()[0]}.")
            skipped += 1
    barrier()
    return done, made, skipped


def job_dir(run: str, job: dict) -> str:
    return os.path.join(run, "augment" if job["kind"] == "train" else "heldout")


def record_path(run: str, job: dict) -> str:
    return os.path.join(job_dir(run, job), job["id"] + ".json")


def augmented(run: str, job: dict) -> bool:
    """Stage 1 is done for `job`: its record has the job's key and the stored PNG the sha1 it records."""
    meta = read_json(record_path(run, job))
    if not (meta and meta.get("key") == job["key"]):
        return False
    if file_sha1(os.path.join(run, meta["image"])) == meta.get("sha1"):
        return True  # finished in an earlier run
    log(f"redo: '{meta['image']}' is missing or corrupt (its sha1 differs from the one recorded).")
    return False


def store_augmented(run: str, job: dict, recipe: dict, image: Image.Image, source_size: list[int]):
    """<id>.png, lossless (the teacher and the student see these pixels), then <id>.json: its presence means done."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    png = buf.getvalue()
    rel_png = os.path.join(os.path.basename(job_dir(run, job)), job["id"] + ".png")
    atomic_write(os.path.join(run, rel_png), lambda f: f.write(png))
    write_json(
        record_path(run, job),
        dict(
            id=job["id"],
            kind=job["kind"],
            key=job["key"],
            recipe=recipe,
            image=rel_png,
            size=[image.height, image.width],
            sha1=hashlib.sha1(png).hexdigest(),
            source_size=source_size,
        ),
    )  # written last


def augmented_items(run: str, jobs: list[dict]) -> list[dict]:
    """The records of every process's finished stage-1 jobs."""
    records = [read_json(record_path(run, job)) for job in jobs]
    return [meta for job, meta in zip(jobs, records) if meta and meta.get("key") == job["key"]]


def teacher_key(backbone, args) -> dict:
    """What makes a target: a cached one made with other values is recomputed."""
    return dict(
        backbone=backbone.name,
        pretrained=str(args.pretrained),
        pretrained_sha1=weights_sha1(args.pretrained),
        window=backbone.window,
        stride=args.stride,
        precision=args.precision,
        target_dtype=args.target_dtype,
    )


def target_path(run: str, item: dict) -> str:
    return os.path.join(run, "targets", item["id"] + ".pt")


def target_valid(run: str, item: dict, key: dict, backbone) -> bool:
    """Present, readable, made by this teacher from these exact pixels, with the right shape (mmap: no full read)."""
    path = target_path(run, item)
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        H, W = item["size"]
        meta = {k: v for k, v in obj["meta"].items() if k != "rank"}  # rank: who wrote it (for the record)
        shape = (*backbone.grid_size(H, W), backbone.dim)
        return meta == dict(key, image_sha1=item["sha1"]) and tuple(obj["target"].shape) == shape
    except Exception:  # truncated / foreign file: recompute it
        log(f"recomputing '{path}': the cached file is unreadable or stale.")
        return False


def store_target(run: str, item: dict, key: dict, target: torch.Tensor):
    meta = dict(key, image_sha1=item["sha1"], rank=rank_world()[0])
    save_torch(target_path(run, item), dict(target=target.cpu().contiguous(), meta=meta))


def split_items(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) of the usable ones; an error when no training image is left."""
    train = [it for it in items if it["kind"] == "train"]
    held = [it for it in items if it["kind"] == "heldout"]
    if not train:
        raise DistillError(
            "no usable training images are left after skipping the unreadable ones (see the log above); check --images."
        )
    if not held and is_main():
        log("warning: no usable held-out image; the report is skipped.")
    return train, held


def image_tensor(path: str) -> torch.Tensor:
    """A stored (augmented) PNG as a (3, H, W) uint8 tensor: small to pin and to copy to the GPU."""
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def stored_image(run: str, item: dict) -> torch.Tensor:
    """The stored (augmented) image of `item`; ImageSkip when it cannot be read."""
    try:
        return image_tensor(os.path.join(run, item["image"]))
    except OSError as exc:
        raise ImageSkip(f"its stored image '{item['image']}' is unreadable ({exc}); delete it to redo it") from exc


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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: resume.pt and student.pt
# ----------------------------------------------------------------------------------------------------------------


class Checkpoints:
    """resume.pt (the trained parameters, AdamW and GradScaler state, the position in the data) and student.pt
    (the kept weights, `checkpoints.save_student`) of a run, written atomically by the main process."""

    def __init__(self, run: str, backbone, names: list[str], optimizer, scaler, settings: dict):
        self.run, self.backbone, self.names, self.optimizer, self.scaler = run, backbone, names, optimizer, scaler
        self.settings = settings
        self.resume_path, self.student_path = os.path.join(run, "resume.pt"), os.path.join(run, "student.pt")
        self.kept_info, self.kept_params = None, None  # student.pt's settings and trained weights: a deleted
        # student.pt is written again from these (resume.pt carries them), bit-exact, not from the last epoch

    def start(self, args) -> dict:
        """A fresh training state, or (with --resume) the saved one with the weights and the optimizer restored;
        one log line says what stage 3 will do."""
        state = dict(epoch=0, step=0, loss_sum=0.0, loss_n=0, history=[], kept=None)
        if args.resume and os.path.isfile(self.resume_path):
            state = self.load()
            if is_main() and state["epoch"] >= args.epochs:
                log(f"'{self.resume_path}': training already finished ({state['epoch']} epochs)")
            elif is_main():
                log(f"resuming from '{self.resume_path}': epoch {state['epoch'] + 1}, step {state['step']}")
        world, n = rank_world()[1], self.settings["train_images"]
        params = dict(self.backbone.image_tower().named_parameters())
        n_trainable = sum(params[name].numel() for name in self.names)
        if is_main() and state["epoch"] < args.epochs:
            log(
                f"stage 3: {n} training image(s), {world} process(es), global batch {args.batch_size} "
                f"({args.batch_size // world} per process), {math.ceil(n / args.batch_size)} step(s)/epoch, "
                f"{n_trainable / 1e6:.2f}M trainable parameters (--train {args.train})"
            )
        return state

    def after_step(self, state: dict, base: float, running: torch.Tensor, bar, steps: int, every: int, last: bool):
        """Within an epoch: the loss read back to the host (a GPU sync) only every LOSS_SYNC_EVERY steps or when a
        --save-every checkpoint is due; `last`: that checkpoint's weights are also student.pt (--keep last)."""
        saving = every and state["step"] % every == 0 and state["step"] < steps
        if saving or state["step"] % LOSS_SYNC_EVERY == 0:
            state["loss_sum"] = base + running.item()
            self.refuse_diverged(state, state["loss_sum"])
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.4g}")
        if saving and is_main():
            self.save(state, last)

    def refuse_diverged(self, state: dict, loss: float):
        """A non-finite training loss or trained weight stops the run before anything is saved: the files keep
        the last good epoch (or --save-every step)."""
        params = dict(self.backbone.image_tower().named_parameters())
        bad = [n for n in self.names if not torch.isfinite(params[n]).all()]
        if math.isfinite(loss) and not bad:
            return
        what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the weights of {bad[0]} are not finite"
        kept = "keeps the last good checkpoint" if os.path.isfile(self.student_path) else "holds no checkpoint yet"
        raise DistillError(
            f"training diverged in epoch {state['epoch'] + 1}: {what} (--lr {self.settings['lr']:g} is too "
            f"large?); '{self.run}' {kept}, so lower --lr and run again with a new --out."
        )

    def save(self, state: dict, with_student: bool = True):
        """student.pt (when this state is the one kept) first, then resume.pt: a kill between the two makes
        --resume redo that step, which rewrites the same student.pt."""
        params = dict(self.backbone.image_tower().named_parameters())
        if with_student:
            kept_loss = state["kept"]["loss"] if state["kept"] else None
            info = dict(self.settings, epochs_done=state["epoch"], step_in_epoch=state["step"], train_loss=kept_loss)
            save_student(self.student_path, self.backbone, info)
            self.kept_info, self.kept_params = info, {n: params[n].detach().cpu().clone() for n in self.names}
        save_torch(
            self.resume_path,
            dict(
                format="spar-resume",
                settings=self.settings,
                trainable=self.names,
                state=state,
                params={n: params[n].detach().cpu() for n in self.names},
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(),
                kept_student=dict(info=self.kept_info, params=None if with_student else self.kept_params),
            ),
        )

    def load(self) -> dict:
        """Restore the trained parameters and the optimizer from resume.pt; returns the saved position."""
        try:
            ck = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DistillError(
                f"cannot read '{self.resume_path}' ({type(exc).__name__}); the run cannot be resumed, start it "
                f"again without --resume (the caches are kept)."
            ) from exc
        refuse_changed(self.run, ck["settings"], self.settings, "trained")
        if ck["trainable"] != self.names:
            raise DistillError(
                f"cannot resume: '{self.resume_path}' trained other parameters than these; use a new --out."
            )
        params = dict(self.backbone.image_tower().named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(ck["params"][n])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        kept = ck.get("kept_student") or {}  # params None: the saved position is the kept one
        if kept.get("info") is not None:
            self.kept_info = kept["info"]
            self.kept_params = {n: (kept["params"] or ck["params"])[n].clone() for n in self.names}
        return ck["state"]

    def end_epoch(self, state: dict, keep: bool, loss: float):
        """Every epoch: both files (student.pt only when this epoch is kept), one log line, all processes wait."""
        self.refuse_diverged(dict(state, epoch=state["epoch"] - 1), loss)
        if is_main():
            self.save(state, keep)  # atomically, every epoch
            path = self.student_path
            kept = f"checkpoint '{path}'" if keep else f"'{path}' keeps epoch {state['kept']['epoch']} (lower loss)"
            log(f"epoch {state['epoch']}: mean loss {loss:.5g}; {kept}")
        barrier()

    def rewrite_student(self, state: dict):
        """student.pt missing at the end (deleted, then --resume): written again from the kept epoch's weights and
        settings, bit-exact; without a kept epoch (--epochs 0) the current weights are the ones kept."""
        if self.kept_info is None and state["kept"] and state["kept"]["epoch"] != state["epoch"]:
            raise DistillError(
                f"'{self.student_path}' is missing and '{self.resume_path}' (written by an older version) does not "
                f"hold the kept epoch {state['kept']['epoch']}'s weights; restore student.pt or use a new --out."
            )
        if self.kept_info is None:
            return self.save(state)
        params = dict(self.backbone.image_tower().named_parameters())
        current = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.kept_params[n])
            save_student(self.student_path, self.backbone, self.kept_info)
            for n in self.names:
                params[n].copy_(current[n])

    def finish(self, state: dict) -> dict:
        """--epochs 0 still writes student.pt (the pre-trained weights); the kept epoch's weights are loaded back
        for the report when a later epoch was not kept."""
        if is_main() and not os.path.isfile(self.student_path):
            self.rewrite_student(state)
        if is_main() and state["kept"] and state["kept"]["epoch"] != state["epoch"]:
            kept = torch.load(self.student_path, map_location="cpu", weights_only=True)["image_tower"]
            self.backbone.image_tower().load_state_dict(kept)
        self.backbone.requires_grad_(False)
        return state


# ----------------------------------------------------------------------------------------------------------------
# The held-out report
# ----------------------------------------------------------------------------------------------------------------


def write_report(before: dict, after: dict, train_items: list[dict], state: dict, run: str, settings: dict, wall):
    """The held-out table (per long side: images, inside the training sizes?, MSE and cosine before / after) on
    stdout, and everything in OUT/metrics.json."""
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


def print_done(run: str, backbone_name: str, t0: float):
    if is_main():
        how = f"load it with student.load_backbone('{backbone_name}', checkpoint=PATH)"
        print(
            printable(f"student checkpoint: {os.path.join(run, 'student.pt')} ({how}); {time.time() - t0:.1f} s in all")
        )
