"""Everything that draws or writes a picture (not a part of the paper): segment.py's colour mask and overlay, and
the speed-accuracy plot in the style of Fig. 1 that evaluate.py and miniature.py draw.

* `save_mask`     -- a palette PNG whose pixel values are the class indices, coloured by the VOC colour map, or by
                     name when the classes are named by colours (`class_colours`: "red, green, blue, yellow");
* `save_overlay`  -- image | overlay side by side, and a legend of the classes present, largest share first, that
                     says which palette it is;
* `speed_accuracy_plot` -- seconds per image (log x) against mIoU, one labelled point per mode;
* `pca_rgb`       -- the first three principal components of dense features as RGB, one fit shared by all maps.

The mask and the overlay are written atomically (`files.atomic_write`); matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import voc_palette
from cli import UserError, display_name
from files import atomic_write, check_writable


def class_colours(n: int, names: list[str] | None = None) -> np.ndarray:
    """(n, 3) uint8 colours of n classes: the PASCAL VOC colour map from its second entry on (no black class); when
    at least half the `names` are colour names (CSS: red, green, dark blue, ...), each of those in its colour and
    the other classes (e.g. background) in greys, so that class "red" is never drawn green."""
    if not by_name(names or []):
        return voc_palette(n + 1)[1:]
    greys = iter(np.linspace(96, 192, max(1, n)).astype(np.uint8))
    named = [named_colour(name) for name in names]
    return np.array([rgb if rgb is not None else (next(greys),) * 3 for rgb in named], np.uint8)


def named_colour(name: str) -> tuple[int, int, int] | None:
    """The RGB of a colour name ("red", "Dark Blue", "light-green": CSS, as PIL knows them); None for other words."""
    from PIL import ImageColor

    key = name.strip().lower().replace(" ", "").replace("-", "")
    return ImageColor.getrgb(key)[:3] if key.isalpha() and key in ImageColor.colormap else None


def by_name(names: list[str]) -> bool:
    """Whether `names` are coloured by name: at least half of them are colour names (one "orange" among VOC's
    twenty classes is not)."""
    return bool(names) and 2 * sum(named_colour(n) is not None for n in names) >= len(names)


def palette_note(names: list[str]) -> str:
    """What the colours of a mask mean, for its legend."""
    return "colours: by class name, others grey" if by_name(names) else "colours: PASCAL VOC colour map"


def class_shares(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class's share of the pixels, and the classes ordered largest share first (ties: in class order)."""
    shares = np.bincount(labels.reshape(-1), minlength=num_classes) / labels.size
    return shares, np.argsort(-shares, kind="stable")


def overlay_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "_overlay.png")


def check_mask_path(out: Path):
    """Refuse an output the mask cannot be written to BEFORE any work: not .png, or an unwritable place."""
    if out.suffix.lower() != ".png":
        raise UserError(
            f"--out '{display_name(out)}' must end in .png: the mask is a palette PNG whose pixel "
            f"values are the class indices (a JPEG would blur them)."
        )
    check_writable(out)
    check_writable(overlay_path(out))


def save_mask(labels: np.ndarray, num_classes: int, path: str | os.PathLike, names: list[str] | None = None):
    """Colour-coded mask at the image's size: a palette PNG whose pixel values are the class indices (colours:
    `class_colours` of the class `names`)."""
    from PIL import Image

    colours = class_colours(num_classes, names)
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

    colours = class_colours(len(names), names).astype(np.float32) / 255
    overlay = (1 - alpha) * image + alpha * colours[labels]
    shares, order = class_shares(labels, len(names))
    order = [k for k in order if shares[k] > 0][:max_legend]
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
        handles=handles,
        loc="center left",
        fontsize=8,
        frameon=False,
        title=f"class  pixel share\n({palette_note(names)})",
        title_fontsize=8,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def speed_accuracy_plot(results: dict, path: Path, title: str):
    """Fig. 1 style: seconds per image (log x) against mIoU, one labelled point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts = [
        (m, r["seconds_per_image"], 100 * r["miou"])
        for m, r in results.items()
        if r.get("seconds_per_image") and r.get("miou") is not None and not math.isnan(r["miou"])
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode, sec, val in pts:
        marker = "*" if mode in ("single",) else ("o" if mode.startswith("slide") else "s")
        ax.scatter(sec, val, s=120 if marker == "*" else 50, marker=marker, zorder=3)
        ax.annotate(mode, (sec, val), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if len(pts) > 1:
        slides = sorted((s, v) for m, s, v in pts if m.startswith("slide"))
        if len(slides) > 1:
            ax.plot(*zip(*slides), "--", color="grey", lw=1, zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, 5 s ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds per image (log scale)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.3, y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class PCAView:
    """`pca_rgb`'s result: one (h, w, 3) float RGB image in [0, 1] per feature map, and the ONE fit they share."""

    images: list
    mean: np.ndarray  # (C,)
    components: np.ndarray  # (3, C), unit rows, each signed so its largest-magnitude entry is positive
    low: np.ndarray  # (3,) the 1st percentile of each component's scores over all maps
    high: np.ndarray  # (3,) the 99th


def pca_rgb(feature_maps) -> PCAView:
    """The first three principal components of dense features as RGB, fitted JOINTLY on all the maps given.

    feature_maps: (h, w, C) arrays or tensors (sizes may differ, C may not).  The rows of every map are pooled,
    centred on their common mean and decomposed once; each component's sign is fixed (largest-magnitude entry
    positive) and its scores are mapped by the common 1st..99th percentiles to [0, 1], so the same feature gets the
    same colour in every panel and in every run."""
    maps = [np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f, dtype=np.float64) for f in feature_maps]
    if not maps or any(m.ndim != 3 for m in maps) or len({m.shape[-1] for m in maps}) != 1:
        raise UserError("pca_rgb needs one or more (h, w, C) feature maps with the same C.")
    rows = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps])
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    comps = np.zeros((3, rows.shape[1]))
    comps[: min(3, len(vt))] = vt[:3]
    for c in comps:  # the sign convention: the largest-magnitude entry is positive
        c *= 1.0 if c[np.argmax(np.abs(c))] >= 0 else -1.0
    scores = (rows - mean) @ comps.T
    low, high = np.percentile(scores, 1, axis=0), np.percentile(scores, 99, axis=0)
    span = np.where(high > low, high - low, 1.0)
    images = [np.clip(((m - mean) @ comps.T - low) / span, 0, 1).astype(np.float32) for m in maps]
    return PCAView(images, mean, comps, low, high)
