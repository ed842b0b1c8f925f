"""Zero-shot segmentation benchmarks (SPAR, CVPR 2026: the experiments' six benchmarks, and the speed-accuracy
trade-off of Fig. 1).

Six benchmarks, each with the paper's class names (data/classes/*.txt), logit scale and probability threshold:

    name        split, images                   labels after reading                    logit_scale  prob_thd
    voc21       VOC2012 val, 1449               0 background, 1..20; 255 ignore         65           0
    voc20       VOC2012 val, 1449               0 -> 255, 1..20 -> 0..19                40           0
    context60   VOC2010 val (Context), 5105     0 background, 1..59                     50           0.1
    context59   VOC2010 val (Context), 5105     0 -> 255, 1..59 -> 0..58                40           0
    cityscapes  gtFine val, 500                 trainIds 0..18, 255 (labelIds mapped)   40           0
    ade20k      ADEChallengeData2016 val, 2000  0 -> 255, 1..150 -> 0..149              40           0

Settings are looked up per (backbone, dataset) (`settings_for`): the authors use prob_thd 0.1 and area_thd 0.1
for OpenCLIP (clip-b16) on VOC21, the table above otherwise (area_thd off).

Protocol (`--protocol paper`, the default, is the authors' code): each image is resized keeping its ratio (short
side 672, long side at most 2048; Cityscapes 2048 x 1024) bilinearly without antialias, segmented with the text of
(E4) (`segment.segment`) in fp32 (`--amp` for bf16/fp16 autocast), and the cosine logits are resized ONCE from the
model's grid to the label's original size; `--protocol aligned` is our variant (see segment.py).  One confusion
matrix is accumulated over the whole split (ignore label 255); mIoU is the mean IoU over the classes whose union is
not empty.  Modes: `single` (one pass, (E3); the student with --checkpoint), `pretrained` (one pass with the
pre-trained weights even when --checkpoint is given), `slideN` (the pre-trained teacher, (E1)-(E2), at stride N,
features averaged where windows overlap, as SPAR's teacher) and `slidelogitN` (the same windows, cosine logits
averaged where they overlap, as the authors' sliding-window baseline intended).  With several modes a
speed-accuracy plot in the style of Fig. 1 is drawn.

    python evaluate.py --dataset cityscapes --root DATA --backbone siglip2-b16 --modes single,slide24
    python evaluate.py --dataset voc21 --make-synthetic /tmp/voc        # a tiny fake VOC folder to try things on
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from files import DeviceError, WriteError, check_writable, display_name, resolve_device, write_json
from segment import (
    HERE,
    PROTOCOLS,
    SegmentError,
    cache_dir_arg,
    read_class_file,
    read_templates,
    segment,
    text_embeddings,
    window_teacher,
)
from student import BackboneError, add_backbone_args, autocast, load_backbone
from teacher import TeacherError

IGNORE = 255


class DatasetError(RuntimeError):
    """A dataset folder is missing, mis-laid or holds an unreadable file. The message says what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# mIoU
# ----------------------------------------------------------------------------------------------------------------


def confusion(pred, label, num_classes: int, ignore_index: int = IGNORE) -> torch.Tensor:
    """(K, K) int64 confusion matrix, rows = ground truth, columns = prediction; pixels labelled `ignore_index`
    are skipped.  pred, label: integer tensors (or arrays) of the same shape, on any device (the result stays
    there)."""
    pred, label = torch.as_tensor(pred), torch.as_tensor(label, device=torch.as_tensor(pred).device)
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
    """(mean IoU, per-class IoU) from a confusion matrix.  IoU_k = TP / (TP + FP + FN); classes with an empty
    union (neither in the labels nor predicted) are NaN and left out of the mean (NaN if all are empty)."""
    # ASSIGNMENT 6 BEGIN: per-class IoU and their mean over classes present
    conf = torch.as_tensor(conf).double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).numpy()
    valid = ~np.isnan(iou)
    return (float(iou[valid].mean()) if valid.any() else float("nan")), iou
    # ASSIGNMENT 6 END


# ----------------------------------------------------------------------------------------------------------------
# Datasets: folder layouts and label conventions
# ----------------------------------------------------------------------------------------------------------------


def lut_identity(num_classes: int) -> np.ndarray:
    """Label look-up table: 0..K-1 kept, everything else (255 included) -> ignore."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[:num_classes] = np.arange(num_classes)
    return lut


def lut_reduce_zero(num_classes: int) -> np.ndarray:
    """0 (background / 'other') -> ignore, 1..K -> 0..K-1, the rest -> ignore (VOC20, Context59, ADE20K)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[1 : num_classes + 1] = np.arange(num_classes)
    return lut


# Cityscapes labelIds -> trainIds (cityscapesScripts, labels.py): the 19 evaluated classes, the rest ignored.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def lut_cityscapes_label_ids() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


@dataclass(frozen=True)
class Sample:
    image: str
    label: str
    lut: np.ndarray = field(repr=False, compare=False)  # raw label value -> evaluated class index / 255


def _existing(path: Path) -> Path:
    """The deepest existing folder at or above `path`."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _found(path: Path) -> str:
    """What exists at or above `path`: the deepest existing folder and a few of its entries."""
    p = _existing(path)
    if not p.is_dir():
        return f"'{p}' is a file"
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir())
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    return f"'{p}' contains: {shown or 'nothing'}"


def _base(root: Path, marker: str, subdirs: list[str], dataset: str, layout: str) -> Path:
    """The first of root/<sub> (sub in subdirs) that holds `marker`; else a DatasetError saying what was expected."""
    if not root.is_dir():
        raise DatasetError(f"{dataset}: --root '{root}' is not a folder ({_found(root)}); expected {layout}.")
    for sub in subdirs:
        if (root / sub / marker).exists():
            return root / sub
    # report the candidate that got furthest (ties: the full layout), e.g. ROOT/VOC2012 without ImageSets/
    expected = max(reversed([root / sub / marker for sub in subdirs]), key=lambda c: len(_existing(c).parts))
    raise DatasetError(
        f"{dataset}: expected '{expected}' (layout: {layout}) but it does not exist; {_found(expected)}."
    )


def _check_files(samples: list[Sample], dataset: str) -> list[Sample]:
    if not samples:
        raise DatasetError(f"{dataset}: the split lists no images.")
    missing = [p for s in samples for p in (s.image, s.label) if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} listed file(s) are missing, e.g. '{missing[0]}' ({_found(Path(missing[0]))})."
        )
    return samples


def voc_style_samples(root, dataset: str, year: str, label_dir: str, split_file: str, lut: np.ndarray):
    """VOCdevkit/<year>/{JPEGImages/<id>.jpg, <label_dir>/<id>.png, <split_file>}: one id per line."""
    layout = f"ROOT/VOCdevkit/{year}/{{JPEGImages, {label_dir}, {split_file}}}"
    base = _base(Path(root), split_file, ["", year, f"VOCdevkit/{year}"], dataset, layout)
    ids = [line.split()[0] for line in (base / split_file).read_text().splitlines() if line.strip()]
    return _check_files(
        [Sample(str(base / "JPEGImages" / f"{i}.jpg"), str(base / label_dir / f"{i}.png"), lut) for i in ids], dataset
    )


def cityscapes_samples(root, dataset: str = "cityscapes", split: str = "val"):
    """cityscapes/{leftImg8bit/val/<city>/<stem>_leftImg8bit.png, gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png};
    when only <stem>_gtFine_labelIds.png exists it is mapped to trainIds with the standard table."""
    layout = (
        f"ROOT/leftImg8bit/{split}/<city>/*_leftImg8bit.png and ROOT/gtFine/{split}/<city>/*_gtFine_labelTrainIds.png"
    )
    base = _base(Path(root), f"leftImg8bit/{split}", ["", "cityscapes"], dataset, layout)
    images = sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    samples = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = base / "gtFine" / split / img.parent.name
        train_ids, label_ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file() or not label_ids.is_file():
            samples.append(Sample(str(img), str(train_ids), lut_identity(19)))
        else:
            samples.append(Sample(str(img), str(label_ids), lut_cityscapes_label_ids()))
    return _check_files(samples, dataset)


def ade_samples(root, dataset: str = "ade20k"):
    """ADEChallengeData2016/{images/validation/<id>.jpg, annotations/validation/<id>.png}."""
    layout = "ROOT/ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}"
    base = _base(Path(root), "images/validation", ["", "ADEChallengeData2016"], dataset, layout)
    images = sorted((base / "images" / "validation").glob("*.jpg"))
    return _check_files(
        [
            Sample(str(img), str(base / "annotations" / "validation" / f"{img.stem}.png"), lut_reduce_zero(150))
            for img in images
        ],
        dataset,
    )


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    class_file: str  # under data/classes/
    num_classes: int
    logit_scale: float
    prob_thd: float
    short_side: int
    long_side: int
    layout: str  # README text: the folder layout the reader expects
    area_thd: float = 0.0  # drop classes with at most this share of the argmax map (0: off)


VOC_LAYOUT = (
    "ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg, ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png "
    "(palette PNG, index = class), ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
)
CONTEXT_LAYOUT = (
    "ROOT/VOCdevkit/VOC2010/JPEGImages/<id>.jpg, ROOT/VOCdevkit/VOC2010/SegmentationClassContext/"
    "<id>.png (0 = background, 1..59), ROOT/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"
)
CITY_LAYOUT = (
    "ROOT/leftImg8bit/val/<city>/<stem>_leftImg8bit.png, "
    "ROOT/gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png (or _gtFine_labelIds.png)"
)
ADE_LAYOUT = (
    "ROOT/ADEChallengeData2016/images/validation/<id>.jpg, "
    "ROOT/ADEChallengeData2016/annotations/validation/<id>.png (0 = other, 1..150)"
)

DATASETS = {
    "voc21": DatasetSpec("voc21", "PASCAL VOC 21", "voc21.txt", 21, 65.0, 0.0, 672, 2048, VOC_LAYOUT),
    "voc20": DatasetSpec("voc20", "PASCAL VOC 20", "voc20.txt", 20, 40.0, 0.0, 672, 2048, VOC_LAYOUT),
    "context60": DatasetSpec(
        "context60", "PASCAL Context 60", "context60.txt", 60, 50.0, 0.1, 672, 2048, CONTEXT_LAYOUT
    ),
    "context59": DatasetSpec(
        "context59", "PASCAL Context 59", "context59.txt", 59, 40.0, 0.0, 672, 2048, CONTEXT_LAYOUT
    ),
    "cityscapes": DatasetSpec("cityscapes", "Cityscapes", "city_scapes.txt", 19, 40.0, 0.0, 1024, 2048, CITY_LAYOUT),
    "ade20k": DatasetSpec("ade20k", "ADE20K", "ade20k.txt", 150, 40.0, 0.0, 672, 2048, ADE_LAYOUT),
    # the toy world of miniature.py: scenes are evaluated at their own size (short/long side 0 = no resize)
    "miniature": DatasetSpec(
        "miniature",
        "SPAR in miniature",
        "miniature.txt",
        5,
        40.0,
        0.0,
        0,
        0,
        "ROOT/images/<id>.png, ROOT/labels/<id>.png (0 background, 1..4)",
    ),
}


# Per-backbone exceptions to a dataset's settings, as in the authors' evaluation configs.
BACKBONE_SETTINGS = {
    ("clip-b16", "voc21"): dict(prob_thd=0.1, area_thd=0.1),
}


def settings_for(dataset: str, backbone: str) -> dict:
    """The (backbone, dataset) evaluation settings: logit_scale, prob_thd, area_thd, short_side, long_side."""
    spec = DATASETS[dataset]
    out = dict(
        logit_scale=spec.logit_scale,
        prob_thd=spec.prob_thd,
        area_thd=spec.area_thd,
        short_side=spec.short_side,
        long_side=spec.long_side,
    )
    out.update(BACKBONE_SETTINGS.get((backbone, dataset), {}))
    return out


def dataset_samples(name: str, root) -> list[Sample]:
    """The evaluation split of a dataset, in a fixed order, every file checked to exist."""
    if name == "voc21":
        return voc_style_samples(
            root, name, "VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", lut_identity(21)
        )
    if name == "voc20":
        return voc_style_samples(
            root, name, "VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", lut_reduce_zero(20)
        )
    if name == "context60":
        return voc_style_samples(
            root, name, "VOC2010", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt", lut_identity(60)
        )
    if name == "context59":
        return voc_style_samples(
            root,
            name,
            "VOC2010",
            "SegmentationClassContext",
            "ImageSets/SegmentationContext/val.txt",
            lut_reduce_zero(59),
        )
    if name == "cityscapes":
        return cityscapes_samples(root)
    if name == "ade20k":
        return ade_samples(root)
    if name == "miniature":  # written by `python miniature.py world --out ROOT`
        base = _base(Path(root), "labels", [""], name, DATASETS[name].layout)
        return _check_files(
            [
                Sample(str(img), str(base / "labels" / img.name), lut_identity(5))
                for img in sorted((base / "images").glob("*.png"))
            ],
            name,
        )
    raise DatasetError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}.")


def read_sample(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (3, H, W) uint8 RGB, label (H, W) uint8 in evaluated classes with 255 = ignore."""
    return read_sample_checked(sample)[:2]


def out_of_range(raw: np.ndarray, lut: np.ndarray) -> tuple[int, int | None]:
    """Raw label values above the dataset's largest class id, other than 255: (pixel count, an example value).

    The look-up table maps them to 'ignore' like 255, so without this count a wrong label file (another
    dataset's ids, a colour map) would silently score on fewer pixels."""
    top = int(np.nonzero(lut != IGNORE)[0].max())
    bad = (raw > top) & (raw != IGNORE)
    n = int(bad.sum())
    return n, (int(raw[bad].flat[0]) if n else None)


def read_sample_checked(sample: Sample) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """`read_sample` plus `out_of_range` of the raw label."""
    from PIL import Image

    try:
        with Image.open(sample.image) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(sample.label) as lb:
            if lb.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"label '{sample.label}' is a {lb.mode} image; expected a single-channel PNG of "
                    f"class indices (palette or grey), not a colour rendering."
                )
            label = np.asarray(lb)
    except OSError as exc:
        raise DatasetError(f"cannot read '{sample.image}' or '{sample.label}' ({exc}).") from exc
    if image.shape[:2] != label.shape:
        raise DatasetError(
            f"image '{sample.image}' is {image.shape[1]}x{image.shape[0]} but its label is "
            f"{label.shape[1]}x{label.shape[0]}."
        )
    n_bad, example = out_of_range(label, sample.lut)
    label = sample.lut[np.clip(label, 0, 255).astype(np.uint8)]
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(label), n_bad, example


class SampleDataset(torch.utils.data.Dataset):
    """Reads samples in DataLoader workers; a failure comes back as a message instead of a worker traceback."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        try:
            return read_sample_checked(self.samples[i]) + ("",)
        except DatasetError as exc:
            return torch.zeros(0), torch.zeros(0), 0, None, str(exc)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic datasets (for trying the CLI and for the tests)
# ----------------------------------------------------------------------------------------------------------------


def _voc_palette() -> list[int]:
    out = []
    for k in range(256):
        c, rgb = k, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        out += rgb
    return out


def make_synthetic(name: str, root, num_images: int = 3, seed: int = 0) -> Path:
    """Write a small fake `name` dataset under `root` in the layout its reader expects (random coloured boxes,
    odd sizes, raw on-disk label conventions: VOC palette PNGs with 255 borders, Context/ADE 0 = background,
    Cityscapes labelTrainIds and labelIds).  Returns `root`."""
    if name == "miniature":  # the toy world itself, a few small scenes
        from miniature import write_world

        return write_world(root, 128, 256, num_images, seed)
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    raw_classes = {"voc21": 21, "voc20": 21, "context60": 60, "context59": 60, "cityscapes": 19, "ade20k": 151}[name]
    items = []
    for i in range(num_images):
        H, W = (int(rng.integers(40, 80)), int(rng.integers(40, 80))) if name != "cityscapes" else (48, 96)
        label = np.zeros((H, W), dtype=np.uint8)
        colours = rng.integers(0, 256, size=(raw_classes, 3))
        for _ in range(4):  # a few boxes of random classes
            k = int(rng.integers(0, raw_classes))
            y, x = int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8))
            label[y : y + int(rng.integers(8, H)), x : x + int(rng.integers(8, W))] = k
        image = np.clip(colours[label] + rng.normal(0, 12, size=(H, W, 3)), 0, 255).astype(np.uint8)
        items.append((f"{2000 + i}_{i:06d}", image, label))

    if name in ("voc21", "voc20", "context60", "context59"):
        year, label_dir, split = (
            ("VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt")
            if name.startswith("voc")
            else ("VOC2010", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt")
        )
        base = root / "VOCdevkit" / year
        for d in ("JPEGImages", label_dir, Path(split).parent):
            (base / d).mkdir(parents=True, exist_ok=True)
        for stem, image, label in items:
            Image.fromarray(image).save(base / "JPEGImages" / f"{stem}.jpg", quality=95)
            if name.startswith("voc"):  # VOC: palette PNG, 255 on object borders
                edge = np.zeros(label.shape, dtype=bool)
                edge[:-1] |= label[:-1] != label[1:]
                edge[:, :-1] |= label[:, :-1] != label[:, 1:]
                label = np.where(edge, IGNORE, label).astype(np.uint8)
                lb = Image.fromarray(label, mode="P")
                lb.putpalette(_voc_palette())
            else:
                lb = Image.fromarray(label, mode="L")
            lb.save(base / label_dir / f"{stem}.png")
        (base / split).write_text("".join(f"{stem}\n" for stem, _, _ in items))
    elif name == "cityscapes":
        train_to_label = np.ones(256, dtype=np.uint8)  # trainId -> labelId, 255 -> 1 (ego vehicle)
        for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
            train_to_label[train_id] = label_id
        for n, (stem, image, label) in enumerate(items):
            city = ["frankfurt", "lindau", "munster"][n % 3]
            stem = f"{city}_{n:06d}_000019"
            (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
            train = label.copy()
            train[:2] = IGNORE  # ego-vehicle-like ignored strip
            ids = train_to_label[train]
            Image.fromarray(train, mode="L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png")
            Image.fromarray(ids, mode="L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    else:
        base = root / "ADEChallengeData2016"
        (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
        for n, (stem, image, label) in enumerate(items):
            stem = f"ADE_val_{n + 1:08d}"
            Image.fromarray(image).save(base / "images" / "validation" / f"{stem}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(base / "annotations" / "validation" / f"{stem}.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def parse_modes(text: str) -> list[tuple[str, str, int]]:
    """ "single,slide24,slidelogit24,pretrained" -> [(label, kind, stride)], kind in single | pretrained | slide |
    slidelogit (slideN averages features over windows, slidelogitN cosine logits)."""
    modes = []
    for m in (t.strip() for t in text.split(",")):
        match = re.fullmatch(r"(slidelogit|slide)(\d*)", m)
        if m in ("single", "pretrained"):
            modes.append((m, m, 0))
        elif match:
            kind, stride = match.group(1), int(match.group(2) or 24)
            if stride <= 0:
                raise ValueError(f"mode '{m}': the stride must be positive")
            modes.append((f"{kind}{stride}", kind, stride))
        elif m:
            raise ValueError(
                f"unknown mode '{m}'; use single, pretrained, slideN or slidelogitN (N = stride in px, e.g. slide24)"
            )
    if not modes:
        raise ValueError("no modes given; e.g. --modes single,slide24")
    return modes


def _file_id(path: str | None) -> str | None:
    """A checkpoint's identity for resuming: path, size and modification time."""
    if not path or not os.path.isfile(path):
        return path or None  # a missing checkpoint is reported by load_backbone
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def evaluate_mode(
    backbone,
    samples,
    text,
    settings: dict,
    kind: str,
    stride: int,
    state: dict,
    save,
    batch_size=None,
    num_workers: int = 0,
    save_every: int = 25,
    desc: str = "",
) -> dict:
    """Run one mode over `samples`, continuing from state["images_done"].

    `state` always holds a consistent snapshot (confusion, images_done, seconds, mIoU) that `save()` writes; it is
    refreshed every `save_every` images, at the end, and on Ctrl-C, so an interrupted run loses nothing.
    """
    from tqdm import tqdm

    device = backbone.device
    K = text.num_classes
    conf = torch.zeros(K, K, dtype=torch.long, device=device)  # (K, K) on the device
    if state.get("confusion"):
        conf += torch.tensor(state["confusion"], dtype=torch.long, device=device)
    done, seconds = state.get("images_done", 0), state.get("seconds", 0.0)

    def snapshot():
        mean, per_class = miou(conf)
        state.update(
            images_done=done,
            seconds=seconds,
            seconds_per_image=seconds / max(done, 1),
            miou=mean,
            per_class_iou={name: (None if math.isnan(v) else float(v)) for name, v in zip(text.names, per_class)},
            confusion=conf.cpu().tolist(),
        )
        save()

    amp = settings.get("amp", False)
    slide = kind in ("slide", "slidelogit")
    teacher = window_teacher(backbone, kind, text, stride, batch_size, amp) if slide else None
    with torch.inference_mode(), autocast(device, "auto" if amp else "fp32"):  # warm-up: kernels, cudnn
        backbone.dense(backbone.normalize(torch.zeros(1, 3, backbone.window, backbone.window, device=device)))
    loader = torch.utils.data.DataLoader(
        SampleDataset(samples[done:]),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(loader, total=len(samples), initial=done, desc=desc, unit="img", leave=False)
    try:
        for i, (image, label, n_bad, example, error) in enumerate(bar, start=done):
            if error:
                raise DatasetError(error)
            if n_bad:  # counted, and said once per file, with its name
                state["out_of_range_pixels"] = state.get("out_of_range_pixels", 0) + int(n_bad)
                bar.write(
                    f"warning: label '{display_name(samples[i].label)}' has {int(n_bad)} pixel(s) with values "
                    f"outside the classes (e.g. {int(example)}; only 0..{K - 1} after the dataset's mapping "
                    f"and 255 are expected); they are ignored.",
                    file=sys.stderr,
                )
            label = label.to(device, non_blocking=True)  # (H, W) uint8
            image = image.to(device, non_blocking=True)[None].float().div_(255)  # (1, 3, H, W)
            seg = segment(
                backbone,
                image,
                text,
                kind if slide else "single",
                stride,
                settings["logit_scale"],
                settings["prob_thd"],
                settings["short_side"],
                settings["long_side"],
                out_hw=label.shape,
                teacher=teacher,
                area_thd=settings.get("area_thd", 0.0),
                protocol=settings.get("protocol", "paper"),
                amp=amp,
            )
            conf += confusion(seg.labels[0], label, K)
            done, seconds = done + 1, seconds + seg.seconds
            if done % save_every == 0 or done == len(samples):
                snapshot()
                bar.set_postfix(mIoU=f"{100 * state['miou']:.1f}")
    except KeyboardInterrupt:
        snapshot()
        raise
    finally:
        bar.close()
    return state


def speed_accuracy_plot(results: dict, path: Path, title: str):
    """Fig. 1 style: seconds per image (log x) against mIoU, one labelled point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


def default_out(args) -> Path:
    tag = f"-{Path(args.checkpoint).stem}" if args.checkpoint else ""
    return HERE / "runs" / "eval" / f"{args.dataset}-{args.backbone}{tag}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Zero-shot segmentation mIoU on VOC21/VOC20/Context60/Context59/Cityscapes/ADE20K, per mode "
        "(single pass, pre-trained single pass, sliding-window teacher), with seconds per image, a JSON "
        "of the results and (several modes) the speed-accuracy plot of Fig. 1.",
        epilog="layouts: "
        + "; ".join(
            f"{n}: {s.layout}" for n, s in DATASETS.items() if n in ("voc21", "context60", "cityscapes", "ade20k")
        ),
    )
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--root", help="dataset folder (see the layouts below / README)")
    add_backbone_args(p, default="siglip2-b16")
    p.add_argument("--checkpoint", help="student.pt from distill.py, used by the 'single' mode")
    p.add_argument(
        "--modes",
        default="single",
        help="comma-separated: single (student if --checkpoint, else "
        "pre-trained), pretrained (pre-trained single pass), slideN (teacher at stride N px, features "
        "averaged over windows), slidelogitN (cosine logits averaged over windows), e.g. "
        "single,slide24,slidelogit24 (default: %(default)s)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="paper: the authors' resizes (no-antialias image resize, one logit resize from the model's "
        "grid); aligned: ours (antialiased shrinking, logits cropped to the seen pixels)",
    )
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast on GPU (default: fp32, as the authors)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--logit-scale", type=float, default=None, help="override the dataset's (VOC21 65, C60 50, else 40)")
    p.add_argument(
        "--prob-thd",
        type=float,
        default=None,
        help="override the (backbone, dataset)'s (C60 0.1; clip-b16 VOC21 0.1; else 0)",
    )
    p.add_argument(
        "--area-thd",
        type=float,
        default=None,
        help="override the (backbone, dataset)'s (clip-b16 VOC21 0.1; else 0 = off)",
    )
    p.add_argument("--short-side", type=int, default=None, help="override the resize (672; Cityscapes 1024)")
    p.add_argument("--long-side", type=int, default=None, help="override the maximum long side (2048)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher windows per forward (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="image-reading workers (default: 2 on GPU, 0 on CPU)")
    p.add_argument("--templates", default=str(HERE / "data" / "imagenet_templates.txt"))
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


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_numbers(args):
    """Counts and sizes that would crash later or silently do nothing useful: one sentence each."""
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--save-every", args.save_every, 1),
        ("--workers", args.workers, 0),
        ("--short-side", args.short_side, 0),
        ("--long-side", args.long_side, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}.")
    for flag, value in (("--prob-thd", args.prob_thd), ("--area-thd", args.area_thd)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{flag} must be between 0 and 1, got {value}.")


def main(argv=None):
    try:
        run(argv)
    except KeyboardInterrupt:  # before or after the per-mode loop: nothing to save
        fail("interrupted.", 130)


def run(argv=None):
    args = build_parser().parse_args(argv)
    spec = DATASETS[args.dataset]
    if args.make_synthetic:
        root = make_synthetic(args.dataset, args.make_synthetic, args.num_synthetic)
        print(f"wrote a synthetic {args.dataset} dataset ({args.num_synthetic} images) to {root}")
        return
    if not args.root:
        fail("--root is required (the dataset folder), or use --make-synthetic DIR.")
    try:
        device = resolve_device(args.device)
        check_numbers(args)
        check_writable(Path(args.out) if args.out else default_out(args))  # before any work
        modes = parse_modes(args.modes)
        if args.max_images is not None and args.max_images < 1:
            raise ValueError(f"--max-images must be at least 1, got {args.max_images}.")
        samples = dataset_samples(args.dataset, args.root)[: args.max_images]
        classes = read_class_file(HERE / "data" / "classes" / spec.class_file)
        templates = read_templates(args.templates)
        if len(classes) != spec.num_classes:
            raise DatasetError(f"{spec.class_file} has {len(classes)} classes, expected {spec.num_classes}.")
        overrides = dict(
            logit_scale=args.logit_scale,
            prob_thd=args.prob_thd,
            area_thd=args.area_thd,
            short_side=args.short_side,
            long_side=args.long_side,
        )
        settings = dict(
            dataset=args.dataset,
            root=os.path.abspath(args.root),
            num_images=len(samples),
            backbone=args.backbone,
            pretrained=args.pretrained,
            checkpoint=_file_id(args.checkpoint),
            **settings_for(args.dataset, args.backbone),
            protocol=args.protocol,
            amp=args.amp,
            templates=hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16],
        )
        settings.update({k: v for k, v in overrides.items() if v is not None})
        needs_pretrained = any(k != "single" for _, k, _ in modes) and args.checkpoint
        backbone = load_backbone(args.backbone, args.pretrained, device, checkpoint=args.checkpoint)
        base = load_backbone(args.backbone, args.pretrained, device) if needs_pretrained else backbone
        for label, kind, stride in modes:
            if kind.startswith("slide") and stride > backbone.window:
                raise ValueError(
                    f"mode '{label}': the stride must be at most the {backbone.window} px window, "
                    f"or some pixels would be seen by no window."
                )
        text = text_embeddings(backbone, classes, templates, cache_dir_arg(args.text_cache), progress=True)
        if args.dataset == "voc21":  # line 1 of voc21.txt: 26 "stuff" synonyms for background
            text.names[0] = "background"
    except (DatasetError, SegmentError, BackboneError, DeviceError, WriteError, ValueError, OSError) as exc:
        fail(str(exc))

    out = Path(args.out) if args.out else default_out(args)
    record = {"settings": settings, "classes": text.names, "modes": {}}
    if out.is_file() and not args.no_resume:
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError):
            old = {}
        if not isinstance(old, dict) or not isinstance(old.get("modes", {}), dict):
            fail(
                f"--out '{out}' holds JSON that is not a results file of evaluate.py (a {type(old).__name__}); "
                f"give another --out or remove it."
            )
        if old.get("settings") == settings:
            record["modes"] = old.get("modes", {})
            print(f"resuming from {display_name(out)}")
        elif old:
            print(
                f"note: {display_name(out)} holds results for other settings; starting over (it will be overwritten)."
            )
    save = lambda: write_json(out, record)  # noqa: E731  atomic (files.py)
    workers = args.workers if args.workers is not None else (2 if backbone.device.type == "cuda" else 0)

    print(
        f"{spec.title}: {len(samples)} images, backbone {args.backbone}"
        + (f" + {display_name(args.checkpoint)}" if args.checkpoint else "")
        + f", logit scale {settings['logit_scale']:g}, prob_thd {settings['prob_thd']:g}, "
        f"area_thd {settings['area_thd']:g}, short side {settings['short_side']}, long side "
        f"{settings['long_side']}, protocol {args.protocol}, {'amp' if args.amp else 'fp32'}"
    )
    try:
        for label, kind, stride in modes:
            state = record["modes"].setdefault(label, {})
            if state.get("images_done", 0) >= len(samples):
                continue
            model = backbone if kind == "single" else base
            evaluate_mode(
                model,
                samples,
                text,
                settings,
                kind,
                stride,
                state,
                save,
                args.batch_size,
                workers,
                args.save_every,
                desc=label,
            )
    except (DatasetError, SegmentError, TeacherError, WriteError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; the finished images are saved in {out} and a rerun resumes from there.", 130)

    results = {label: record["modes"][label] for label, _, _ in modes}
    print(f"\n{'mode':<12} {'mIoU':>6} {'s/image':>9} {'images':>7}")
    for label, r in results.items():
        print(f"{label:<12} {100 * r['miou']:6.2f} {r['seconds_per_image']:9.3f} {r['images_done']:>7}")
    try:
        save()
    except WriteError as exc:
        fail(str(exc))
    print(f"saved {display_name(out)}")
    if len(results) > 1:
        plot = out.with_suffix(".png")
        speed_accuracy_plot(
            results,
            plot,
            f"{spec.title}, {args.backbone}" + (" + student" if args.checkpoint else "") + f", {len(samples)} images",
        )
        print(f"saved {display_name(plot)}")


if __name__ == "__main__":
    main()
