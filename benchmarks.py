"""The data around the method (not a part of the paper): class-name and prompt-template files, the six benchmarks'
folder layouts and label conventions, the synthetic sets, and the toy world of `miniature.py`.

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

* `read_class_file`, `parse_classes`, `class_list`, `check_duplicates`, `read_templates` -- class lists (one class
  per line, synonyms comma-separated; or segment.py's --classes) and prompt templates (`{}` for the name; the
  paper's 80 ImageNet ones by default);
* `DATASETS`, `settings_for`, `benchmark`, `dataset_samples`, `read_sample`, `sample_loader` -- each benchmark's
  settings, class list and split in a fixed order, read into evaluated class indices (255 = ignore); a mis-laid
  folder is a `DatasetError` that says what was expected;
* `make_synthetic` -- a small fake dataset in any of the layouts (for trying the CLIs and for the tests);
* `render_scene`, `write_world` -- the toy world of `miniature.py` (`--dataset miniature`);
* `voc_palette` -- the PASCAL VOC colour map: VOC's label PNGs and the masks of `pictures.py`;
* `resized_hw`, `resize_image` -- the evaluation protocol's keep-ratio resize (short side 672, long side 2048).
"""

from __future__ import annotations

import io
import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import UserError, display_name, hxw
from files import atomic_write, read_json, write_json

HERE = Path(__file__).resolve().parent
CLASS_DIR = HERE / "data" / "classes"
DEFAULT_TEMPLATES = HERE / "data" / "imagenet_templates.txt"
IGNORE = 255


class DatasetError(UserError):
    """A dataset folder, class list or template file is missing, mis-laid or malformed. The message says what was
    expected."""


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
        raise DatasetError("the class list is empty; give at least one class name.")
    return classes


def read_class_file(path: str | os.PathLike) -> list[list[str]]:
    """A class file as in the paper's code (data/classes/*.txt): one class per line, synonyms comma-separated."""
    return parse_class_lines(read_text_file(path, "class file").splitlines())


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A small UTF-8 text file (class names, templates); a missing, binary or non-UTF-8 file is one sentence."""
    try:
        data = Path(path).read_bytes() if Path(path).is_file() or not Path(path).exists() else None
    except OSError as exc:
        raise DatasetError(f"cannot read {what} '{path}' ({exc.strerror or exc}).") from exc
    if data is None:
        raise DatasetError(f"{what} '{path}' is not a regular file; pass a UTF-8 text file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8."
        ) from None
    if "\x00" in text:
        raise DatasetError(f"{what} '{path}' is a binary file (it holds NUL bytes), not text; pass a UTF-8 text file.")
    return text


def parse_classes(text: str) -> list[list[str]]:
    """The --classes argument: "road, car, sky" is three classes; with ';' the classes are separated by ';' and
    commas give synonyms, like the lines of a class file: "road; car, truck; sky" (car and truck -> class 1)."""
    return parse_class_lines(text.split(";") if ";" in text else text.split(","))


def class_list(classes: str | None, class_file: str | None) -> list[list[str]]:
    """The class list of the command line: --classes or --class-file (one of them), no name given twice."""
    if classes and class_file:
        raise DatasetError("give either --classes or --class-file, not both.")
    if classes is None and not class_file:
        raise DatasetError('no classes given; pass --classes "a, b, c" or --class-file FILE.')
    out = read_class_file(class_file) if class_file else parse_classes(classes)
    check_duplicates(out)
    return out


def check_duplicates(classes: list[list[str]]):
    """A name given for two classes makes one of them always empty (a pixel's max goes to one): refuse it."""
    first = {}
    for k, syns in enumerate(classes):
        for name in syns:
            key = " ".join(name.lower().split())
            if first.setdefault(key, k) != k:
                raise DatasetError(
                    f"'{name}' is given for two classes ({first[key] + 1} and {k + 1}); one of them "
                    f"could never win a pixel, so remove the duplicate."
                )


def read_templates(path: str | os.PathLike = DEFAULT_TEMPLATES) -> list[str]:
    """Prompt templates, one per line, `{}` standing for the class name (the paper uses the 80 ImageNet ones); a
    line without exactly one `{}` field (`a {0} {1}`, `{x}`, `a photo`, an unmatched brace) names its line."""
    lines = []
    for number, line in enumerate(read_text_file(path, "template file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            named = [field for _, field, _, _ in string.Formatter().parse(line.strip()) if field is not None]
            line.strip().format("x")
        except (ValueError, IndexError, KeyError) as exc:
            named = [f"? ({exc})"]
        if named != [""]:
            raise DatasetError(
                f"template file '{path}' line {number} ({line.strip()!r}) must have exactly one '{{}}' for the "
                f"class name and no other '{{...}}' field; write literal braces as '{{{{' and '}}}}'."
            )
        lines.append(line.strip())
    if not lines:
        raise DatasetError(f"template file '{path}' holds no template; write one per line, with '{{}}' for the name.")
    return lines


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8, the PASCAL VOC colour map: entry 0 black, then dark red, dark green, ... (the bits of k)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, rgb = k, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        out[k] = rgb
    return out


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks: folder layouts and label conventions
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


# The VOC-style benchmarks: (year, label folder, split file, raw label -> evaluated class).
VOC_STYLE = {
    "voc21": ("VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", lut_identity(21)),
    "voc20": ("VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", lut_reduce_zero(20)),
    "context60": ("VOC2010", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt", lut_identity(60)),
    "context59": ("VOC2010", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt", lut_reduce_zero(59)),
}


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
    try:
        ids = [line.split()[0] for line in (base / split_file).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot read the split file '{base / split_file}' ({exc}).") from exc
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


def miniature_samples(root, dataset: str = "miniature"):
    """The toy world (`write_world`, `python miniature.py world --out ROOT`): images/<id>.png, labels/<id>.png."""
    base = _base(Path(root), "labels", [""], dataset, DATASETS[dataset].layout)
    return _check_files(
        [
            Sample(str(img), str(base / "labels" / img.name), lut_identity(5))
            for img in sorted((base / "images").glob("*.png"))
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


SETTINGS = ("logit_scale", "prob_thd", "area_thd", "short_side", "long_side")  # per dataset, each a flag of evaluate.py
# Per-backbone exceptions to a dataset's settings, as in the authors' evaluation configs.
BACKBONE_SETTINGS = {
    ("clip-b16", "voc21"): dict(prob_thd=0.1, area_thd=0.1),
}


def settings_for(dataset: str, backbone: str, **overrides) -> dict:
    """The (backbone, dataset) evaluation settings: logit_scale, prob_thd, area_thd, short_side, long_side; the
    `overrides` that are not None (evaluate.py's flags) replace them."""
    spec = DATASETS[dataset]
    out = {key: getattr(spec, key) for key in SETTINGS}
    out.update(BACKBONE_SETTINGS.get((backbone, dataset), {}))
    out.update({k: v for k, v in overrides.items() if k in out and v is not None})
    return out


def dataset_samples(name: str, root) -> list[Sample]:
    """The evaluation split of a dataset, in a fixed order, every file checked to exist."""
    if name in VOC_STYLE:
        return voc_style_samples(root, name, *VOC_STYLE[name])
    if name == "cityscapes":
        return cityscapes_samples(root)
    if name == "ade20k":
        return ade_samples(root)
    if name == "miniature":
        return miniature_samples(root)
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
            f"image '{sample.image}' is {hxw(*image.shape[:2])} but its label is {hxw(*label.shape[:2])} (H x W)."
        )
    n_bad, example = out_of_range(label, sample.lut)
    label = sample.lut[np.clip(label, 0, 255).astype(np.uint8)]
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(label), n_bad, example


def out_of_range_warning(sample: Sample, n_bad: int, example: int) -> str:
    top = int(sample.lut[sample.lut != IGNORE].max())  # the last class after the dataset's mapping
    return (
        f"warning: label '{display_name(sample.label)}' has {int(n_bad)} pixel(s) with values outside the classes "
        f"(e.g. {int(example)}; only 0..{top} after the dataset's mapping and 255 are expected); they are ignored."
    )


class SampleDataset(torch.utils.data.Dataset):
    """Reads samples in DataLoader workers: (image, label, out-of-range pixels, their warning or '', error or ''); a
    failure comes back as a message instead of a worker traceback."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        try:
            image, label, n_bad, example = read_sample_checked(self.samples[i])
        except DatasetError as exc:
            return torch.zeros(0), torch.zeros(0), 0, "", str(exc)
        return image, label, n_bad, out_of_range_warning(self.samples[i], n_bad, example) if n_bad else "", ""


def sample_loader(samples: list[Sample], workers: int = 0, pin_memory: bool = False):
    """The samples read in order, one at a time, by `workers` DataLoader processes (0: in this one)."""
    dataset = SampleDataset(samples)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)


def benchmark(name: str, root, max_images: int | None = None) -> tuple[list[Sample], list[list[str]]]:
    """The evaluation split of `name` under `root` (its first `max_images`) and its class list, both checked."""
    spec = DATASETS[name]
    samples = dataset_samples(name, root)[:max_images]
    classes = read_class_file(CLASS_DIR / spec.class_file)
    if len(classes) != spec.num_classes:
        raise DatasetError(f"{spec.class_file} has {len(classes)} classes, expected {spec.num_classes}.")
    return samples, classes


# ----------------------------------------------------------------------------------------------------------------
# Synthetic datasets in the benchmarks' layouts (for trying the CLI and for the tests)
# ----------------------------------------------------------------------------------------------------------------

RAW_CLASSES = {"voc21": 21, "voc20": 21, "context60": 60, "context59": 60, "cityscapes": 19, "ade20k": 151}


def make_synthetic(name: str, root, num_images: int = 3, seed: int = 0) -> Path:
    """Write a small fake `name` dataset under `root` in the layout its reader expects (random coloured boxes,
    odd sizes, raw on-disk label conventions: VOC palette PNGs with 255 borders, Context/ADE 0 = background,
    Cityscapes labelTrainIds and labelIds).  Returns `root`."""
    if name == "miniature":  # the toy world itself, a few small scenes
        return write_world(root, 128, 256, num_images, seed)
    rng = np.random.default_rng(seed)
    root = Path(root)
    raw_classes = RAW_CLASSES[name]
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
    if name in VOC_STYLE:
        _write_voc_style(name, root, items)
    elif name == "cityscapes":
        _write_cityscapes(root, items)
    else:
        _write_ade(root, items)
    return root


def _write_voc_style(name: str, root: Path, items: list):
    year, label_dir, split, _ = VOC_STYLE[name]
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
            lb.putpalette(voc_palette().reshape(-1).tolist())
        else:
            lb = Image.fromarray(label, mode="L")
        lb.save(base / label_dir / f"{stem}.png")
    (base / split).write_text("".join(f"{stem}\n" for stem, _, _ in items))


def _write_cityscapes(root: Path, items: list):
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


def _write_ade(root: Path, items: list):
    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
    for n, (stem, image, label) in enumerate(items):
        stem = f"ADE_val_{n + 1:08d}"
        Image.fromarray(image).save(base / "images" / "validation" / f"{stem}.jpg", quality=95)
        Image.fromarray(label, mode="L").save(base / "annotations" / "validation" / f"{stem}.png")


# ----------------------------------------------------------------------------------------------------------------
# The toy worlds of miniature.py (sizes in px, densities per 128 x 128 area; miniature.py's DEFAULTS["world"])
# ----------------------------------------------------------------------------------------------------------------

# "voronoi" (default): the plane cut into warped Voronoi cells, each of one of the 5 classes, its class visible
# locally as a desaturated cell colour (background = grey); "border": grey shapes whose class is only the colour of
# a thin border stroke (the first study: a token must gather its class from a far border).
WORLDS = {
    "voronoi": dict(
        kind="voronoi",
        density=[1.5, 3.0],
        margin=48,
        warp=6,
        warp_scale=48,
        saturation=0.6,
        brightness=[0.88, 1.12],
        tint=0.06,
        noise=0.08,
    ),  # fmt: skip
    "border": dict(
        kind="border",
        radius=[40, 60],
        density=[0.7, 2.0],
        border=3,
        noise=0.06,
        tint=0.05,
        fill_spread=0.0,
        contrast=[0.2, 0.35],
    ),  # fmt: skip
}
WORLD = WORLDS["voronoi"]
COLOURS = np.array([(0.90, 0.12, 0.10), (0.10, 0.72, 0.15), (0.12, 0.25, 0.92), (0.92, 0.85, 0.10)], np.float32)
SHAPES = ("disc", "square", "triangle", "plus")


def shape_sdf(kind: str, u: np.ndarray, v: np.ndarray, R: float) -> np.ndarray:
    """Signed distance (px, > 0 inside) of a shape of circumradius ~R centred at 0, in rotated coordinates u, v."""
    if kind == "disc":
        return R - np.hypot(u, v)
    if kind == "square":
        a = 0.75 * R
        return np.minimum(a - np.abs(u), a - np.abs(v))
    if kind == "triangle":  # equilateral: inradius R / 2, three half-planes
        d = [0.5 * R - (u * math.cos(t) + v * math.sin(t)) for t in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return np.minimum(np.minimum(d[0], d[1]), d[2])
    w = 0.38 * R  # plus: union of two bars
    return np.maximum(np.minimum(R - np.abs(u), w - np.abs(v)), np.minimum(w - np.abs(u), R - np.abs(v)))


def render_scene(rng: np.random.Generator, H: int, W: int, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """One scene of the world `cfg` ("kind": voronoi or border): (H, W, 3) uint8 image, (H, W) uint8 label."""
    if cfg.get("kind", "border") == "voronoi":
        return render_voronoi(rng, H, W, cfg)
    return render_border(rng, H, W, cfg)


def smooth_field(rng: np.random.Generator, H: int, W: int, scale: float) -> torch.Tensor:
    """(2, H, W) random displacement in [-1, 1]: uniform values on a grid of `scale` px, bicubically interpolated."""
    gh, gw = int(math.ceil(H / scale)) + 2, int(math.ceil(W / scale)) + 2
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 2, gh, gw)).astype(np.float32))
    full = F.interpolate(coarse, size=(int((gh - 1) * scale), int((gw - 1) * scale)), mode="bicubic")
    return full[0, :, :H, :W].clamp(-1, 1)


def render_voronoi(rng: np.random.Generator, H: int, W: int, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Warped Voronoi cells: label 0..4 uniform per cell, colour 0.5 + saturation * (class colour - 0.5) (grey for
    the background) times a brightness, plus a tint per cell and pixel noise.  Cell seeds are placed up to
    `margin` px beyond the image so cells are cut by the border like anywhere else; every pixel's coordinates are
    displaced by a smooth field (`warp` px at a `warp_scale` px scale) before finding its nearest seed."""
    m = cfg["margin"]
    area = (H + 2 * m) * (W + 2 * m) / 128**2
    n = max(1, int(rng.uniform(*cfg["density"]) * area + 0.5))
    seeds = torch.from_numpy(np.stack([rng.uniform(-m, H + m, n), rng.uniform(-m, W + m, n)], 1).astype(np.float32))
    cls = rng.integers(0, 5, n)
    palette = np.concatenate([[(0.5, 0.5, 0.5)], 0.5 + cfg["saturation"] * (COLOURS - 0.5)]).astype(np.float32)
    colours = palette[cls] * rng.uniform(*cfg["brightness"], (n, 1)) + rng.uniform(-cfg["tint"], cfg["tint"], (n, 3))
    warp = cfg["warp"] * smooth_field(rng, H, W, cfg["warp_scale"])
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pts = torch.stack([yy + warp[0], xx + warp[1]], -1).reshape(-1, 2)
    nearest = torch.cat([torch.cdist(chunk, seeds).argmin(1) for chunk in pts.split(65536)]).view(H, W).numpy()
    img = colours.astype(np.float32)[nearest] + rng.normal(0, cfg["noise"], (H, W, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), cls[nearest].astype(np.uint8)


def render_border(rng: np.random.Generator, H: int, W: int, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 image and (H, W) uint8 label (0 background, 1..4 = border colour).

    Objects of radius U(radius) at `density` per 128^2 area, never overlapping, cut by the image border; every
    object has the same fill grey (+- fill_spread), the background a contrasting grey, a small colour tint, and
    pixel noise.  Only a `border`-px stroke carries the class.
    """
    fill = rng.uniform(0.3, 0.7)
    sign = rng.choice([-1.0, 1.0])
    if not 0.05 < fill + sign * cfg["contrast"][1] < 0.95:
        sign = -sign
    bg = fill + sign * rng.uniform(*cfg["contrast"])
    img = np.empty((H, W, 3), np.float32)
    img[:] = bg + rng.uniform(-cfg["tint"], cfg["tint"], 3)
    label = np.zeros((H, W), np.uint8)
    target = rng.uniform(*cfg["density"]) * H * W / 128**2
    n = int(target) + (rng.random() < target - int(target))
    placed: list[tuple[float, float, float]] = []
    for _ in range(30 * n):
        if len(placed) >= n:
            break
        R = rng.uniform(*cfg["radius"])
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        if any((cy - y) ** 2 + (cx - x) ** 2 < (1.08 * (R + r) + 2) ** 2 for y, x, r in placed):
            continue  # no overlap (circumradius of the plus is ~1.07 R)
        placed.append((cy, cx, R))
        y0, y1 = max(0, int(cy - 1.1 * R)), min(H, int(cy + 1.1 * R) + 1)
        x0, x1 = max(0, int(cx - 1.1 * R)), min(W, int(cx + 1.1 * R) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        t = rng.uniform(0, 2 * math.pi)
        dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
        u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
        sdf = shape_sdf(SHAPES[rng.integers(len(SHAPES))], u, v, R)
        inside = sdf > 0
        cls = rng.integers(4)
        colour = np.where(
            (sdf <= cfg["border"])[..., None],
            COLOURS[cls],
            fill + rng.uniform(-cfg["fill_spread"], cfg["fill_spread"]) + rng.uniform(-cfg["tint"], cfg["tint"], 3),
        )
        patch = img[y0:y1, x0:x1]
        patch[inside] = colour[inside]
        label[y0:y1, x0:x1][inside] = cls + 1
    img += rng.normal(0, cfg["noise"], img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


WORLD_MARK = ".spar-world"  # written first into a folder of scenes: the folder is ours to rewrite


def claim_world_folder(out: Path):
    """A folder `write_world` may fill: new, ours (its marker, or a world.json of ours), or without PNGs in
    images/ and labels/; else UserError -- the user's files are never overwritten or deleted."""
    record = read_json(out / "world.json")
    if (out / WORLD_MARK).is_file() or (isinstance(record, dict) and {"size", "count", "seed", "world"} <= set(record)):
        return
    theirs = sorted(p.name for sub in ("images", "labels") for p in (out / sub).glob("*.png"))
    if theirs:
        raise UserError(
            f"'{out}' already holds images that miniature.py did not write (e.g. {theirs[0]}); they are not "
            f"overwritten, give another --out."
        )


def write_world(out: str | os.PathLike, H: int, W: int, count: int, seed: int, cfg: dict | None = None) -> Path:
    """A labelled set: out/images/<i>.png (RGB) and out/labels/<i>.png (class indices); skipped when `out`
    already holds it with the same settings, otherwise (re)written whole, stale extra scenes removed.

    `evaluate.py --dataset miniature --root out` reads it; `distill.py --images out/images` trains on it."""
    cfg = cfg or WORLD
    out = Path(out)
    key = dict(size=[H, W], count=count, seed=seed, world=cfg)
    meta, mark = out / "world.json", out / WORLD_MARK
    if read_json(meta) == key:
        return out  # finished earlier with the same settings
    claim_world_folder(out)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        atomic_write(mark, lambda f: f.write(b"written by benchmarks.write_world (miniature.py world)\n"))
    for i in range(count):
        image, label = render_scene(scene_rng(seed, i), H, W, cfg)
        for sub, arr in (("images", image), ("labels", label)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
            atomic_write(out / sub / f"{i:05d}.png", lambda f, b=buf.getvalue(): f.write(b))
    for sub in ("images", "labels"):
        for stale in (out / sub).glob("*.png"):
            if stale.stem.isdigit() and int(stale.stem) >= count:
                stale.unlink()
    write_json(meta, key)  # written last: its presence means "done"
    return out


# ----------------------------------------------------------------------------------------------------------------
# The evaluation protocol's resizes (segment.py runs every image through them)
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


def area_hw(H: int, W: int, area: int) -> tuple[int, int]:
    """Keep-ratio size of about `area` pixels (the resolution sweep of Fig. 3): (H, W) scaled by sqrt(area / (H W))."""
    s = math.sqrt(area / (H * W))
    return max(1, int(H * s + 0.5)), max(1, int(W * s + 0.5))
