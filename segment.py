"""Zero-shot, open-vocabulary segmentation of any image (SPAR, CVPR 2026: how the distilled single-pass student is
used, Sec. 4 and Fig. 1).

Dense features F (B, h, w, C) come either from ONE pass of the backbone over the whole image at any H x W (mode
`single`, (E3): the pre-trained model or a distilled SPAR student) or from the sliding-window teacher (mode
`slide`, (E1)-(E2)).  The image may first be resized keeping its ratio (the protocol's short side 672).  Each class
is described by text:

    t_q = normalize( mean_{80 templates} normalize( text(template.format(query_q)) ) )       one per query q
    (E5)  logits_q(i) = < F(i) / ||F(i)||, t_q >                                           cosine, patch grid

then the logits are upsampled bilinearly to the original image size, scaled by `logit_scale` (bias 0),
soft-maxed over all queries, max-reduced over each class's synonyms; optionally classes covering too small a share
of the image are dropped (`area_thd`, the authors' OpenCLIP VOC21 setting); arg-maxed; pixels whose best
probability is below `prob_thd` become class 0.

Protocols for the resizes around the model (`protocol=`, see `upsample_logits`): `paper`, the authors' code, and
`aligned`, ours.  Modes: `single` one pass (E3); `slide` the teacher (E1)-(E2), features averaged where windows
overlap, then cosine; `slidelogit` the teacher with per-window cosine logits averaged.  fp32 unless `amp=True`.

    text = text_embeddings(backbone, parse_classes("road; car, truck; sky"))  # cached in memory and on disk
    seg = segment(backbone, load_image("street.jpg"), text, SegmentSettings(short_side=672), return_logits=True)
    seg.labels  # (1, H, W) class indices at the image's size;  seg.logits  # (1, K, H, W)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import torch
import torch.nn.functional as F

import cli
import outputs
import refine
from benchmarks import (  # noqa: F401 (API)
    DEFAULT_TEMPLATES,
    check_duplicates,
    class_list,
    parse_classes,
    read_templates,
    resize_image,
    resized_hw,
)
from cli import UserError, autocast, flag, synchronize
from files import load_image
from student import BACKBONES, Backbone, load_backbone
from teacher import Teacher
from textcache import CACHE_ENV, cache_dir_arg, cached

MODES = ("single", "slide", "slidelogit")
PROTOCOLS = ("paper", "aligned")


class SegmentError(UserError):
    """Bad input for segmentation (class list, image, mode). The message is one sentence."""


@dataclass
class ClassText:
    """The text side of (E5) for a class list."""

    names: list[str]  # display name of each class (its first synonym), K entries
    queries: list[str]  # every synonym, Q >= K entries, in class order
    query_class: torch.Tensor  # (Q,) long: the class of each query
    embeddings: torch.Tensor  # (Q, C) float32, L2-normalised

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to(self, device) -> "ClassText":
        return ClassText(self.names, self.queries, self.query_class.to(device), self.embeddings.to(device))


@torch.inference_mode()
def embed_queries(
    backbone: Backbone, queries: list[str], templates: list[str], batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """t_q for each query: normalise each template embedding, average over templates, normalise. -> (Q, C)."""
    from tqdm import tqdm

    prompts = [t.format(q) for q in queries for t in templates]  # Q * T, query-major
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=f"text: {len(prompts)} prompts", unit="batch", disable=not progress, leave=False):
        out.append(backbone.encode_text(prompts[i : i + batch_size], batch_size=batch_size).float())  # fp32, cached
    emb = F.normalize(torch.cat(out), dim=-1).view(len(queries), len(templates), -1)  # (Q, T, C)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (Q, C)


def text_embeddings(
    backbone: Backbone,
    classes: list[list[str]],
    templates: list[str] | None = None,
    cache_dir: str | os.PathLike | None | bool = True,
    progress: bool = False,
) -> ClassText:
    """Text embeddings of a class list (synonyms = separate queries), cached per backbone + text weights +
    queries + templates: in memory, and on disk in `cache_dir` (True -> `textcache.default_cache_dir()`, False/None
    -> no disk cache).  Raises BackboneError when the backbone's tokenizer is unavailable (SigLIP2 offline)."""
    templates = list(templates) if templates is not None else read_templates()
    if not classes or not all(classes):
        raise SegmentError("the class list is empty; give at least one class name.")
    check_duplicates(classes)
    queries = [q for syns in classes for q in syns]
    query_class = torch.tensor([k for k, syns in enumerate(classes) for _ in syns], dtype=torch.long)
    emb = cached(
        backbone, queries, templates, cache_dir, lambda: embed_queries(backbone, queries, templates, progress=progress)
    )
    return ClassText([syns[0] for syns in classes], queries, query_class, emb).to(backbone.device)


def cosine(feats: torch.Tensor, text: ClassText) -> torch.Tensor:
    """(E5) cosine between L2-normalised features and each query, channels last: (..., C) -> (..., Q)."""
    # ASSIGNMENT 6 BEGIN: cosine logits between patch features and queries (E5)
    f = F.normalize(feats.float(), dim=-1)
    return f @ text.embeddings.to(f.device, f.dtype).T
    # ASSIGNMENT 6 END


def query_logits(feats: torch.Tensor, text: ClassText) -> torch.Tensor:
    """(E5) cosine between each L2-normalised patch feature and each query: (B, h, w, C) -> (B, Q, h, w)."""
    return cosine(feats, text).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class SegmentSettings(refine.RefineSettings):
    """How `segment` makes a label map.  The defaults are the API's; each field is also a flag of segment.py and
    evaluate.py (`add_flags`), which set their own defaults."""

    mode: str = flag(
        "single", "single (E3); slide: the teacher's features (E1-E2); slidelogit: its logits", choices=MODES
    )
    stride: int = flag(24, "teacher stride in px, 1..K, for the slide modes", (">=", 1))
    logit_scale: float = flag(40.0, "softmax temperature (paper: 40; VOC21 65, Context60 50), bias 0", "finite>0")
    prob_thd: float = flag(0.0, "pixels whose best probability is below this become class 0 (0: off)", "0..1")
    area_thd: float = flag(0.0, "drop classes with at most this share of the argmax map (0: off)", "0..1")
    short_side: int | None = flag(None, "resize keeping the ratio to this short side (0: keep the size)", (">=", 0))
    long_side: int | None = flag(None, "... but the long side at most this (0: no cap)", (">=", 0))
    protocol: str = flag("paper", "paper: the authors' resizes; aligned: ours (see upsample_logits)", choices=PROTOCOLS)
    amp: bool = flag(False, "bf16/fp16 autocast on GPU (default: fp32, as the authors)")
    batch_size: int | None = flag(None, "teacher windows per forward (default: auto)", (">=", 1))
    window: int | None = flag(None, cli.WINDOW_HELP, (">=", 1), metavar="K")

    def __post_init__(self):
        if self.mode not in MODES:
            raise SegmentError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}.")
        if self.protocol not in PROTOCOLS:
            raise SegmentError(f"unknown protocol '{self.protocol}'; use one of {', '.join(PROTOCOLS)}.")
        self.check_refine()  # --refine, --upsample (refine.py)
        cli.check_numbers([("logit_scale", self.logit_scale, "finite>0")], SegmentError)  # NaN: one class everywhere


def run_size(H: int, W: int, settings: SegmentSettings, patch: int) -> tuple[int, int]:
    """The size an H x W image runs at (`resized_hw`), refused when a side is smaller than one patch."""
    hw = resized_hw(H, W, settings.short_side, settings.long_side)
    if min(H, W, *hw) < patch:
        raise SegmentError(  # the image itself is too small, or its resize (a long side capped by --long-side)
            f"the image is {cli.hxw(H, W)} px"
            + (f", resized to {cli.hxw(*hw)}," if min(H, W) >= patch else "")
            + f" smaller than one {patch} px patch on a side; there is nothing to segment"
            + ("; raise --long-side (0: no cap) or keep its size with --short-side 0." if min(H, W) >= patch else ".")
        )
    return hw


def window_teacher(backbone: Backbone, settings: SegmentSettings, text: ClassText | None = None) -> Teacher:
    """The teacher of a slide mode at `settings.stride`: `slide` stitches features; `slidelogit` stitches
    per-window cosine logits (E5) with `text`."""
    head = (lambda f: cosine(f, text)) if settings.mode == "slidelogit" else None
    precision = "auto" if settings.amp else "fp32"
    return Teacher(backbone, settings.window, settings.stride, settings.batch_size, precision=precision, head=head)


def dense_features(backbone: Backbone, x: torch.Tensor, settings: SegmentSettings, teacher: Teacher | None = None):
    """Normalised (B, 3, H, W) -> float32 features (B, h, w, C) on the backbone's grid (`Backbone.grid_size`).

    single: (E3), one pass at the image's resolution.   slide: (E1)-(E2), the teacher at `settings.stride`.
    fp32 unless `settings.amp` (then bf16/fp16 autocast on GPU; a given `teacher` keeps its own precision).
    """
    if settings.mode == "single":
        with torch.inference_mode(), autocast(x.device, "auto" if settings.amp else "fp32"):
            return backbone.dense(x).float()
    if settings.mode == "slide":
        return (teacher or window_teacher(backbone, settings))(x).float()
    raise SegmentError("mode 'slidelogit' gives logits, not features (see segment).")


def upsample_logits(
    logits: torch.Tensor,
    patch: int,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int] | None = None,
    protocol: str = "paper",
) -> torch.Tensor:
    """Patch-grid logits (B, Q, h, w) of an H x W input -> pixel logits (B, Q, *out_hw), bilinear
    (align_corners=False); out_hw defaults to in_hw.

    paper:   ONE resize of the h x w grid straight to out_hw, as the authors do.  The grid covers (h*p, w*p), not
             H x W (ceil grid: zero-padded bottom/right; floor grid: the last < p rows/columns unseen), so every
             boundary moves by up to a patch.
    aligned: upsample to (h*p, w*p), keep exactly the H x W pixels (crop the padding; over a floor grid's unseen
             strip repeat the last row/column), and only then resize to out_hw.
    """
    if protocol not in PROTOCOLS:
        raise SegmentError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}.")
    H, W = in_hw
    out_hw = tuple(out_hw) if out_hw is not None else (H, W)
    if protocol == "paper":
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
    h, w = logits.shape[-2:]
    x = F.interpolate(logits, size=(h * patch, w * patch), mode="bilinear", align_corners=False)
    x = x[..., :H, :W]  # ceil grid: drop the padding
    if x.shape[-2:] != (H, W):  # floor grid: the unseen strip
        x = F.pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2]), mode="replicate")
    if out_hw != (H, W):
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    return x


def max_over_synonyms(scores: torch.Tensor, text: ClassText) -> torch.Tensor:
    """(B, Q, H, W) per query -> (B, K, H, W) per class, the max over each class's synonyms."""
    # ASSIGNMENT 6 BEGIN: the max over each class's synonyms (Sec. 4)
    if len(text.queries) == text.num_classes:  # no synonyms: identity
        return scores
    qc = text.query_class.to(scores.device)
    return torch.stack([scores[:, qc == k].amax(dim=1) for k in range(text.num_classes)], dim=1)
    # ASSIGNMENT 6 END


def drop_small_classes(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """The authors' area_thd: a = argmax map; n_k = #pixels with a = k for k = 1..K-1; classes with
    n_k <= area_thd * sum_k n_k get probability 0 (class 0 is never dropped).  (B, K, H, W) -> same."""
    B, K = probs.shape[:2]
    a = probs.argmax(dim=1).reshape(B, -1)  # (B, H*W)
    n = torch.zeros(B, K, device=probs.device).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float32))
    fg = n[:, 1:]  # (B, K-1)
    keep = torch.cat([torch.ones_like(fg[:, :1]), (fg > area_thd * fg.sum(1, keepdim=True)).float()], dim=1)
    return probs * keep[:, :, None, None].to(probs.dtype)


@dataclass
class Segmentation:
    labels: torch.Tensor  # (B, H, W) long, class indices (0 where below prob_thd)
    logits: torch.Tensor | None = None  # (B, K, H, W) logit_scale * cosine, max over synonyms (optional)
    seconds: float = 0.0  # wall time of the prediction (synchronised)


def segment(
    backbone: Backbone,
    image: torch.Tensor,
    text: ClassText,
    settings: SegmentSettings | None = None,
    teacher: Teacher | None = None,
    out_hw: tuple[int, int] | None = None,
    return_logits: bool = False,
) -> Segmentation:
    """Label map of RGB images in [0, 1], (B, 3, H0, W0) -> Segmentation(labels (B, *out_hw)).

    The image is resized keeping its ratio (`settings.short_side` / `long_side`), run through `settings.mode` (a
    prepared `teacher` may be passed, see `window_teacher`), and the logits come back at `out_hw` (default:
    H0 x W0) by `settings.protocol`.  Everything stays on the backbone's device.
    """
    s = settings or SegmentSettings()
    if image.dim() != 4 or image.shape[1] != 3:
        raise SegmentError(f"expected an image batch of shape (B, 3, H, W), got {tuple(image.shape)}.")
    cli.check_unit_images(image, "segment()")  # RGB in [0, 1]: a uint8 or 0..255 image is refused
    hw = run_size(*image.shape[-2:], s, backbone.patch_size)
    cli.check_memory(*hw, backbone.patch_size, backbone.dim, backbone.device, "segmenting at", len(image))
    out_hw = tuple(out_hw) if out_hw is not None else tuple(image.shape[-2:])
    if s.mode == "slidelogit" and teacher is None:
        teacher = window_teacher(backbone, s, text)
    elif s.mode == "slidelogit" and getattr(teacher, "head", None) is None:
        raise SegmentError("mode 'slidelogit' needs a teacher with a per-window cosine head (see window_teacher).")
    synchronize(backbone.device)
    t0 = time.perf_counter()
    rgb = resize_image(image.to(backbone.device, non_blocking=True), hw, antialias=s.protocol == "aligned")
    x = backbone.normalize(rgb)
    with torch.inference_mode():  # (E5) per window and stitched (slidelogit), or on the dense features
        feats = None if s.mode == "slidelogit" else dense_features(backbone, x, s, teacher)  # (B, h, w, C)
        cos = teacher(x).float().permute(0, 3, 1, 2) if feats is None else query_logits(feats, text)  # (B, Q, h, w)
        up = partial(upsample_logits, patch=backbone.patch_size, in_hw=x.shape[-2:], protocol=s.protocol)
        cos = refine.refined_logits(cos, feats, rgb, out_hw, s, up, partial(cosine, text=text), backbone.patch_size)
        scaled = s.logit_scale * cos  # + bias 0
        probs = max_over_synonyms(scaled.softmax(dim=1), text)  # (B, K, H, W)
        if s.area_thd > 0:
            probs = drop_small_classes(probs, s.area_thd)
        best, labels = probs.max(dim=1)  # (B, H, W)
        if s.prob_thd > 0:
            labels[best < s.prob_thd] = 0
        logits = max_over_synonyms(scaled, text) if return_logits else None
    synchronize(backbone.device)
    return Segmentation(labels, logits, time.perf_counter() - t0)


def check_stride(stride: int, backbone: Backbone, what: str = "--stride", window: int | None = None):
    """A teacher stride above the window K (default: the native one) leaves strips no window sees: refuse it early."""
    if not 0 < stride <= (K := window or backbone.window):
        raise SegmentError(f"{what} must be between 1 and the {K} px window, got {stride}.")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        description="Open-vocabulary segmentation of one image or a folder (SPAR, E5): writes a colour mask (palette "
        "PNG, pixel value = class index) and an overlay with a legend per image, and prints per-class pixel shares.",
        epilog='example: python segment.py assets/rocket.jpg --classes "sky; smoke, cloud; rocket; tower; sea" '
        "--backbone siglip2-b16 --checkpoint run/student.pt --out runs/rocket.png; a folder: DIR --out OUTDIR",
    )
    p.add_argument("image", help="image file (any size and aspect ratio), or a folder of them (--out: a folder)")
    p.add_argument("--classes", help='class names: "road, car, sky"; with ";" commas give synonyms: "road; car, truck"')
    p.add_argument("--class-file", help="one class per line, synonyms comma-separated (e.g. data/classes/voc21.txt)")
    cli.add_backbone_args(p, BACKBONES, default="siglip2-b16", naflex=True)
    p.add_argument("--checkpoint", help="student.pt from distill.py (single mode; the teacher is pre-trained)")
    cli.add_flags(p, SegmentSettings, protocol="aligned", short_side=672, long_side=2048)  # this CLI's defaults
    p.add_argument("--templates", default=str(DEFAULT_TEMPLATES), help="prompt templates, one per line with {}")
    p.add_argument("--text-cache", help=f"text-embedding cache folder ('none': off; default ${CACHE_ENV} or ~/.cache)")
    p.add_argument("--out", help="mask PNG (default runs/segment/<stem>.png; overlay <stem>_overlay.png) or a folder")
    p.add_argument("--save-features", action="store_true", help="also write <stem>.pt: fp16 (h, w, C) features")
    return p


def read_args(args, folder: bool) -> tuple[SegmentSettings, list[list[str]] | None, torch.device]:
    """The settings (the flags are named for its fields), class list (None: features only) and device, checked."""
    cli.check_flag_numbers(args, SegmentSettings)
    classes = class_list(args.classes, args.class_file) if outputs.check_outputs(args, folder) else None
    settings = SegmentSettings(**{f.name: getattr(args, f.name) for f in fields(SegmentSettings)})
    return settings, classes, cli.resolve_device(args.device)


def write_outputs(backbone, text, settings, path, outs: list[Path], title: str, image=None):
    """One image's files (`outputs.output_files`), atomically, in order -> its Segmentation (None: no `text`)."""
    image = load_image(str(path)) if image is None else image  # (1, 3, H, W) in [0, 1]
    hw = run_size(*image.shape[-2:], settings, backbone.patch_size)
    if outs[0].suffix == ".pt":  # the features of (E3) (or the teacher's), as segment computes them
        x = backbone.normalize(resize_image(image.to(backbone.device), hw, antialias=settings.protocol == "aligned"))
        feats = dense_features(backbone, x, settings)[0]  # (h, w, C)
        outputs.save_features(outs[0], feats, image.shape[-2:], hw, backbone, settings)
    seg = segment(backbone, image, text, settings) if text is not None else None
    if seg is not None:
        title = f"{Path(cli.display_name(path)).name} - {title}"  # printable even if not UTF-8
        outputs.save_pictures(image, seg.labels[0].cpu().numpy(), text.names, outs[-2:], title)  # the one host copy
    return seg


def _run(argv=None):
    args = build_parser().parse_args(argv)
    t_start, folder = time.perf_counter(), os.path.isdir(args.image)
    settings, classes, device = read_args(args, folder)
    templates = read_templates(args.templates) if classes else None
    single = args.mode == "single"
    checkpoint = args.checkpoint if single else None
    if args.checkpoint and not single:
        cli.log("note: --checkpoint is ignored in slide mode (the teacher uses the pre-trained weights).")
    outs = partial(outputs.output_files, features=args.save_features, masks=classes is not None)
    image = None if folder else load_image(args.image)  # (1, 3, H, W) in [0, 1]
    if folder:  # the images, the outputs and the settings record, before any work
        record = outputs.folder_record(args, settings, checkpoint, classes, templates)
        plan = outputs.plan_folder(args.image, args.out, outs, record)
        if not plan.pending:  # a rerun of a finished folder
            return
    backbone = load_backbone(args.backbone, args.pretrained, device, checkpoint=checkpoint)
    backbone.max_patches = args.naflex_patches  # NaFlex's patch budget (only `NaFlexBackbone` reads it)
    cli.note_random_weights(backbone.random_weights)
    if not single:
        check_stride(args.stride, backbone)
    hw = None if folder else run_size(*image.shape[-2:], settings, backbone.patch_size)  # before any work
    if hw:  # a size that can never fit is refused before the text tower runs
        cli.check_memory(*hw, backbone.patch_size, backbone.dim, device, "segmenting at")
    t_loaded = time.perf_counter()
    text = classes and text_embeddings(backbone, classes, templates, cache_dir_arg(args.text_cache), progress=True)
    t_text = time.perf_counter()
    how = f"{args.mode}" + ("" if single else f", stride {args.stride}")
    title = f"{backbone.name}" + (" + student" if checkpoint else "") + f" ({how})"
    if folder:
        return outputs.run_folder(plan, partial(write_outputs, backbone, text, settings, title=title))
    files = outs(args.out or outputs.default_mask(args.image))
    seg = write_outputs(backbone, text, settings, args.image, files, title, image)
    model = backbone.name + (f" + {cli.display_name(checkpoint)}" if checkpoint else "")
    setup = f"(run at {cli.hxw(*hw)}), backbone {model}, mode {how}"
    seconds = (t_loaded - t_start, t_text - t_loaded, time.perf_counter() - t_start)  # load, text, total
    outputs.print_report(cli.display_name(args.image), seg, text and text.names, setup, args, seconds, files)


def main(argv=None):
    return cli.main_guard(_run, argv, interrupted="interrupted; finished outputs are kept (rerun a folder to go on).")


if __name__ == "__main__":
    main()
