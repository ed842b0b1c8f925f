"""SPAR in miniature: the paper's experiment (Fig. 1, Table 1) on a toy world, offline, on a CPU, in minutes.

A toy world stands in for natural images, and `tiny` (4 blocks, width 128, p = 16, K = 128) stands in for SigLIP2:

  1. world     synthetic scenes of any size (benchmarks.py): the plane cut into warped Voronoi cells, each of one
               of 5 classes (background, red, green, blue, yellow) shown as a desaturated cell colour (grey for
               the background), so a token can see its class LOCALLY;
  2. pretrain  `tiny` at its native 128 x 128 ONLY, image AND text tower, the way SigLIP is pretrained: an
               IMAGE-LEVEL sigmoid loss on the attention-pooled embedding (is class c in the image?), learned
               temperature and bias.  The dense features are the pool's value path (`Backbone.dense`), as for
               SigLIP2; saved as a weights file every CLI loads with `--backbone tiny --pretrained PATH`;
  3. evaluate  `evaluate.py --dataset miniature`: native 128^2 scenes, and held-out large scenes (256 x 512 = 2 x 4
               windows, like Cityscapes at K = 512; 256 x 384 and 384 x 576 never used to choose a setting) in one
               pass (E3) and through the sliding-window teacher (E1-E2);
  4. distill   `distill.py`, unchanged: the paper's recipe scaled to K = 128 (E4), on unlabelled scenes;
  5. evaluate  the student in one pass -> `results.json` (native, single, teacher, spar per size) and a Fig. 1-style
               plot.  `python miniature.py diagnose` then measures what distillation repaired (diagnose.py).

    python miniature.py --out runs/miniature --threads 1           # everything, resumable
    python miniature.py diagnose --out runs/miniature              # the offset, attention range, positions
    python miniature.py world --out DIR --size 256x512 --count 32 --seed 1
    python evaluate.py --dataset miniature --root DIR --backbone tiny --pretrained runs/miniature/tiny.pt \\
        --modes pretrained,slide24,single --checkpoint STUDENT

What it finds: README, "SPAR in miniature", and docs/miniature.md (the seed table and the first study's negative
result: the border world with per-pixel pretraining, `--set world.kind=border --set pretrain.loss=dense`).

Every knob of the experiment (world, pretraining, distillation budget) is in `DEFAULTS`; `--set key=value`
changes one, e.g. `--set distill.lr=1e-3` (docs/miniature.md's tables of tries were made that way).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import numpy as np
import torch
import torch.nn.functional as F

import diagnose
from benchmarks import WORLDS, read_templates, render_scene, scene_rng, write_world
from cli import ArgumentParser, UserError, check_numbers, main_guard, parse_size, resolve_device
from files import read_json, save_torch, write_json
from pictures import speed_accuracy_plot

HERE = Path(__file__).resolve().parent
CLASSES = ("background", "red", "green", "blue", "yellow")

# pretraining of tiny at 128^2 only (image + text tower).  "sigmoid" (default): SigLIP's image-level loss on the
# attention-pooled embedding, target = "the class covers >= presence of the image"; "dense" (the first study):
# per-pixel cross-entropy of the dense features.  big_frac > 0 makes a fraction of the steps use big_size^2 scenes
# (same pixels per step: fewer scenes), position embeddings resized by (E3) as at test time.
PRETRAINS = {
    "sigmoid": dict(
        loss="sigmoid",
        steps=400,
        batch=24,
        lr=2e-3,
        weight_decay=0.05,
        templates=4,
        logit_scale=10.0,
        logit_bias=-5.0,
        presence=0.02,
        pos_init="sincos",
        pos_rms=0.5,
        seed=2,
        big_size=256,
        big_frac=0.0,
    ),  # fmt: skip
    "dense": dict(
        loss="dense",
        steps=1000,
        batch=32,
        lr=2e-3,
        weight_decay=0.05,
        templates=4,
        logit_scale=20.0,
        pos_init="sincos",
        pos_rms=0.5,
        seed=0,
        big_size=256,
        big_frac=0.0,
    ),  # fmt: skip
}
DEFAULTS = {
    "world": WORLDS["voronoi"],  # the world (benchmarks.py); --set world.kind=border: the first study's
    "pretrain": PRETRAINS["sigmoid"],  # --set pretrain.loss=dense: the first study's
    # evaluation sets (held out: their own seeds): native 128^2, the large size (2 x 4 windows of K = 128, like
    # Cityscapes 1024 x 2048 at K = 512) and other sizes never used to choose any setting
    "eval": dict(native_count=64, large_size="256x512", large_count=32, stride=24, other_sizes=["256x384", "384x576"]),
    # distillation through distill.py, the paper's recipe scaled to K = 128
    "distill": dict(
        images=128,
        size="256x512",
        epochs=10,
        lr=2e-5,
        train="blk_-1,blk_-2",
        aug_scale=0.25,
        augment="paper",
        batch_size=2,
        stride=24,
        extra="",
    ),
}
SWITCHES = {"world.kind": WORLDS, "pretrain.loss": PRETRAINS}  # a --set of these resets its section first
SEEDS = dict(native=101, large=102, distill=103, pretrain=104)  # one stream per set, never shared


# ----------------------------------------------------------------------------------------------------------------
# 2. Pretraining tiny at 128^2 only: dense features against text embeddings of the class names
# ----------------------------------------------------------------------------------------------------------------


def sincos_pos_embed(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position embeddings (MAE style), (h * w, dim), rms 1/sqrt(2) before scaling."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def class_vectors(backbone, tokens: torch.Tensor, T: int, pick: torch.Tensor) -> torch.Tensor:
    """(K, C) text side, as segment.py computes it: normalise each template embedding, average, normalise."""
    K = tokens.shape[0] // T
    sel = tokens.view(K, T, -1)[:, pick].reshape(K * len(pick), -1)
    emb = F.normalize(backbone.model.encode_text(sel).float(), dim=-1).view(K, len(pick), -1)
    return F.normalize(emb.mean(1), dim=-1)


def step_size(step: int, cfg: dict) -> tuple[int, int]:
    """(side, scenes) of pretraining step `step`: 128^2 x batch, or big_size^2 on an evenly spread big_frac of the
    steps, with as many scenes as keep the pixels per step (and so the cost, roughly) the same."""
    if int((step + 1) * cfg["big_frac"]) > int(step * cfg["big_frac"]):
        return cfg["big_size"], max(1, round(cfg["batch"] * (128 / cfg["big_size"]) ** 2))
    return 128, cfg["batch"]


def dense_loss(bb, x, y, text, cfg, head) -> torch.Tensor:
    """The first study: per-pixel cross-entropy of logit_scale * cos(F(i), t_c) (every token trained directly)."""
    feats = F.normalize(bb.dense(bb.normalize(x)), dim=-1)  # (B, side/16, side/16, C)
    logits = cfg["logit_scale"] * torch.einsum("bhwc,kc->bkhw", feats, text)
    logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, y)


def sigmoid_loss(bb, x, y, text, cfg, head) -> torch.Tensor:
    """SigLIP's image-level loss: z = exp(t) cos(pool(x), t_c) + b, target 1 where class c covers >= `presence` of
    the image, sigmoid cross-entropy summed over classes and averaged over images.  Only the attention-pooled
    embedding is trained; the dense features (the pool's value path, `Backbone.dense`) inherit what it learns."""
    tokens, _ = bb.tokens(bb.normalize(x))  # (B, N, C), position embeddings resized by (E3) off 128^2
    pooled = F.normalize(bb.trunk.forward_head(tokens), dim=-1)  # the attention pool: (B, C)
    present = F.one_hot(y.long(), len(CLASSES)).float().mean((1, 2)) >= cfg["presence"]  # (B, K)
    logits = head["t"].exp() * pooled @ text.T + head["b"]
    return F.binary_cross_entropy_with_logits(logits, present.float(), reduction="sum") / len(x)


def init_backbone(cfg: dict, device: str):
    """tiny with every weight trainable but the word vectors (49408 x 128 random vectors suffice, and AdamW over
    them would cost more than the image tower), position embeddings started as 2-D sin-cos at rms pos_rms."""
    from student import load_backbone

    torch.manual_seed(cfg["seed"])
    bb = load_backbone("tiny", pretrained=None, device=device)
    if cfg["pos_init"] == "sincos":  # a position-aware start (see docs/miniature.md's table of tries)
        pe = sincos_pos_embed(*bb.native_grid, bb.dim)
        bb.trunk.pos_embed.data.copy_((pe * cfg["pos_rms"] / pe.pow(2).mean().sqrt())[None].to(device))
    bb.model.train().requires_grad_(True)
    bb.model.text.token_embedding.requires_grad_(False)
    return bb


def scenes(cfg: dict, world: dict, step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining batch `step`: (B, 3, side, side) in [0, 1] and (B, side, side) labels, from its own seed."""
    side, n = step_size(step, cfg)
    rng = lambda j: scene_rng(SEEDS["pretrain"] + 1000 * cfg["seed"], step * cfg["batch"] + j)  # noqa: E731
    batch = [render_scene(rng(j), side, side, world) for j in range(n)]
    x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2).float().div_(255).to(device)
    return x, torch.from_numpy(np.stack([b[1] for b in batch])).long().to(device)


def pretrain(out_path: Path, cfg: dict, world: dict, device: str = "cpu") -> dict:
    """Train `tiny` on 128^2 scenes (and big_size^2 on a big_frac of the steps) with the loss `cfg["loss"]`: image
    AND text tower, AdamW, one-cycle schedule.  Deterministic; saves an open_clip state dict."""
    from tqdm import tqdm

    bb = init_backbone(cfg, device)
    head = {}  # SigLIP's learned temperature t and bias b
    if cfg["loss"] == "sigmoid":
        head = {k: torch.tensor(float(v), device=device, requires_grad=True)
                for k, v in (("t", math.log(cfg["logit_scale"])), ("b", cfg["logit_bias"]))}  # fmt: skip
    loss_fn = sigmoid_loss if cfg["loss"] == "sigmoid" else dense_loss
    templates = read_templates()
    tokens = bb.tokenizer([t.format(c) for c in CLASSES for t in templates]).to(device)  # (K * T, 77)
    T = len(templates)
    params = [p for p in bb.model.parameters() if p.requires_grad] + list(head.values())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=max(0.1, 3 / cfg["steps"])
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    t0, losses = time.time(), []
    sizes = "128^2" + (f" (+ {cfg['big_size']}^2 on {cfg['big_frac']:.0%} of the steps)" if cfg["big_frac"] else "")
    for step in tqdm(range(cfg["steps"]), desc=f"2/5 pretrain tiny at {sizes}", unit="step", leave=False):
        x, y = scenes(cfg, world, step, device)
        pick = torch.randperm(T, generator=gen)[: cfg["templates"]].to(device)
        loss = loss_fn(bb, x, y, class_vectors(bb, tokens, T, pick), cfg, head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    bb.model.eval().requires_grad_(False)
    save_torch(out_path, {k: v.detach().cpu() for k, v in bb.model.state_dict().items()})
    out = dict(seconds=round(time.time() - t0, 1), final_loss=float(np.mean(losses[-50:])))
    return out | {k: round(float(v.detach()), 4) for k, v in head.items()}


# ----------------------------------------------------------------------------------------------------------------
# 3.-5. The experiment: evaluate.py and distill.py, unchanged, as a user would call them
# ----------------------------------------------------------------------------------------------------------------


def model_flags(weights: Path, device: str) -> list[str]:
    """The flags that run the miniature's pretrained `tiny` in evaluate.py and distill.py."""
    return ["--backbone", "tiny", "--pretrained", str(weights), "--device", device]


def evaluate(root: Path, weights: Path, modes: str, out: Path, device: str, checkpoint: Path | None = None) -> dict:
    """`python evaluate.py --dataset miniature ...` in a subprocess; returns {mode: {miou, seconds_per_image}}."""
    cmd = [
        sys.executable,
        str(HERE / "evaluate.py"),
        "--dataset",
        "miniature",
        "--root",
        str(root),
        *model_flags(weights, device),
        "--modes",
        modes,
        "--out",
        str(out),
        "--text-cache",
        "none",
    ]
    if checkpoint:
        cmd += ["--checkpoint", str(checkpoint)]
    run_cmd(cmd)
    return json.loads(out.read_text())["modes"]


def run_cmd(cmd: list[str]):
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd)  # the caller's folder: relative --out paths stay valid
    if proc.returncode != 0:
        raise MiniatureError(
            f"'{' '.join(cmd[1:3])} ...' failed with status {proc.returncode} (see above); "
            f"rerun the same command to resume."
        )


def distill_cmd(d: dict, run: Path, images: Path, weights: Path, device: str) -> list[str]:
    """`distill.py` with the paper's recipe scaled to K = 128 by default (`--aug-scale 0.25`, lr 2e-5, the last two
    blocks, global batch 2, 10 epochs, stride 24); `DEFAULTS["distill"]` holds the budget."""
    cmd = [
        sys.executable,
        str(HERE / "distill.py"),
        *model_flags(weights, device),
        "--images",
        str(images),
        "--num-heldout",
        "2",
        "--out",
        str(run),
        "--stride",
        str(d["stride"]),
        "--epochs",
        str(d["epochs"]),
        "--lr",
        str(d["lr"]),
        "--aug-scale",
        str(d["aug_scale"]),
        "--augment",
        d["augment"],
        "--train",
        d["train"],
        "--batch-size",
        str(d["batch_size"]),
    ]
    return cmd + (d["extra"].split() if d["extra"] else [])


class MiniatureError(UserError):
    """A stage failed; the message says which and that a rerun resumes."""


def config_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def experiment(out: Path, cfg: dict, device: str = "cpu", until: str = "spar") -> dict:
    """World -> pretrain -> evaluate native / single / teacher -> distill -> evaluate SPAR; resumable per stage.

    A finished stage is skipped when the settings it depends on are unchanged (e.g. a new distillation budget
    reuses the world, the weights and the pre-trained numbers).  until="teacher" stops before distillation."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    W, P, E, D = cfg["world"], cfg["pretrain"], cfg["eval"], cfg["distill"]
    res_path = out / "results.json"
    res = read_json(res_path) or {}
    pre_key, dist_key = config_hash([W, P, E]), config_hash([W, P, E, D])
    if res.get("pre_key") != pre_key:
        res = {}
    if res.get("distill_key") != dist_key:
        res = {k: v for k, v in res.items() if not k.startswith(("spar", "student", "gap"))}
    res.update(config=cfg, pre_key=pre_key, distill_key=dist_key)
    save = lambda: write_json(res_path, res)  # noqa: E731

    print("1/5 world: held-out native and large scenes, unlabelled distillation scenes", flush=True)
    native = write_world(out / "world" / "native", 128, 128, E["native_count"], SEEDS["native"], W)
    large = {  # each size its own scenes (seed stream): out/world/HxW
        size: write_world(out / "world" / size, *parse_size(size), E["large_count"], SEEDS["large"] + 7 * i, W)
        for i, size in enumerate(large_sizes(E))
    }

    weights, wkey = out / "tiny.pt", {"world": W, "pretrain": P}  # a stable name for the README's commands
    if not weights.is_file() or read_json(out / "tiny.json") != wkey:
        print(
            f"2/5 pretrain tiny at 128^2, {P['loss']} loss ({P['steps']} steps of {P['batch']}"
            + (f"; {P['big_size']}^2 on {P['big_frac']:.0%} of them" if P["big_frac"] else "")
            + ")",
            flush=True,
        )
        res["pretraining"] = pretrain(weights, P, W, device)
        write_json(out / "tiny.json", wkey)
        save()
    res["pretrained_weights"] = str(weights)

    evaluate_pretrained(res, save, out / f"eval-{pre_key}", native, large, weights, E, device)
    if until == "teacher":
        return res
    distill_and_evaluate(res, save, out, dist_key, native, large, weights, cfg, device)
    for size, r in res["sizes"].items():
        gap = r["teacher"] - r["single"]
        res["spar_sizes"][size]["gap_closed"] = (
            (res["spar_sizes"][size]["spar"] - r["single"]) / gap if gap > 0 else None
        )
    res["gap_closed"] = res["spar_sizes"][E["large_size"]]["gap_closed"]
    res["seconds"] = round(res.get("seconds", 0.0) + time.time() - t0, 1)  # summed over resumed runs
    save()
    plot(res, out / "results.png")
    return res


def large_sizes(E: dict) -> list[str]:
    """The evaluated sizes above the native 128^2: the large size first, then the others."""
    return [E["large_size"]] + [s for s in E["other_sizes"] if s != E["large_size"]]


def evaluate_pretrained(res: dict, save, ev: Path, native: Path, large: dict, weights: Path, E: dict, device: str):
    """Stage 3: the pre-trained model at its native 128^2, and on each large size in one pass vs the teacher."""
    print("3/5 evaluate the pre-trained model: native 128^2, and large scenes single pass vs teacher", flush=True)
    if "native" not in res:
        r = evaluate(native, weights, "pretrained", ev / "native.json", device)["pretrained"]
        res["native"], res["native_s"] = 100 * r["miou"], r["seconds_per_image"]
        save()
    teacher_mode = f"slide{E['stride']}"
    sizes = res.setdefault("sizes", {})
    for size, root in large.items():
        if size not in sizes:
            r = evaluate(root, weights, f"pretrained,{teacher_mode}", ev / f"{size}.json", device)
            sizes[size] = dict(
                single=100 * r["pretrained"]["miou"],
                single_s=r["pretrained"]["seconds_per_image"],
                teacher=100 * r[teacher_mode]["miou"],
                teacher_s=r[teacher_mode]["seconds_per_image"],
            )
            save()
    res.update(sizes[E["large_size"]])  # the large size's numbers at the top level too
    save()


def distill_and_evaluate(res: dict, save, out: Path, key: str, native, large: dict, weights: Path, cfg: dict, device):
    """Stages 4 and 5: distill.py on unlabelled scenes, then the student in one pass (every size, and native)."""
    print("4/5 distill.py: the single-pass student regresses the sliding-window teacher (E4)", flush=True)
    W, D = cfg["world"], cfg["distill"]
    dist_set = write_world(
        out / "world" / f"distill-{D['size']}-{D['images']}", *parse_size(D["size"]), D["images"], SEEDS["distill"], W
    )
    run = out / f"distill-{key}"
    ckpt = run / "student.pt"
    if not (run / "metrics.json").is_file():
        cmd = distill_cmd(D, run, dist_set / "images", weights, device)
        run_cmd(cmd + (["--resume"] if (run / "resume.pt").is_file() else []))
    res["student_checkpoint"] = str(ckpt)

    print("5/5 evaluate the student: every large size in one pass, and native 128^2", flush=True)
    spar = res.setdefault("spar_sizes", {})
    for size, root in large.items():
        if size not in spar:
            r = evaluate(root, weights, "single", run / f"eval-{size}.json", device, ckpt)["single"]
            spar[size] = dict(spar=100 * r["miou"], spar_s=r["seconds_per_image"])
            save()
    if "spar_native" not in res:
        res["spar_native"] = (
            100 * evaluate(native, weights, "single", run / "eval-native.json", device, ckpt)["single"]["miou"]
        )
    res.update(spar[cfg["eval"]["large_size"]])
    save()


def plot(res: dict, path: Path):
    """Fig. 1 in miniature: seconds per image against mIoU on the large scenes (evaluate.py's plot)."""
    pts = {
        "single pass (pre-trained)": dict(seconds_per_image=res["single_s"], miou=res["single"] / 100),
        f"slide{res['config']['eval']['stride']} (teacher)": dict(
            seconds_per_image=res["teacher_s"], miou=res["teacher"] / 100
        ),
        "single (SPAR)": dict(seconds_per_image=res["spar_s"], miou=res["spar"] / 100),
    }
    speed_accuracy_plot(pts, path, f"SPAR in miniature: tiny, {res['config']['eval']['large_size']} scenes")


def print_table(res: dict):
    """The pre-trained model at 128^2, then per large size: single pass, teacher, SPAR and the share of the gap."""
    print(f"\nnative 128^2: pre-trained {res['native']:.1f} mIoU, SPAR {res['spar_native']:.1f}")
    print(
        f"{'size (HxW)':<12} {'single':>7} {'teacher':>8} {'SPAR':>6} {'gap':>6} {'closed':>7}   s/image single/teacher"
    )
    for size, r in res["sizes"].items():
        s = res["spar_sizes"][size]
        closed = f"{100 * s['gap_closed']:6.0f}%" if s["gap_closed"] is not None else "      -"
        print(f"{size:<12} {r['single']:7.1f} {r['teacher']:8.1f} {s['spar']:6.1f} {r['teacher'] - r['single']:6.1f} "
              f"{closed}   {r['single_s']:.3f} / {r['teacher_s']:.3f}")  # fmt: skip
    print(f"({res['seconds']:.0f} s in all)")


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """--set section.key=value (value parsed as JSON when it can be, else a string)."""
    cfg = copy.deepcopy(cfg)
    switches = [item for item in sets if item.partition("=")[0] in SWITCHES]
    for item in switches:  # first: a world.kind / pretrain.loss brings its own defaults
        key, _, value = item.partition("=")
        if value not in SWITCHES[key]:
            raise UserError(f"--set {item}: unknown {key}; known: {', '.join(SWITCHES[key])}.")
        cfg[key.partition(".")[0]] = copy.deepcopy(SWITCHES[key][value])
    for item in [item for item in sets if item not in switches]:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in cfg or name not in cfg[section]:
            raise UserError(
                f"--set '{item}': unknown key '{key}'; known: "
                + ", ".join(f"{s}.{k}" for s in cfg for k in cfg[s])
                + "."
            )
        try:
            cfg[section][name] = json.loads(value)
        except ValueError:
            cfg[section][name] = value
    return cfg


def world(argv: list[str]):
    """`python miniature.py world ...`: write a labelled set of scenes."""
    p = ArgumentParser(
        prog="miniature.py world",
        description="Write a labelled set of toy scenes "
        "(images/ and labels/), read by evaluate.py --dataset miniature.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="256x512", help="HxW (default %(default)s)")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="world.KEY=VALUE, e.g. world.fill_spread=0.1")
    a = p.parse_args(argv)
    H, W = parse_size(a.size)
    if a.count < 1:
        raise UserError(f"--count must be at least 1, got {a.count}.")
    cfg = apply_sets(DEFAULTS, a.set)
    check_config(cfg)
    cfg = cfg["world"]
    write_world(a.out, H, W, a.count, a.seed, cfg)
    print(f"wrote {a.count} scenes of {H}x{W} to {a.out} (images/, labels/)")


def diagnose_cmd(argv: list[str]):
    """`python miniature.py diagnose --out RUN`: diagnose.py's tables for a finished run."""
    p = ArgumentParser(prog="miniature.py diagnose", description=diagnose.__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/miniature", help="a finished miniature.py run folder (default %(default)s)")
    p.add_argument("--count", type=int, default=8, help="large scenes to measure on (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    a = p.parse_args(argv)
    check_numbers([("--count", a.count, (">=", 1))])
    report = diagnose.diagnose(Path(a.out), a.count, str(resolve_device(a.device)))
    write_json(Path(a.out) / "diagnose.json", report)
    print(f"saved {Path(a.out) / 'diagnose.json'}")


# --set values: integers (and their least value), numbers (a `cli.check_numbers` rule), sizes; anything else a string
INTEGERS = {
    "pretrain.steps": 4,  # OneCycleLR needs its 3 warm-up steps before the last
    "pretrain.batch": 1,
    "pretrain.templates": 1,
    "pretrain.seed": 0,
    "pretrain.big_size": 16,
    "eval.native_count": 1,
    "eval.large_count": 1,
    "eval.stride": 1,
    "distill.images": 3,  # 2 are held out for distill.py's report
    "distill.epochs": 0,
    "distill.batch_size": 1,
    "distill.stride": 1,
}
NUMBERS = {
    "pretrain.lr": "finite>0",
    "pretrain.weight_decay": "finite>=0",
    "pretrain.logit_scale": "finite>0",
    "pretrain.pos_rms": "finite>=0",
    "pretrain.big_frac": "0..1",
    "pretrain.presence": "0..1",
    "distill.lr": "finite>0",
    "distill.aug_scale": "finite>0",
}
SIZES = ("eval.large_size", "distill.size")


def check_config(cfg: dict):
    """Every knob a --set may change, checked before any work (one sentence each): integers are integers of at
    least their least value, numbers finite and in range, sizes HxW, the world's numbers finite and >= 0."""
    rules = []
    for key, least in INTEGERS.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"--set {key} must be an integer of at least {least}, not {value!r}.")
        rules.append((f"--set {key}", value, (">=", least)))
    for key, rule in NUMBERS.items():
        section, name = key.split(".")
        if name not in cfg[section]:  # e.g. presence: the sigmoid loss's only
            continue
        value = cfg[section][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"--set {key} must be a number, not {value!r}.")
        rules.append((f"--set {key}", float(value), rule))
    check_numbers(rules)
    for key in SIZES:
        section, name = key.split(".")
        parse_size(str(cfg[section][name]), f"--set {key}")
    if cfg["pretrain"]["templates"] > len(read_templates()):
        raise UserError(f"--set pretrain.templates must be at most the {len(read_templates())} templates there are.")
    for size in cfg["eval"]["other_sizes"] if isinstance(cfg["eval"]["other_sizes"], list) else [None]:
        parse_size(str(size), "--set eval.other_sizes")
    for name, value in cfg["world"].items():
        if name == "kind":
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values):  # fmt: skip
            raise UserError(f"--set world.{name} must be finite numbers >= 0, not {value!r}.")


def _run(argv: list[str]):
    if argv[:1] == ["world"]:
        return world(argv[1:])
    if argv[:1] == ["diagnose"]:
        return diagnose_cmd(argv[1:])
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n  world      write a labelled set of scenes (miniature.py world --help)\n"
        "  diagnose   what SPAR repairs: the offset, attention range, positions (miniature.py diagnose --help)",
    )
    p.add_argument("--out", default="runs/miniature", help="run folder (default %(default)s); a rerun resumes")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N, for every stage")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one knob of DEFAULTS, e.g. distill.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in the evaluate.py / distill.py runs (default: torch's; "
        "on a machine shared with other jobs 1 is often several times faster than 2)",
    )
    p.add_argument(
        "--until",
        choices=("teacher", "spar"),
        default="spar",
        help="teacher: stop before distillation (world, pretraining, pre-trained numbers only)",
    )
    a = p.parse_args(argv)
    cfg = apply_sets(DEFAULTS, a.set)
    check_config(cfg)
    check_numbers([("--threads", a.threads, (">=", 1))])
    resolve_device(a.device)
    if a.threads:  # also for the evaluate.py / distill.py it runs
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    res = experiment(Path(a.out), cfg, a.device, a.until)
    if a.until == "teacher":
        print(json.dumps({k: res[k] for k in ("native", "single", "teacher")}))
        return
    print_table(res)
    print(f"saved {Path(a.out) / 'results.json'} and {Path(a.out) / 'results.png'}")


def main(argv=None):
    return main_guard(_run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
