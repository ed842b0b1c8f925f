"""Speed and memory benchmark: single pass vs sliding window -- the speed claim of SPAR (CVPR 2026): for one
1024x2048 image the single pass takes 0.48 s and the stride-24 sliding-window teacher 25 s (~52x) on the paper's GPU.

SPAR's point is cost: the student (E3) looks at the image once, the teacher (E1-E2) looks at it through ~1,500
overlapping K x K windows.  This script measures, in ONE run on one machine, so that only the ratios matter:

  1. single pass    `Backbone.dense` (and its trunk alone, `tokens`) vs a bare timm `forward_features` of the same
                    trunk with the same weights (timm's own dynamic-size position embeddings): our overhead;
  2. teacher        `Teacher` at each stride vs the model-only time of the same windows (the same number of
                    `dense` calls on pre-cropped batches of the same batch size): the cost of cropping + stitching;
  3. speed-up       single pass vs the stride-24 teacher;
  4. training step  forward + MSE (E4) + backward + AdamW, last 2 blocks and all blocks trainable, vs a bare timm
                    forward + backward of the same trainable blocks;
  5. memory         peak GPU memory of each call above what was resident before it (weights, input); device,
                    dtype, torch version in the header.

Every time is the median of several repetitions after a warm-up, with `torch.cuda.synchronize()` around GPU
timings.  A call that takes longer than --budget seconds is run once (its first run is the measurement); a teacher
or model-only call estimated above --max-call seconds is not run but extrapolated from the measured per-window
model time (marked `~` in the table, `extrapolated: true` in the JSON).

Defaults depend on the device (see --help): on CUDA the paper's siglip2-b16 (random weights: speed does not
depend on weight values) at six sizes and five strides; on CPU the `tiny` backbone at three sizes, so that the
whole run takes a few minutes.  `python bench.py --backbone siglip2-b16 --sizes 512x512,1024x2048` works on CPU
too (slowly; the large teachers are then extrapolated).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import torch
import torch.nn.functional as F

from cli import (
    ArgumentParser,
    UserError,
    add_threads_arg,
    autocast,
    check_memory,
    check_numbers,
    main_guard,
    note_random_weights,
    parse_size,
    patch_budget,
    resolve_device,
    synchronize,
)
from files import atomic_write, check_writable, write_json
from student import BACKBONES, load_backbone
from teacher import Teacher, default_batch_size

GiB = 2**30
MiB = 2**20

# Per-device defaults: the GPU run is the full grid; the CPU run finishes in a few minutes on 2 cores.
DEFAULTS = {
    "cuda": dict(
        backbone="siglip2-b16",
        sizes="1024x2048,512x512,1024x1024,2048x2048,2048x4096,4096x4096",
        strides="512,256,128,48,24",
        train_size="1024x2048",
        warmup=3,
        reps=10,
        budget=2.0,
        max_call=120.0,
    ),
    "cpu": dict(
        backbone="tiny",
        sizes="1024x2048,512x512,1024x1024",
        strides="128,48,24",
        train_size="512x1024",
        warmup=1,
        reps=5,
        budget=20.0,
        max_call=60.0,
    ),
}
TARGETS = dict(single=1.15, teacher=1.15, speedup=90.0, train=1.3, mem_gib=4.0)
SPEEDUP_SIZE = (1024, 2048)  # the paper's speed claim is for one 1024 x 2048 image
MEM_SIZE = (4096, 4096)


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------


def measure(fns, device, warmup: int, reps: int, budget: float) -> list[dict]:
    """Time several callables round-robin (A B C A B C ...), so that load from other processes hits all alike.

    Returns, per callable: median wall time `seconds`, the list `times`, and `peak_bytes`, the most GPU memory a
    call allocated on top of what was resident before it (None on CPU).  The first round is timed too: if it
    already takes >= budget seconds it is the only measurement (a long call is dominated by steady-state work, and
    repeating it would blow the run time); otherwise it counts as warm-up (unless warmup == 0), then `warmup - 1`
    more warm-up rounds and up to `reps` timed rounds, fewer if they would take longer than `budget` seconds.
    """
    peaks = [0] * len(fns)
    first = [_timed(f, device, peaks, i) for i, f in enumerate(fns)]
    rounds = [first]
    if sum(first) < budget:
        for _ in range(max(0, warmup - 1)):
            for i, f in enumerate(fns):
                _timed(f, device, peaks, i)
        n = max(1, min(reps, int(budget / max(sum(first), 1e-6))))
        more = [[_timed(f, device, peaks, i) for i, f in enumerate(fns)] for _ in range(n - (warmup == 0))]
        rounds = (rounds if warmup == 0 else []) + more  # --warmup 0: the first round counts too
    cuda = torch.device(device).type == "cuda"
    return [
        dict(
            seconds=statistics.median(r[i] for r in rounds),
            times=[r[i] for r in rounds],
            reps=len(rounds),
            peak_bytes=peaks[i] if cuda else None,
        )
        for i in range(len(fns))
    ]


def _timed(fn, device, peaks, i) -> float:
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    dt = time.perf_counter() - t0
    if cuda:
        peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) - base)
    return dt


def paired_ratio(ours: dict, ref: dict) -> float:
    """Median of the per-round ratios: each round ran both back to back, so slow drifts of the machine cancel."""
    return statistics.median(a / b for a, b in zip(ours["times"], ref["times"]))


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The bare references
# ----------------------------------------------------------------------------------------------------------------


def bare_trunk(backbone):
    """A fresh timm VisionTransformer of the backbone's trunk config, dynamic image size, same weights; or None.

    Only the SigLIP-style backbones (siglip2-b16, tiny) have a timm trunk; clip-b16 gets no bare reference.
    """
    if BACKBONES[backbone.name].kind != "siglip":
        return None
    import timm

    if backbone.name == "tiny":
        from checkpoints import register_tiny_timm_model

        register_tiny_timm_model()
        arch = "spar_tiny_siglip"
    else:
        import open_clip

        arch = open_clip.get_model_config(BACKBONES[backbone.name].openclip_name)["vision_cfg"]["timm_model_name"]
    ref = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="map", dynamic_img_size=True)
    ref.load_state_dict(backbone.trunk.state_dict())  # same weights: only the code path differs
    return ref.eval().requires_grad_(False).to(backbone.device)


def agreement(backbone, ref, H: int, W: int) -> float:
    """max |our trunk tokens - timm forward_features| / max |timm|, on one random image (autocast as benchmarked)."""
    x = torch.randn(1, 3, H, W, device=backbone.device, generator=None)
    with torch.inference_mode(), autocast(backbone.device):
        ours, _ = backbone.tokens(x)
        theirs = ref.forward_features(x)
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# The measurements
# ----------------------------------------------------------------------------------------------------------------


def row(what, size, ours, ref, windows=None, target=None, extrapolated=False, note="", flops=None):
    """One table row; `ours` / `ref` are measure() dicts (or {'seconds': s} for extrapolated values)."""
    if ours and ref:
        ratio = paired_ratio(ours, ref) if "times" in ours and "times" in ref else ours["seconds"] / ref["seconds"]
    else:
        ratio = None
    r = dict(
        what=what,
        size=f"{size[0]}x{size[1]}",
        windows=windows,
        ours_s=ours["seconds"] if ours else None,
        ref_s=ref["seconds"] if ref else None,
        ratio=ratio,
        target=target,
        ours_peak_bytes=(ours or {}).get("peak_bytes"),
        ref_peak_bytes=(ref or {}).get("peak_bytes"),
        reps=(ours or {}).get("reps"),
        extrapolated=extrapolated,
        note=note,
        ours_times=(ours or {}).get("times"),
        ref_times=(ref or {}).get("times"),
        flops=flops,
        ours_tflops=tflops(flops, ours["seconds"] if ours else None),
    )
    mark = "~" if extrapolated else " "
    print(
        f"  {what:<42} {r['size']:>10} {fmt_time(r['ours_s']):>10} {fmt_time(r['ref_s']):>10} "
        f"{'' if ratio is None else f'{mark}{ratio:.2f}x'}",
        flush=True,
    )
    return r


def dense_flops(backbone, H: int, W: int, batch: int = 1) -> tuple[int, int] | None:
    """(trunk, dense head) FLOPs of `dense` on `batch` H x W images of a SigLIP-style backbone (None otherwise).

    Linear layers and the patch embedding cost 2 FLOPs per weight per token; attention 4 N^2 C per block (QK^T and
    AV).  LayerNorm, GELU, softmax and the position-embedding resize are left out: they are memory-bound.
    """
    if BACKBONES[backbone.name].kind != "siglip":
        return None
    trunk, C = backbone.trunk, backbone.dim
    N = math.prod(backbone.grid_size(H, W))

    def lin(m):
        return sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))

    body = 2 * N * lin(trunk.blocks) + 4 * N * N * C * len(trunk.blocks) + 2 * N * C * 3 * backbone.patch_size**2
    pool = trunk.attn_pool
    head = 2 * N * (C * C + lin(pool.proj) + lin(pool.mlp))  # value half of kv, proj, mlp
    return batch * body, batch * head


def head_flop_share(backbone, H: int, W: int) -> float:
    """(trunk + dense head) / trunk FLOPs at H x W: the overhead over a bare trunk that the head must cost."""
    body, head = dense_flops(backbone, H, W)
    return (body + head) / body


def tflops(flops, seconds) -> float | None:
    return None if flops is None or not seconds else flops / seconds / 1e12


def bench_single(backbone, ref, sizes, args) -> tuple[list, dict]:
    """(1) single pass: dense, trunk-only tokens and bare timm, round-robin at every size."""
    dev, rows, dense_s = backbone.device, [], {}
    for H, W in sizes:
        x = backbone.normalize(torch.rand(1, 3, H, W, device=dev))

        def call(f, x=x):
            def run():
                with torch.inference_mode(), autocast(dev):
                    f(x)

            return run

        fns = [call(backbone.dense)]
        if ref is not None:
            fns += ([] if args.no_trunk else [call(lambda t: backbone.tokens(t))]) + [call(ref.forward_features)]
        res = measure(fns, dev, args.warmup, args.reps, args.budget)
        dense_s[(H, W)] = res[0]
        if ref is None:
            rows.append(row("single pass: dense (no bare ref.)", (H, W), res[0], None))
            continue
        body, head = dense_flops(backbone, H, W)
        rows.append(
            row(
                "single pass: dense vs bare timm",
                (H, W),
                res[0],
                res[-1],
                target=f"<= {TARGETS['single']}x",
                note=f"head adds {100 * head / body:.1f}% FLOPs",
                flops=body + head,
            )
        )
        if not args.no_trunk:
            rows.append(
                row("single pass: trunk vs bare timm", (H, W), res[1], res[-1], note="like for like", flops=body)
            )
        del x
    return rows, dense_s


def model_only(backbone, n: int, batch: int):
    """The teacher's model work without cropping and stitching: n windows as full batches + one tail batch."""
    K, dev = backbone.window, backbone.device
    full = torch.randn(min(batch, n), 3, K, K, device=dev)  # pre-cropped windows; values do not change the time
    tail = full[: n % batch] if n > batch else None

    def call():
        with torch.inference_mode(), autocast(dev):
            for _ in range(n // batch if n > batch else 1):
                backbone.dense(full)
            if tail is not None and len(tail):
                backbone.dense(tail)

    return call


def teacher_row(s, size, te, mo, n, flops, **kw) -> dict:
    """One "teacher s=... vs model-only" row, measured or (extrapolated=True) estimated."""
    return row(
        f"teacher s={s} vs model-only", size, te, mo, windows=n, target=f"<= {TARGETS['teacher']}x", flops=flops, **kw
    )


def bench_teacher(backbone, sizes, strides, dense_s, args) -> list:
    """(2) teacher vs model-only at every size and stride, (3) speed-up of the single pass over stride 24."""
    dev, K, rows, batch = backbone.device, backbone.window, [], args.batch_size
    per_batch = measure([model_only(backbone, batch, batch)], dev, args.warmup, args.reps, args.budget)[0]["seconds"]
    per_window = per_batch / batch  # first estimate; refined by every measured model-only run
    print(f"  model time per window (batch {batch}): {per_window * 1e3:.2f} ms", flush=True)
    overhead = {}  # stride -> last measured teacher/model ratio
    done_windows, done_seconds = 0, 0.0  # all measured model-only runs together
    for s in strides:
        if s > K:
            print(f"note: stride {s} > window {K} would leave gaps between windows; skipped", file=sys.stderr)
            continue
        for H, W in sorted(sizes, key=lambda hw: hw[0] * hw[1]):  # small first: the extrapolation uses them
            teacher = Teacher(backbone, stride=s, batch_size=batch)
            n = teacher.num_windows(H, W)
            if done_windows >= batch:  # more windows averaged: a steadier estimate
                per_window = done_seconds / done_windows
            est = per_window * n  # the n windows model_only runs (a tail batch costs a little more per window)
            fl = dense_flops(backbone, K, K, n)
            fl = None if fl is None else sum(fl)
            if est > args.max_call:  # too long to run here: extrapolate
                ratio = overhead.get(s)
                mo = dict(seconds=est)
                te = dict(seconds=est * ratio) if ratio else None
                note = f"model-only = {n} windows x {per_window * 1e3:.1f} ms; " + (
                    f"teacher = that x the s={s} overhead at a smaller size" if ratio else "teacher not run"
                )
                rows.append(teacher_row(s, (H, W), te, mo, n, fl, extrapolated=True, note=note))
            else:
                x = backbone.normalize(torch.rand(1, 3, H, W, device=dev))
                te, mo = measure(
                    [lambda: teacher(x), model_only(backbone, n, batch)], dev, args.warmup, args.reps, args.budget
                )
                rows.append(teacher_row(s, (H, W), te, mo, n, fl, note=f"batch {batch}"))
                overhead[s] = rows[-1]["ratio"]
                done_windows, done_seconds = done_windows + n, done_seconds + mo["seconds"]
                del x
            if s == 24 and (H, W) in dense_s and te:
                rows.append(
                    row(
                        "speed-up: teacher s=24 / single pass",
                        (H, W),
                        te,
                        dict(seconds=dense_s[(H, W)]["seconds"]),
                        windows=n,
                        extrapolated=rows[-1]["extrapolated"],
                        target=f">= {TARGETS['speedup']:g}x" if (H, W) == SPEEDUP_SIZE else None,
                    )
                )
    return rows


def train_step(model_fwd, params, target, x, dev, optimizer: bool):
    """(E4) one distillation step: MSE to a fixed target, backward, AdamW (or, for the bare ref., fwd + bwd only)."""
    # fused AdamW on CUDA: one kernel for all parameters instead of a few per tensor
    opt = (
        torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-4, fused=torch.device(dev).type == "cuda")
        if optimizer
        else None
    )

    def call():
        for p in params:
            p.grad = None
        with autocast(dev):
            out = model_fwd(x)
        loss = F.mse_loss(out.float(), target) if optimizer else out.float().pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()

    return call


def set_trainable(tower, blocks, mode: str) -> list:
    """Freeze `tower`, then unfreeze the last 2 `blocks` or everything; returns the trainable parameters."""
    tower.requires_grad_(mode == "all blocks")
    if mode == "last 2 blocks":
        blocks[-2:].requires_grad_(True)
    return [p for p in tower.parameters() if p.requires_grad]


def bench_train(backbone, ref, size, args) -> list:
    """(4) distillation step, last 2 blocks and all blocks trainable, vs bare timm forward + backward (round-robin)."""
    dev, rows = backbone.device, []
    H, W = size
    x = backbone.normalize(torch.rand(1, 3, H, W, device=dev))
    h, w = backbone.grid_size(H, W)
    target = torch.randn(1, h, w, backbone.dim, device=dev)
    for mode in ("last 2 blocks", "all blocks"):
        params = set_trainable(backbone.image_tower(), backbone.blocks, mode)
        fns = [train_step(backbone.dense, params, target, x, dev, True)]
        if ref is not None:
            fns.append(train_step(ref.forward_features, set_trainable(ref, ref.blocks, mode), None, x, dev, False))
        res = measure(fns, dev, args.warmup, args.reps, args.budget)
        backbone.image_tower().requires_grad_(False)
        if ref is not None:
            ref.requires_grad_(False)
        rows.append(
            row(
                f"train step ({mode}) vs bare fwd+bwd",
                size,
                res[0],
                res[1] if ref is not None else None,
                target=f"<= {TARGETS['train']}x",
                note=f"{sum(p.numel() for p in params) / 1e6:.1f}M trainable params",
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Verdicts and output
# ----------------------------------------------------------------------------------------------------------------


def verdicts(rows, meta) -> list:
    """Each issue target: the worst measured value and whether it is met (targets are defined for the GPU)."""
    out = []

    def add(name, value, ok, detail):
        out.append(dict(target=name, value=value, met=ok, detail=detail))

    def worst(prefix):
        rs = [r for r in rows if r["what"].startswith(prefix) and r["ratio"] and not r["extrapolated"]]
        return max(rs, key=lambda r: r["ratio"]) if rs else None

    r = worst("single pass: dense")
    if r:
        add(
            f"single-pass overhead <= {TARGETS['single']}x",
            r["ratio"],
            r["ratio"] <= TARGETS["single"],
            f"worst at {r['size']}",
        )
    r = worst("teacher")
    if r:
        paper = [
            x
            for x in rows
            if x["what"].startswith("teacher")
            and x["size"] == "%dx%d" % SPEEDUP_SIZE
            and x["ratio"]
            and not x["extrapolated"]
        ]
        at_paper = f"; at 1024x2048 worst {max(x['ratio'] for x in paper):.2f}x" if paper else ""
        add(
            f"teacher overhead <= {TARGETS['teacher']}x at every stride",
            r["ratio"],
            r["ratio"] <= TARGETS["teacher"],
            f"worst: {r['what'].split(' vs')[0]} at {r['size']}{at_paper}",
        )
    rs = [r for r in rows if r["what"].startswith("speed-up") and r["size"] == "%dx%d" % SPEEDUP_SIZE]
    if rs and rs[0]["ratio"]:
        add(
            f"speed-up over the s=24 teacher >= {TARGETS['speedup']:g}x at 1024x2048",
            rs[0]["ratio"],
            rs[0]["ratio"] >= TARGETS["speedup"],
            "extrapolated" if rs[0]["extrapolated"] else "measured",
        )
    r = worst("train step")
    if r:
        add(
            f"training step <= {TARGETS['train']}x of bare fwd+bwd",
            r["ratio"],
            r["ratio"] <= TARGETS["train"],
            f"worst: {r['what'].split(' vs')[0]}",
        )
    memory = memory_verdict(rows, meta)
    if memory:
        out.append(memory)
    return out


def memory_verdict(rows, meta) -> dict | None:
    """The single pass at 4096 x 4096: image-tower weights + fp32 input + peak activations vs the memory target."""
    rs = [r for r in rows if r["what"].startswith("single pass: dense") and r["size"] == "%dx%d" % MEM_SIZE]
    if not rs or rs[0]["ours_peak_bytes"] is None:
        return None
    total = meta["image_tower_bytes"] + 3 * MEM_SIZE[0] * MEM_SIZE[1] * 4 + rs[0]["ours_peak_bytes"]
    return dict(
        target=f"single pass at 4096x4096 fits in {TARGETS['mem_gib']:g} GiB",
        value=total / GiB,
        met=total / GiB <= TARGETS["mem_gib"],
        detail=f"image-tower weights {meta['image_tower_bytes'] / GiB:.2f} + fp32 input "
        f"{3 * MEM_SIZE[0] * MEM_SIZE[1] * 4 / GiB:.2f} + peak activations "
        f"{rs[0]['ours_peak_bytes'] / GiB:.2f} GiB",
    )


def fmt_time(s):
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 600 else f"{s / 60:.0f} min"


def fmt_rate(tflops, mark=""):
    """Achieved model FLOP/s (matmuls + attention only), to set against the chip's peak."""
    if tflops is None:
        return ""
    return f"{mark}{tflops:.0f} T" if tflops >= 1 else f"{mark}{tflops * 1e3:.1f} G"


def fmt_mem(b):
    return "n/a" if b is None else f"{b / MiB:.0f}"


def markdown(rows) -> str:
    head = [
        "measurement",
        "size",
        "windows",
        "ours",
        "reference",
        "ratio",
        "target",
        "ours FLOP/s",
        "peak MiB ours / ref",
        "reps",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "~" if r["extrapolated"] else ""
        ratio = (
            "—" if r["ratio"] is None else f"{mark}{r['ratio']:.2f}x" if r["ratio"] < 10 else f"{mark}{r['ratio']:.0f}x"
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["what"],
                    r["size"],
                    "" if r["windows"] is None else f"{r['windows']:,}",
                    (mark if r["ours_s"] else "") + fmt_time(r["ours_s"]),
                    (mark if r["ref_s"] else "") + fmt_time(r["ref_s"]),
                    ratio,
                    r["target"] or "",
                    fmt_rate(r["ours_tflops"], mark),
                    f"{fmt_mem(r['ours_peak_bytes'])} / {fmt_mem(r['ref_peak_bytes'])}",
                    "" if r["reps"] is None else str(r["reps"]),
                    r["note"],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def describe(meta) -> str:
    return (
        f"device: {meta['device_name']} | dtype: {meta['dtype']} | torch {meta['torch']} | timm {meta['timm']} | "
        f"backbone {meta['backbone']} (pretrained={meta['pretrained']}, K={meta['window']}) | "
        f"teacher batch {meta['batch']} | "
        f"warm-up {meta['warmup']}, up to {meta['reps']} reps, median | threads {meta['threads']}"
        + ("" if meta.get("sdpa") is None else f" | timm fused SDPA attention: {meta['sdpa']}")
    )


def cpu_name() -> str:
    """The CPU model as lscpu prints it (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def parse_sizes(text: str, flag: str = "--sizes") -> list[tuple[int, int]]:
    """'512x512,1024x2048' -> [(512, 512), (1024, 2048)]; UserError with one sentence otherwise."""
    sizes = [parse_size(s, f"each size in {flag}") for s in text.split(",") if s.strip()]
    if not sizes:
        raise UserError(f"{flag} wants HxW[,HxW...], got '{text}'.")
    return sizes


def parse_strides(text: str) -> list[int]:
    """'128,48,24' -> [128, 48, 24], each a positive integer (<= K is checked once the backbone is known)."""
    try:
        strides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--strides wants positive integers like 128,48,24, got '{text}'.") from None
    if not strides or min(strides) < 1:
        raise UserError(f"--strides wants positive integers like 128,48,24, got '{text}'.")
    return strides


def defaults_flags(d: dict) -> str:
    """One device's defaults as the flags that would set them, for --help."""
    return (
        f"--backbone {d['backbone']} --sizes {d['sizes']} --strides {d['strides']} --train-size {d['train_size']} "
        f"--warmup {d['warmup']} --reps {d['reps']} --budget {d['budget']:g} --max-call {d['max_call']:g}"
    )


def build_parser(device_default: str) -> argparse.ArgumentParser:
    d = DEFAULTS["cuda" if device_default.startswith("cuda") else "cpu"]
    p = ArgumentParser(
        description="Speed and memory of the single pass (E3) vs the sliding-window teacher (E1-E2) and of one "
        "distillation step (E4), each against a bare reference, measured in one run. "
        f"CPU defaults: {defaults_flags(DEFAULTS['cpu'])} (a few minutes on 2 cores). "
        f"GPU defaults: {defaults_flags(DEFAULTS['cuda'])}."
    )
    p.add_argument("--device", default=device_default, help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--backbone", default=None, help=f"one of {', '.join(BACKBONES)} (default: per device, above)")
    p.add_argument(
        "--pretrained",
        default="none",
        help="'none' (random weights; default, speed does not depend on them), 'default' or a file",
    )
    p.add_argument(
        "--naflex-patches",
        default="256",
        type=patch_budget,
        metavar="N|all",
        help="siglip2-naflex-b16 only: its patch budget (default: %(default)s; 'all': the image's own grid)",
    )
    p.naflex_flag = True  # the --backbone's budget: said when that backbone has none
    p.add_argument("--sizes", default=None, help="comma-separated HxW image sizes (default: per device)")
    p.add_argument("--strides", default=None, help="comma-separated teacher strides, each <= K (default: per device)")
    p.add_argument("--train-size", default=None, help="HxW of the training-step image (default: per device)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="teacher windows per forward (default: teacher.default_batch_size, from free memory)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up rounds per measurement; 0: the first round is timed too (default: per device)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, median reported (default: per device)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds of timed repetitions per measurement; a call longer than this runs once "
        f"(default: {d['budget']:g})",
    )
    p.add_argument(
        "--max-call",
        type=float,
        default=None,
        help="teacher calls estimated longer than this many seconds are extrapolated, not run (default: per device)",
    )
    add_threads_arg(p)  # on a busy 2-core machine, a 2-thread forward ran 12x slower than 1 thread
    p.add_argument("--no-teacher", action="store_true", help="skip (2) and (3)")
    p.add_argument("--no-train", action="store_true", help="skip (4)")
    p.add_argument("--no-trunk", action="store_true", help="skip the trunk-only single-pass rows")
    p.add_argument("--json", help="also write meta, rows and verdicts to this JSON file")
    p.add_argument("--markdown", help="also write the header and table to this markdown file")
    return p


def settle_args(args) -> tuple[list, list, tuple[int, int]]:
    """Fill the per-device defaults into `args`; the sizes, strides and training size, checked; outputs writable."""
    d = DEFAULTS["cuda" if resolve_device(args.device).type == "cuda" else "cpu"]
    check_numbers(
        [
            ("--batch-size", args.batch_size, (">=", 1)),
            ("--warmup", args.warmup, (">=", 0)),
            ("--reps", args.reps, (">=", 1)),
            ("--budget", args.budget, "finite>0"),
            ("--max-call", args.max_call, "finite>0"),
        ]
    )  # before the defaults: a 0 given is refused, not taken for "automatic"
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sizes, strides = parse_sizes(args.sizes), parse_strides(args.strides)
    train_size = parse_sizes(args.train_size, "--train-size")[0]
    for path in (args.json, args.markdown):
        if path:
            check_writable(path)  # before the minutes of measuring, not after
    return sizes, strides, train_size


def run_meta(backbone, ref, args, argv) -> dict:
    """The header of the results: machine, versions, settings."""
    dev = backbone.device
    cuda = dev.type == "cuda"
    return dict(
        backbone=backbone.name,
        pretrained=str(args.pretrained),
        window=backbone.window,
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if cuda else cpu_name(),
        dtype=("bf16" if torch.cuda.is_bf16_supported() else "fp16") + " autocast" if cuda else "fp32",
        torch=torch.__version__,
        timm=__import__("timm").__version__,
        python=platform.python_version(),
        batch=args.batch_size,
        **({"naflex_patches": args.naflex_patches} if not getattr(backbone, "slides", True) else {}),
        warmup=args.warmup,
        reps=args.reps,
        threads=torch.get_num_threads(),
        image_tower_bytes=param_bytes(backbone.image_tower()),
        sdpa=getattr(backbone.blocks[0].attn, "fused_attn", None) if ref is not None else None,
        argv=sys.argv[1:] if argv is None else list(argv),
    )


def _run(argv):
    dev_default = "cuda" if torch.cuda.is_available() else "cpu"
    device = build_parser(dev_default).parse_known_args(argv)[0].device
    args = build_parser(device).parse_args(argv)
    sizes, strides, train_size = settle_args(args)
    backbone = load_backbone(args.backbone, args.pretrained, args.device)
    backbone.max_patches = args.naflex_patches  # NaFlex's patch budget (only `NaFlexBackbone` reads it)
    if not getattr(backbone, "slides", True) and not args.no_teacher:  # NaFlex: a single-pass baseline
        print(f"skip: teacher rows: {backbone.name} is a single-pass baseline with no window to slide", flush=True)
        args.no_teacher = True
    if max(strides) > backbone.window and not args.no_teacher:
        raise UserError(
            f"--strides must be at most the {backbone.window} px window of {backbone.name}, got {max(strides)}."
        )
    for H, W in sizes + [train_size]:  # a size that could never fit is refused before any measuring
        check_memory(H, W, backbone.patch_size, backbone.dim, backbone.device, "--sizes / --train-size: one pass at")
    ref = bare_trunk(backbone)
    args.batch_size = args.batch_size or default_batch_size(backbone, backbone.device)  # once: free memory changes
    meta = run_meta(backbone, ref, args, argv)
    print(describe(meta), flush=True)
    note_random_weights(backbone.random_weights)  # speed does not depend on the weights; the agreement does not either
    if ref is not None:
        K = backbone.window
        meta["agreement_native"] = agreement(backbone, ref, K, K)
        meta["agreement_2x"] = agreement(backbone, ref, K, 2 * K)
        print(
            f"check: our trunk vs bare timm forward_features, rel. max diff {meta['agreement_native']:.1e} at "
            f"{K}x{K} (native), {meta['agreement_2x']:.1e} at {K}x{2 * K} (timm resizes the position embeddings "
            f"with antialiased bicubic, we use plain bicubic as the paper)",
            flush=True,
        )

    t0 = time.perf_counter()
    rows, dense_s = bench_single(backbone, ref, sizes, args)
    report(rows, meta, args, time.perf_counter() - t0, final=False)  # partial files, in case the run is cut
    if not args.no_teacher:
        rows += bench_teacher(backbone, sizes, strides, dense_s, args)
        report(rows, meta, args, time.perf_counter() - t0, final=False)
    if not args.no_train:
        rows += bench_train(backbone, ref, train_size, args)
    return report(rows, meta, args, time.perf_counter() - t0, final=True)


def main(argv=None):
    return main_guard(_run, argv)


def report(rows, meta, args, seconds, final: bool) -> dict:
    """Write the JSON / markdown files (every section, so a cut run keeps its numbers); print the table at the end."""
    meta = dict(meta, seconds=seconds, complete=final)
    checks = verdicts(rows, meta)
    table = markdown(rows)
    on_target = meta["device"].startswith("cuda") and meta["backbone"] == "siglip2-b16"
    scope = "" if on_target else " (defined for siglip2-b16 on a GPU; informational here)"
    lines = [f"targets{scope}:"] + [
        f"  {c['target']}: {c['value']:.2f}{'x' if 'GiB' not in c['target'] else ' GiB'} -> "
        f"{'met' if c['met'] else 'NOT met'} ({c['detail']})"
        for c in checks
    ]
    text = (
        describe(meta)
        + "\n\n"
        + table
        + "\n\n"
        + "\n".join(lines)
        + f"\n\nbenchmark wall time {seconds:.0f} s; `~` = extrapolated, not run"
        + ("" if final else " (INCOMPLETE: the run stopped here)")
        + "\n"
    )
    if final:
        print("\n" + text, flush=True)
    if args.markdown:  # a WriteError is one `error:` line (main_guard)
        atomic_write(args.markdown, lambda f: f.write(text.encode()))
    if args.json:
        write_json(args.json, dict(meta=meta, rows=rows, targets=checks))
    return dict(meta=meta, rows=rows, targets=checks)


if __name__ == "__main__":
    main()
