"""Zero-shot, open-vocabulary segmentation of any image (SPAR, CVPR 2026: how the distilled single-pass student is
used, Fig. 1; the segmentation half of (E4)).

Dense features F (B, h, w, C) come either from ONE pass of the backbone over the whole image at any H x W (mode
`single`, (E3): the pre-trained model or a distilled SPAR student) or from the sliding-window teacher (mode
`slide`, (E1)-(E2)).  The image may first be resized keeping its ratio (the protocol's short side 672).  Each class
is described by text:

    t_q = normalize( mean_{80 templates} normalize( text(template.format(query_q)) ) )       one per query q
    (E4)  logits_q(i) = < F(i) / ||F(i)||, t_q >                                           cosine, patch grid

then the logits are upsampled bilinearly to the original image size, scaled by `logit_scale` (bias 0),
soft-maxed over all queries, max-reduced over each class's synonyms; optionally classes covering too small a share
of the image are dropped (`area_thd`, the authors' OpenCLIP VOC21 setting); arg-maxed; pixels whose best
probability is below `prob_thd` become class 0.

Two protocols for the resizes around the model (`protocol=`):
  paper    the authors' code: the image is resized bilinearly WITHOUT antialias (OpenCV INTER_LINEAR), and the
           (Q, h, w) cosine map is resized ONCE, bilinearly, from the model's grid (padding included) straight to
           the label size -- a ceil-grid map is stretched by < 1 patch, a floor-grid (OpenCLIP) one over the
           unseen < p px strip;
  aligned  ours: the image is shrunk with antialias, and the cosine map is upsampled x p, cropped to the pixels
           the grid really covers (or edge-extended over a floor grid's unseen strip), then resized.
Modes: `single` one pass (E3); `slide` the teacher (E1)-(E2), features averaged where windows overlap, then
cosine; `slidelogit` the teacher with cosine logits computed per window and averaged where windows overlap.
Precision: fp32 unless `amp=True` (bf16/fp16 autocast on GPU); the authors evaluate in fp32.

* `read_class_file`, `parse_classes`   -- class lists; comma-separated synonyms are separate queries of one class;
* `text_embeddings`                    -- the t_q above, cached in memory and on disk (atomic writes);
* `dense_features`, `query_logits`, `upsample_logits`, `segment` -- image -> label map (and optionally logits);
* CLI: `python segment.py IMAGE --classes "road, car, person, sky" --out seg.png` writes the colour mask
  (a palette PNG whose pixel values are the class indices) and `seg_overlay.png` (overlay + legend).

API:
    backbone = load_backbone("siglip2-b16", checkpoint="run/student.pt")
    text = text_embeddings(backbone, parse_classes("road; car, truck; sky"))
    seg = segment(backbone, load_image("street.jpg"), text, "single", short_side=672, return_logits=True)
    seg.labels  # (1, H, W) class indices at the image's size;  seg.logits  # (1, K, H, W)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from files import (
    DeviceError,
    ImageError,
    WriteError,
    atomic_write,
    check_writable,
    display_name,
    load_image,
    resolve_device,
    save_torch,
)
from student import Backbone, BackboneError, add_backbone_args, autocast, load_backbone, synchronize
from teacher import Teacher, TeacherError

MODES = ("single", "slide", "slidelogit")
PROTOCOLS = ("paper", "aligned")

HERE = Path(__file__).resolve().parent
DEFAULT_TEMPLATES = HERE / "data" / "imagenet_templates.txt"
CACHE_ENV = "SPAR_TEXT_CACHE"  # directory for cached text embeddings; "none" disables the disk cache


class SegmentError(ValueError):
    """Bad input for segmentation (class list, image, mode). The message is one sentence."""


# ----------------------------------------------------------------------------------------------------------------
# Class lists and prompt templates
# ----------------------------------------------------------------------------------------------------------------


def parse_class_lines(lines: list[str]) -> list[list[str]]:
    """One class per line, comma-separated synonyms: ["sky, wall", "cat"] -> [["sky", "wall"], ["cat"]]."""
    classes = []
    for line in lines:
        names = [n.strip() for n in line.split(",") if n.strip()]
        if names:
            classes.append(names)
    if not classes:
        raise SegmentError("the class list is empty; give at least one class name.")
    return classes


def read_class_file(path: str | os.PathLike) -> list[list[str]]:
    """A class file as in the paper's code (data/classes/*.txt): one class per line, synonyms comma-separated."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SegmentError(f"cannot read class file '{path}' ({exc.strerror or exc}).") from exc
    return parse_class_lines(text.splitlines())


def parse_classes(text: str) -> list[list[str]]:
    """The --classes argument: "road, car, sky" is three classes; with ';' the classes are separated by ';' and
    commas give synonyms, like the lines of a class file: "road; car, truck; sky" (car and truck -> class 1)."""
    if ";" in text:
        return parse_class_lines(text.split(";"))
    return parse_class_lines([n for n in text.split(",")])


def check_duplicates(classes: list[list[str]]):
    """A name given for two classes makes one of them always empty (a pixel's max goes to one): refuse it."""
    first = {}
    for k, syns in enumerate(classes):
        for name in syns:
            key = " ".join(name.lower().split())
            if first.setdefault(key, k) != k:
                raise SegmentError(
                    f"'{name}' is given for two classes ({first[key] + 1} and {k + 1}); one of them "
                    f"could never win a pixel, so remove the duplicate."
                )


def read_templates(path: str | os.PathLike = DEFAULT_TEMPLATES) -> list[str]:
    """Prompt templates, one per line, `{}` standing for the class name (the paper uses the 80 ImageNet ones)."""
    try:
        lines = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    except OSError as exc:
        raise SegmentError(f"cannot read template file '{path}' ({exc.strerror or exc}).") from exc
    if not lines or any("{}" not in t for t in lines):
        raise SegmentError(f"template file '{path}' must hold one template per line, each with '{{}}' for the name.")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Text embeddings t_q, cached
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ClassText:
    """The text side of (E4) for a class list."""

    names: list[str]  # display name of each class (its first synonym), K entries
    queries: list[str]  # every synonym, Q >= K entries, in class order
    query_class: torch.Tensor  # (Q,) long: the class of each query
    embeddings: torch.Tensor  # (Q, C) float32, L2-normalised

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to(self, device) -> "ClassText":
        return ClassText(self.names, self.queries, self.query_class.to(device), self.embeddings.to(device))


_MEMORY_CACHE: dict[str, torch.Tensor] = {}


def default_cache_dir() -> Path | None:
    """$SPAR_TEXT_CACHE, else $XDG_CACHE_HOME/spar/text, else ~/.cache/spar/text; None if the env var is 'none'."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return None if env.lower() == "none" else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spar" / "text"


def text_weights_fingerprint(backbone: Backbone) -> str:
    """A cheap identity of the TEXT tower's weights (everything outside `model.visual`).

    A distilled checkpoint only replaces the image tower, so it shares the cache with its base model, while
    random weights (`--pretrained none`) and real weights never do.  Up to 256 evenly spaced values of each
    tensor are hashed: one device->host copy, milliseconds even for SigLIP2's large text tower.
    """
    names, samples = [], []
    for name, p in backbone.model.named_parameters():
        if name.startswith("visual."):
            continue
        flat = p.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // 256)][:256].float())
        names.append(f"{name}:{tuple(p.shape)}")
    h = hashlib.sha256("|".join(names).encode())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_key(backbone: Backbone, queries: list[str], templates: list[str]) -> str:
    blob = json.dumps(
        {
            "backbone": backbone.name,
            "weights": text_weights_fingerprint(backbone),
            "precision": "fp32",
            "queries": queries,
            "templates": templates,
        },
        ensure_ascii=False,
    )
    return f"{backbone.name}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


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
    queries + templates: in memory, and on disk in `cache_dir` (True -> `default_cache_dir()`, False/None -> no
    disk cache).  Raises BackboneError when the backbone's tokenizer is unavailable (SigLIP2 offline)."""
    templates = list(templates) if templates is not None else read_templates()
    if not classes or not all(classes):
        raise SegmentError("the class list is empty; give at least one class name.")
    check_duplicates(classes)
    queries = [q for syns in classes for q in syns]
    query_class = torch.tensor([k for k, syns in enumerate(classes) for _ in syns], dtype=torch.long)
    key = _cache_key(backbone, queries, templates)
    if cache_dir is True:
        cache_dir = default_cache_dir()
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None

    emb = _MEMORY_CACHE.get(key)
    if emb is None and path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("queries") == queries and saved.get("templates") == templates:
                emb = saved["embeddings"]
        except Exception:  # a corrupt cache file is simply recomputed
            emb = None
    if emb is None:
        emb = embed_queries(backbone, queries, templates, progress=progress).cpu()
        if path is not None:
            try:
                save_torch(path, {"queries": queries, "templates": templates, "embeddings": emb})
            except WriteError as exc:
                print(f"warning: the text cache is not saved ({exc}); continuing.", file=sys.stderr)
    _MEMORY_CACHE[key] = emb
    return ClassText([syns[0] for syns in classes], queries, query_class, emb).to(backbone.device)


# ----------------------------------------------------------------------------------------------------------------
# Image -> label map
# ----------------------------------------------------------------------------------------------------------------


def resized_hw(H: int, W: int, short_side: int | None, long_side: int | None = None) -> tuple[int, int]:
    """Keep-ratio resize of the evaluation protocol: scale = min(short/min(H, W), long/max(H, W)).

    (short 672, long 2048) for VOC / Context / ADE; (1024, 2048) for Cityscapes, i.e. 2048 x 1024.  Without a
    short side the long side is only a cap (never enlarges); None or 0 for both keeps the size.
    """
    scales = [short_side / min(H, W)] if short_side else [1.0]
    if long_side:
        scales.append(long_side / max(H, W))
    s = min(scales)
    if s == 1.0:
        return H, W
    return max(1, int(H * s + 0.5)), max(1, int(W * s + 0.5))


def resize_image(image: torch.Tensor, hw: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, h', w') bilinear (align_corners=False); with `antialias`, anti-aliased when shrinking
    (protocol 'aligned'); without, OpenCV's INTER_LINEAR behaviour (protocol 'paper')."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    shrink = hw[0] < image.shape[-2] or hw[1] < image.shape[-1]
    return F.interpolate(image.float(), size=hw, mode="bilinear", align_corners=False, antialias=antialias and shrink)


def cosine(feats: torch.Tensor, text: ClassText) -> torch.Tensor:
    """(E4) cosine between L2-normalised features and each query, channels last: (..., C) -> (..., Q)."""
    # ASSIGNMENT 6 BEGIN: cosine logits between patch features and queries (E4)
    f = F.normalize(feats.float(), dim=-1)
    return f @ text.embeddings.to(f.device, f.dtype).T
    # ASSIGNMENT 6 END


def query_logits(feats: torch.Tensor, text: ClassText) -> torch.Tensor:
    """(E4) cosine between each L2-normalised patch feature and each query: (B, h, w, C) -> (B, Q, h, w)."""
    return cosine(feats, text).permute(0, 3, 1, 2)


def window_teacher(
    backbone: Backbone,
    mode: str,
    text: ClassText | None,
    stride: int = 24,
    batch_size: int | None = None,
    amp: bool = False,
    progress: bool = False,
) -> Teacher:
    """The teacher of a slide mode: `slide` stitches features; `slidelogit` stitches per-window cosine logits."""
    head = (lambda f: cosine(f, text)) if mode == "slidelogit" else None
    return Teacher(
        backbone,
        stride=stride,
        batch_size=batch_size,
        precision="auto" if amp else "fp32",
        head=head,
        progress=progress,
    )


def dense_features(
    backbone: Backbone,
    x: torch.Tensor,
    mode: str = "single",
    stride: int = 24,
    batch_size: int | None = None,
    teacher=None,
    amp: bool = False,
) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> float32 features (B, h, w, C) on the backbone's grid (`Backbone.grid_size`).

    single: (E3), one pass at the image's resolution.   slide: (E1)-(E2), the teacher at `stride`.
    fp32 unless `amp` (then bf16/fp16 autocast on GPU; a given `teacher` keeps its own precision).
    """
    if mode == "single":
        with torch.inference_mode(), autocast(x.device, "auto" if amp else "fp32"):
            return backbone.dense(x).float()
    if mode == "slide":
        if teacher is None:
            teacher = window_teacher(backbone, mode, None, stride, batch_size, amp)
        return teacher(x).float()
    raise SegmentError(f"unknown mode '{mode}'; use 'single' or 'slide' (slidelogit gives logits, see segment).")


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
    mode: str = "single",
    stride: int = 24,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    short_side: int | None = None,
    long_side: int | None = None,
    out_hw: tuple[int, int] | None = None,
    batch_size: int | None = None,
    teacher=None,
    return_logits: bool = False,
    area_thd: float = 0.0,
    protocol: str = "paper",
    amp: bool = False,
) -> Segmentation:
    """Label map of RGB images in [0, 1], (B, 3, H0, W0) -> Segmentation(labels (B, *out_hw)).

    The image is resized keeping its ratio (`short_side` / `long_side`, see `resized_hw`; None keeps the size),
    run through `mode` ('single', or 'slide' / 'slidelogit' at `stride`; a prepared `teacher` may be passed, see
    `window_teacher`), and the logits come back at `out_hw` (default: H0 x W0) by `protocol` ('paper' or
    'aligned', see `upsample_logits`).  fp32 unless `amp`.  Everything stays on the backbone's device.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise SegmentError(f"expected an image batch of shape (B, 3, H, W), got {tuple(image.shape)}.")
    if mode not in MODES:
        raise SegmentError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}.")
    if protocol not in PROTOCOLS:
        raise SegmentError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}.")
    H0, W0 = image.shape[-2:]
    hw = resized_hw(H0, W0, short_side, long_side)
    if min(H0, W0, *hw) < backbone.patch_size:
        raise SegmentError(
            f"the image is {W0}x{H0} px"
            + (f", resized to {hw[1]}x{hw[0]}," if hw != (H0, W0) else "")
            + f" smaller than one {backbone.patch_size} px patch on a side; there is nothing to "
            f"segment."
        )
    out_hw = tuple(out_hw) if out_hw is not None else (H0, W0)
    device = backbone.device
    if mode == "slidelogit" and teacher is None:
        teacher = window_teacher(backbone, mode, text, stride, batch_size, amp)
    elif mode == "slidelogit" and getattr(teacher, "head", None) is None:
        raise SegmentError("mode 'slidelogit' needs a teacher with a per-window cosine head (see window_teacher).")
    synchronize(device)
    t0 = time.perf_counter()
    x = resize_image(image.to(device, non_blocking=True), hw, antialias=protocol == "aligned")
    x = backbone.normalize(x)
    with torch.inference_mode():
        if mode == "slidelogit":  # (E4) per window, stitched
            cos = teacher(x).float().permute(0, 3, 1, 2)  # (B, Q, h, w)
        else:  # (E4) on the stitched map
            cos = query_logits(dense_features(backbone, x, mode, stride, batch_size, teacher, amp), text)
        cos = upsample_logits(cos, backbone.patch_size, x.shape[-2:], out_hw, protocol)  # (B, Q, H, W)
        scaled = logit_scale * cos  # + bias 0
        probs = max_over_synonyms(scaled.softmax(dim=1), text)  # (B, K, H, W)
        if area_thd > 0:
            probs = drop_small_classes(probs, area_thd)
        best, labels = probs.max(dim=1)  # (B, H, W)
        if prob_thd > 0:
            labels[best < prob_thd] = 0
        logits = max_over_synonyms(scaled, text) if return_logits else None
    synchronize(device)
    return Segmentation(labels, logits, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours: the PASCAL VOC colour map from its second entry on (no black class)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, rgb = k + 1, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        out[k] = rgb
    return out


def save_mask(labels: np.ndarray, num_classes: int, path: str | os.PathLike):
    """Colour-coded mask at the image's size: a palette PNG whose pixel values are the class indices."""
    from PIL import Image

    colours = palette(num_classes)
    if num_classes <= 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(colours.reshape(-1).tolist())
    else:  # more classes than a palette holds: plain RGB
        im = Image.fromarray(colours[labels])
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def save_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    path: str | os.PathLike,
    title: str = "",
    alpha: float = 0.5,
    max_legend: int = 30,
):
    """Image | overlay side by side and a legend of the classes present, largest share first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = palette(len(names)).astype(np.float32) / 255
    overlay = (1 - alpha) * image + alpha * colours[labels]
    shares = np.bincount(labels.reshape(-1), minlength=len(names)) / labels.size
    order = [k for k in np.argsort(-shares, kind="stable") if shares[k] > 0][:max_legend]
    H, W = labels.shape
    panel_h, legend_w = 4.0, 2.4  # inches
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(2 * panel_h * W / H + legend_w, panel_h + 0.6),
        gridspec_kw={"width_ratios": [W / H, W / H, legend_w / panel_h]},
    )
    for ax, pic, sub in zip(axes, (image, overlay), ("image", "segmentation")):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(sub, fontsize=10)
        ax.axis("off")
    handles = [Patch(facecolor=colours[k], edgecolor="k", label=f"{names[k]}  {100 * shares[k]:.1f}%") for k in order]
    axes[2].axis("off")
    axes[2].legend(
        handles=handles, loc="center left", fontsize=8, frameon=False, title="class  pixel share", title_fontsize=8
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def overlay_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "_overlay.png")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Open-vocabulary segmentation of one image (SPAR, E4): writes a colour mask (palette PNG, "
        "pixel value = class index), an overlay with a legend, and prints per-class pixel shares.",
        epilog='example: python segment.py assets/rocket.jpg --classes "sky; smoke, cloud; rocket; tower; sea" '
        "--backbone siglip2-b16 --checkpoint run/student.pt --out rocket_seg.png",
    )
    p.add_argument("image", help="image file (any size and aspect ratio)")
    p.add_argument(
        "--classes",
        help='comma-separated class names, e.g. "road, car, person, sky"; with ";" the '
        'classes are ";"-separated and commas give synonyms: "road; car, truck; sky"',
    )
    p.add_argument(
        "--class-file", help="class file, one class per line, synonyms comma-separated (e.g. data/classes/voc21.txt)"
    )
    add_backbone_args(p, default="siglip2-b16")
    p.add_argument(
        "--checkpoint",
        help="student.pt from distill.py (single mode; the slide teacher always uses the pre-trained weights)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="single",
        help="single: one pass over the whole image (E3); slide: the sliding-window teacher (E1-E2), "
        "features averaged over windows; slidelogit: the teacher with cosine logits averaged",
    )
    p.add_argument(
        "--stride", type=int, default=24, help="teacher stride in px, 1..K, for the slide modes (default 24)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="teacher windows per forward (default: auto)")
    p.add_argument(
        "--prob-thd",
        type=float,
        default=0.0,
        help="pixels whose best probability is below this become class 0 (default 0: off)",
    )
    p.add_argument(
        "--area-thd",
        type=float,
        default=0.0,
        help="drop classes whose share of the argmax map is at most this (default 0: off)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="aligned",
        help="aligned (default here): antialiased shrinking, logits cropped to the pixels the grid "
        "covers; paper: the authors' resizes, as evaluate.py uses",
    )
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast on GPU (default: fp32, as the authors)")
    p.add_argument("--logit-scale", type=float, default=40.0, help="softmax temperature (paper: 40; VOC21 65)")
    p.add_argument(
        "--short-side",
        type=int,
        default=672,
        help="resize so the short side is this (paper: 672); 0 keeps the image's size (up to --long-side)",
    )
    p.add_argument("--long-side", type=int, default=2048, help="... but the long side at most this (0: no cap)")
    p.add_argument("--templates", default=str(DEFAULT_TEMPLATES), help="prompt templates, one per line with {}")
    p.add_argument(
        "--text-cache",
        default=None,
        help=f"folder for cached text embeddings ('none' to disable; default ${CACHE_ENV} or ~/.cache/spar/text)",
    )
    p.add_argument("--out", default="seg.png", help="mask PNG; the overlay goes to <out stem>_overlay.png")
    return p


def check_out(out: Path):
    """Refuse an output the mask cannot be written to BEFORE any work: not .png, or an unwritable place."""
    if out.suffix.lower() != ".png":
        raise SegmentError(
            f"--out '{display_name(out)}' must end in .png: the mask is a palette PNG whose pixel "
            f"values are the class indices (a JPEG would blur them)."
        )
    check_writable(out)
    check_writable(overlay_path(out))


def check_args(args):
    """Numbers that would give a silently wrong or crashing run: one sentence each, before any work."""
    for flag, value in (("--short-side", args.short_side), ("--long-side", args.long_side)):
        if value < 0:
            raise SegmentError(f"{flag} must be 0 (off) or a size in px, got {value}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise SegmentError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.stride <= 0:
        raise SegmentError(f"--stride must be positive, got {args.stride}.")
    for flag, value in (("--prob-thd", args.prob_thd), ("--area-thd", args.area_thd)):
        if not 0 <= value <= 1:
            raise SegmentError(f"{flag} must be between 0 and 1, got {value}.")


def cache_dir_arg(value: str | None):
    if value is None:
        return True
    return None if value.lower() == "none" else value


def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    try:
        check_args(args)
        check_out(out)
        device = resolve_device(args.device)
        if args.classes and args.class_file:
            raise SegmentError("give either --classes or --class-file, not both.")
        if args.class_file:
            classes = read_class_file(args.class_file)
        elif args.classes is not None:
            classes = parse_classes(args.classes)
        else:
            raise SegmentError('no classes given; pass --classes "a, b, c" or --class-file FILE.')
        check_duplicates(classes)
        templates = read_templates(args.templates)
        image = load_image(args.image)  # (1, 3, H, W) in [0, 1]
        checkpoint = args.checkpoint if args.mode == "single" else None
        if args.checkpoint and args.mode != "single":
            print(
                "note: --checkpoint is ignored in slide mode (the teacher uses the pre-trained weights).",
                file=sys.stderr,
            )
        backbone = load_backbone(args.backbone, args.pretrained, device, checkpoint=checkpoint)
        if args.mode != "single" and not 0 < args.stride <= backbone.window:
            raise SegmentError(f"--stride must be between 1 and the {backbone.window} px window, got {args.stride}.")
        run_hw = resized_hw(*image.shape[-2:], args.short_side or None, args.long_side or None)
        if min(run_hw) < backbone.patch_size:
            raise SegmentError(
                f"--short-side {args.short_side} / --long-side {args.long_side} would run the image at "
                f"{run_hw[1]}x{run_hw[0]} px, smaller than one {backbone.patch_size} px patch; use "
                f"a larger size (paper: 672) or 0 to keep the image's size."
            )
        t_loaded = time.perf_counter()
        text = text_embeddings(backbone, classes, templates, cache_dir_arg(args.text_cache), progress=True)
        t_text = time.perf_counter()
        seg = segment(
            backbone,
            image,
            text,
            args.mode,
            args.stride,
            args.logit_scale,
            args.prob_thd,
            args.short_side or None,
            args.long_side or None,
            batch_size=args.batch_size,
            area_thd=args.area_thd,
            protocol=args.protocol,
            amp=args.amp,
        )
    except (SegmentError, BackboneError, ImageError, DeviceError, TeacherError, WriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

    labels = seg.labels[0].cpu().numpy()  # the one host copy
    H, W = labels.shape
    name = display_name(args.image)  # printable even if not UTF-8
    how = f"{args.mode}" + (f", stride {args.stride}" if args.mode != "single" else "")
    title = f"{Path(name).name} - {backbone.name}" + (" + student" if checkpoint else "") + f" ({how})"
    try:
        save_mask(labels, text.num_classes, out)
        save_overlay(image[0].permute(1, 2, 0).numpy(), labels, text.names, overlay_path(out), title)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

    run_h, run_w = resized_hw(H, W, args.short_side or None, args.long_side or None)
    print(
        f"{name}: {W}x{H} px (run at {run_w}x{run_h}), backbone {backbone.name}"
        + (f" + {display_name(checkpoint)}" if checkpoint else "")
        + f", mode {how}, protocol {args.protocol}, "
        + f"{'amp' if args.amp else 'fp32'}, {text.num_classes} classes"
    )
    shares = np.bincount(labels.reshape(-1), minlength=text.num_classes) / labels.size
    width = max(len(n) for n in text.names)
    for k in np.argsort(-shares, kind="stable"):
        print(f"  {text.names[k]:<{width}}  {100 * shares[k]:6.2f} %")
    print(
        f"segmentation {seg.seconds:.3f} s (model load {t_loaded - t_start:.2f} s, text {t_text - t_loaded:.2f} s, "
        f"total {time.perf_counter() - t_start:.2f} s)"
    )
    print(
        f"wrote {display_name(out)} (mask, pixel value = class index) and {display_name(overlay_path(out))} "
        f"(overlay + legend)"
    )


if __name__ == "__main__":
    main()
