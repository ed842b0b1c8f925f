"""Zero-shot segmentation benchmarks (SPAR, CVPR 2026: the six benchmarks of Table 1, and the speed-accuracy
trade-off of Fig. 1).

One confusion matrix n (rows = label, columns = prediction; ignore label 255) is accumulated over the whole split:

    (E6)  IoU_k = n_kk / (sum_j n_kj + sum_j n_jk - n_kk),   mIoU = mean of IoU_k over the classes with a union

Protocol (`--protocol paper`, the default, is the authors' code): each image is resized keeping its ratio (short
side 672, long side at most 2048; Cityscapes 2048 x 1024) bilinearly without antialias, segmented with the text of
(E5) (`segment.segment`) in fp32 (`--amp` for bf16/fp16 autocast), and the cosine logits are resized ONCE from the
model's grid to the label's original size; `--protocol aligned` is our variant (see segment.py).  Modes: `student`
(one pass, (E3), of the --checkpoint), `single` (one pass: the student with --checkpoint, else pre-trained),
`pretrained` (one pass with the pre-trained weights even when --checkpoint is given), `slideN` (the pre-trained
teacher, (E1)-(E2), at stride N, features averaged where windows overlap, as SPAR's teacher) and `slidelogitN`
(the same windows, cosine logits averaged where they overlap, as the authors' sliding-window baseline intended).
With several modes a speed-accuracy plot in the style of Fig. 1 is drawn.  The benchmarks' folder layouts, label
conventions, class names and settings: benchmarks.py.

    python evaluate.py --dataset cityscapes --root DATA --backbone siglip2-b16 --modes single,slide24
    python evaluate.py --dataset voc21 --make-synthetic /tmp/voc        # a tiny fake VOC folder to try things on
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import numpy as np
import torch

import benchmarks
import refine
from cli import (
    ArgumentParser,
    UserError,
    add_backbone_args,
    add_flags,
    autocast,
    check_flag_numbers,
    check_numbers,
    display_name,
    main_guard,
    note_random_weights,
    resolve_device,
)
from files import write_json
from pictures import speed_accuracy_plot
from results import ONE_PASS, STUDENT, check_checkpoint, claim, out_path, parse_modes, resumed, run_settings
from segment import (
    SegmentSettings,
    check_stride,
    segment,
    text_embeddings,
    window_teacher,
)
from student import BACKBONES, load_backbone
from textcache import cache_dir_arg


def confusion(pred, label, num_classes: int, ignore_index: int = benchmarks.IGNORE) -> torch.Tensor:
    """(K, K) int64 confusion matrix, rows = ground truth, columns = prediction; pixels labelled `ignore_index`
    are skipped.  pred, label: integer tensors (or arrays) of the same shape, on any device (the result stays
    there)."""
    pred, label = torch.as_tensor(pred), torch.as_tensor(label, device=torch.as_tensor(pred).device)
    if any(t.is_complex() or (t.is_floating_point() and not torch.equal(t, t.round())) for t in (pred, label)):
        raise ValueError(f"confusion() takes integer class indices, not fractions ({pred.dtype} / {label.dtype})")
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(
            f"label values must be in [0, {num_classes}) or {ignore_index}, got "
            f"{label.min().item()}..{label.max().item()}"
        )
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must be in [0, {num_classes}), got {pred.min().item()}..{pred.max().item()}")
    # ASSIGNMENT 6 BEGIN: the confusion matrix, one count per (label, prediction) pair
    return torch.bincount(label * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    # ASSIGNMENT 6 END


def miou(conf) -> tuple[float, np.ndarray]:
    """(E6) (mean IoU, per-class IoU) from a confusion matrix.  IoU_k = TP / (TP + FP + FN); classes with an empty
    union (neither in the labels nor predicted) are NaN and left out of the mean (NaN if all are empty)."""
    # ASSIGNMENT 6 BEGIN: per-class IoU and their mean over classes present
    conf = torch.as_tensor(conf).double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).numpy()
    valid = ~np.isnan(iou)
    return (float(iou[valid].mean()) if valid.any() else float("nan")), iou
    # ASSIGNMENT 6 END


def evaluate_mode(backbone, samples, text, how: SegmentSettings, state: dict, save, workers=0, every=25, desc=""):
    """Run one mode over `samples` with the settings `how`, continuing from state["images_done"].

    `state` always holds a consistent snapshot (confusion, images_done, seconds, mIoU) that `save()` writes; it is
    refreshed every `every` images, at the end, and on Ctrl-C, so an interrupted run loses nothing.
    """
    from tqdm import tqdm

    device, K = backbone.device, text.num_classes
    conf = torch.zeros(K, K, dtype=torch.long, device=device)  # (K, K) on the device
    if state.get("confusion"):
        conf += torch.tensor(state["confusion"], dtype=torch.long, device=device)
    done, seconds, bad = state.get("images_done", 0), state.get("seconds", 0.0), state.get("out_of_range_pixels", 0)

    def snapshot():
        mean, per_class = miou(conf)
        per_class = {name: (None if math.isnan(v) else float(v)) for name, v in zip(text.names, per_class)}
        state.update(images_done=done, seconds=seconds, seconds_per_image=seconds / max(done, 1), miou=mean)
        state.update(
            per_class_iou=per_class, confusion=conf.cpu().tolist(), **({"out_of_range_pixels": bad} if bad else {})
        )
        save()

    teacher = window_teacher(backbone, how, text) if how.mode != "single" else None
    with torch.inference_mode(), autocast(device, "auto" if how.amp else "fp32"):  # warm-up: kernels, cudnn
        backbone.dense(backbone.normalize(torch.zeros(1, 3, backbone.window, backbone.window, device=device)))
    loader = benchmarks.sample_loader(samples[done:], workers, pin_memory=device.type == "cuda")
    bar = tqdm(loader, total=len(samples), initial=done, desc=desc, unit="img", leave=False)
    try:
        for image, label, n_bad, warning, error in bar:
            if error:
                raise benchmarks.DatasetError(error)
            if n_bad:  # said once per file, with its name; counted with the image (a resume counts it once)
                bar.write(warning, file=sys.stderr)
            label = label.to(device, non_blocking=True)  # (H, W) uint8
            image = image.to(device, non_blocking=True)[None].float().div_(255)  # (1, 3, H, W)
            seg = segment(backbone, image, text, how, teacher=teacher, out_hw=label.shape)
            conf += confusion(seg.labels[0], label, K)
            done, seconds, bad = done + 1, seconds + seg.seconds, bad + int(n_bad)
            if done % every == 0 or done == len(samples):
                snapshot()
                bar.set_postfix(mIoU=f"{100 * state['miou']:.1f}")
    except KeyboardInterrupt:
        snapshot()
        raise
    finally:
        bar.close()
    return state


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    shown = ("voc21", "context60", "cityscapes", "ade20k", "miniature")
    layouts = "; ".join(f"{n}: {benchmarks.DATASETS[n].layout}" for n in shown)
    p = ArgumentParser(
        description="Zero-shot segmentation mIoU on VOC21/VOC20/Context60/Context59/Cityscapes/ADE20K (and the "
        "toy world of miniature.py: --dataset miniature), per mode "
        "(single pass, pre-trained single pass, sliding-window teacher), with seconds per image, a JSON "
        "of the results and (several modes) the speed-accuracy plot of Fig. 1.",
        epilog="layouts: " + layouts,
    )
    p.add_argument("--dataset", required=True, choices=list(benchmarks.DATASETS))
    p.add_argument("--root", help="dataset folder (see the layouts below / README)")
    add_backbone_args(p, BACKBONES, default="siglip2-b16", naflex=True)
    p.add_argument("--checkpoint", help="student.pt from distill.py (or the authors' file): the 'student' mode's")
    p.add_argument(
        "--modes",
        default="single",
        help="comma-separated: student (single pass of --checkpoint), single (student if --checkpoint, else "
        "pre-trained), pretrained (pre-trained single pass), slideN (teacher at stride N px, features "
        "averaged over windows), slidelogitN (cosine logits averaged over windows), e.g. "
        "single,slide24,slidelogit24 (default: %(default)s)",
    )
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    what = "segmentation settings (default: the (backbone, dataset)'s, benchmarks.settings_for)"
    add_flags(p.add_argument_group(what), SegmentSettings, ("mode", "stride"), **dict.fromkeys(benchmarks.SETTINGS))
    p.add_argument("--workers", type=int, default=None, help="image-reading workers (default: 2 on GPU, 0 on CPU)")
    p.add_argument("--templates", default=str(benchmarks.DEFAULT_TEMPLATES))
    p.add_argument("--text-cache", default=None, help="text-embedding cache folder ('none' disables)")
    p.add_argument(
        "--out",
        default=None,
        help="results JSON (default runs/eval/<dataset>-<backbone>[-<ckpt>].json); the plot goes next to it as .png",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a matching partial run")
    p.add_argument("--save-every", type=int, default=25, help="save the JSON every N images (default 25)")
    p.add_argument("--make-synthetic", metavar="DIR", help="write a small fake --dataset folder to DIR and exit")
    p.add_argument("--num-synthetic", type=int, default=3, help="images in --make-synthetic (default 3)")
    return p


def prepare(args):
    """Everything checked and loaded before the first image: the split, the models, the text, the settings."""
    device = resolve_device(args.device)
    check_flag_numbers(args, SegmentSettings, skip=("mode", "stride"))
    check_numbers([("--save-every", args.save_every, (">=", 1)), ("--workers", args.workers, (">=", 0))])
    modes = parse_modes(args.modes)
    check_numbers([("--max-images", args.max_images, (">=", 1))])
    samples, classes = benchmarks.benchmark(args.dataset, args.root, args.max_images)
    templates = benchmarks.read_templates(args.templates)
    settings = run_settings(args, len(samples), templates, {k: getattr(args, k) for k in benchmarks.SETTINGS})
    check_checkpoint(modes, args.checkpoint)
    settings.update(refine.run_record(args))  # --refine, --upsample: a run with others does not resume this one
    needs_pretrained = any(k not in STUDENT for _, k, _ in modes) and args.checkpoint
    backbone = load_backbone(args.backbone, args.pretrained, device, checkpoint=args.checkpoint)
    backbone.max_patches = args.naflex_patches  # NaFlex's patch budget (only `NaFlexBackbone` reads it)
    base = load_backbone(args.backbone, args.pretrained, device) if needs_pretrained else backbone
    base.max_patches = args.naflex_patches
    for label, kind, stride in modes:
        if kind.startswith("slide"):
            check_stride(stride, backbone, f"mode '{label}': the stride", args.window)
    text = text_embeddings(backbone, classes, templates, cache_dir_arg(args.text_cache), progress=True)
    if args.dataset == "voc21":  # line 1 of voc21.txt: 26 "stuff" synonyms for background
        text.names[0] = "background"
    return samples, modes, settings, backbone, base, text


def _run(argv=None):
    args = build_parser().parse_args(argv)
    spec = benchmarks.DATASETS[args.dataset]
    if args.make_synthetic:
        root = benchmarks.make_synthetic(args.dataset, args.make_synthetic, args.num_synthetic)
        print(f"wrote a synthetic {args.dataset} dataset ({args.num_synthetic} images) to {root}")
        return
    if not args.root:
        raise UserError("--root is required (the dataset folder), or use --make-synthetic DIR.")
    with claim(out_path(args)):  # before any work: ours to write, and locked while this run lives
        run_modes(args, spec, out_path(args))


def run_modes(args, spec, out):
    """Every mode over the split, resumed from `out`, then the table, the JSON and (several modes) the plot."""
    samples, modes, settings, backbone, base, text = prepare(args)
    record = resumed(out, {"settings": settings, "classes": text.names, "modes": {}}, args.no_resume)
    save = lambda: write_json(out, record)  # noqa: E731  atomic (files.py)
    workers = args.workers if args.workers is not None else (2 if backbone.device.type == "cuda" else 0)
    print(
        f"{spec.title}: {len(samples)} images, backbone {args.backbone}"
        + (f" + {display_name(args.checkpoint)}" if args.checkpoint else "")
        + f", logit scale {settings['logit_scale']:g}, prob_thd {settings['prob_thd']:g}, "
        f"area_thd {settings['area_thd']:g}, short side {settings['short_side']}, long side "
        f"{settings['long_side']}, protocol {args.protocol}, {'amp' if args.amp else 'fp32'}, refine {args.refine}, "
        f"upsample {args.upsample}"
    )
    note_random_weights(backbone.random_weights)
    fields = [f.name for f in dataclasses.fields(SegmentSettings)]
    try:
        for label, kind, stride in modes:
            state = record["modes"].setdefault(label, {})
            if state.get("images_done", 0) >= len(samples):
                continue
            mode = dict(mode="single" if kind in ONE_PASS else kind, stride=stride, batch_size=args.batch_size)
            how = SegmentSettings(**{k: v for k, v in settings.items() if k in fields}, **mode)
            model = backbone if kind in STUDENT else base
            evaluate_mode(model, samples, text, how, state, save, workers, args.save_every, desc=label)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; the finished images are saved in {out} and a rerun resumes from there."
        ) from None

    results = {label: record["modes"][label] for label, _, _ in modes}
    print(f"\n{'mode':<12} {'mIoU':>6} {'s/image':>9} {'images':>7}")
    for label, r in results.items():
        print(f"{label:<12} {100 * r['miou']:6.2f} {r['seconds_per_image']:9.3f} {r['images_done']:>7}")
    save()
    print(f"saved {display_name(out)}")
    if len(results) > 1:
        plot = out.with_suffix(".png")
        title = f"{spec.title}, {args.backbone}" + (" + student" if args.checkpoint else "")
        speed_accuracy_plot(results, plot, f"{title}, {len(samples)} images")
        print(f"saved {display_name(plot)}")


def main(argv=None):
    return main_guard(_run, argv)


if __name__ == "__main__":
    main()
