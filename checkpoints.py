"""Checkpoint files: reading and writing every format a backbone's weights come in (not a part of the paper).

* `load_checkpoint`   -- a distilled student into a built backbone, recognised by content (`checkpoint_format`):
                         ours (`save_student`, written by distill.py), the authors' released `.pth` and their
                         Lightning `.ckpt`; read with weights_only=True and loaded STRICTLY (every key, every shape,
                         checked before anything is assigned);
* `save_student`      -- our format, written atomically: {"format": "spar-student", "backbone", "settings",
                         "image_tower"};
* `load_state_dict_file` -- a plain open_clip state dict (`--pretrained PATH`, e.g. the `tiny` miniature weights);
* `BACKBONES`         -- where each backbone's pre-trained weights, input statistics and tokenizer come from;
* `open_clip_model`   -- those weights: downloaded through open_clip (cached), a local file or random; the offline
                         `tiny` model is built and seeded here; `tokenizer_factory` loads the text tokenizer;
* `BackboneError`     -- a backbone or its weights could not be built or loaded (one sentence: what, why, what to do).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from cli import UserError, resolve_device
from files import content_sha1, save_torch


class BackboneError(UserError):
    """A backbone could not be built or loaded. The message is one sentence: what, why, what to do."""


def friendly(exc: BaseException) -> str:
    """Turn a loader exception into the short reason part of a one-sentence message."""
    text = str(exc)
    low = text.lower()
    if any(
        k in low for k in ("local cache", "connect", "huggingface.co", "offline", "resolve", "timed out", "network")
    ):
        return "the Hugging Face hub could not be reached and the files are not in the local cache"
    if isinstance(exc, ImportError):
        return f"a package is missing: {text.splitlines()[0][:120]}"
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


CHECKPOINT_FORMAT = "spar-student"
AUTHORS_PTH_PREFIX = "model."  # their eval wrapper holds the open_clip model as `model`
AUTHORS_CKPT_PREFIX = "segmentor.net.model."  # the same wrapper inside their Lightning module
FORMAT_NAMES = {
    "ours": f"a SPAR student checkpoint from distill.py ('{CHECKPOINT_FORMAT}')",
    "authors-pth": f"the authors' released .pth (their wrapper's state dict, keys '{AUTHORS_PTH_PREFIX}*')",
    "authors-ckpt": f"the authors' Lightning .ckpt (state_dict keys '{AUTHORS_CKPT_PREFIX}*')",
    "dinotxt": "a dino.txt / SPAR DINOv3-TXT file (keys 'model.visual_model.*', 'model.text_model.*')",
}
DINOTXT_PREFIXES = ("model.visual_model.", "model.text_model.", "visual_model.", "text_model.")
# One key whose shape tells the architecture apart, for the "it looks like ..." hint of a refused file.
SIGNATURES = {
    "siglip2-b16": ("visual.trunk.pos_embed", (1, 1024, 768)),
    "clip-b16": ("visual.positional_embedding", (197, 768)),
    "tiny": ("visual.trunk.pos_embed", (1, 64, 128)),
}


def _read_torch_file(path: str, what: str = "checkpoint"):
    """torch.load with weights_only=True (never unpickles code); memory-mapped when the file allows it."""
    import pickle

    try:
        with warnings.catch_warnings():  # torch's warnings on odd pickles / sparse tensors: the one line is ours
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise
            except Exception:  # legacy (non-zip) torch files cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # garbage bytes: not a torch file at all
            raise BackboneError(
                f"cannot read {what} '{path}': it is not a torch file (or it is corrupt or truncated)."
            ) from exc
        raise BackboneError(
            f"cannot read {what} '{path}': it holds Python objects that safe loading "
            f"(weights_only=True) refuses; save only its tensors (see the README)."
        ) from exc
    except Exception as exc:
        raise BackboneError(
            f"cannot read {what} '{path}' ({friendly(exc)}); the file is corrupt, truncated or not a torch file."
        ) from exc


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def checkpoint_format(obj) -> str:
    """'ours' | 'authors-pth' | 'authors-ckpt' | 'dinotxt' | 'state-dict' (plain open_clip weights) | 'unknown'."""
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "ours"
    if _is_state_dict(obj) and any(k.startswith(DINOTXT_PREFIXES) for k in obj):
        return "dinotxt"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return "authors-ckpt"
    if _is_state_dict(obj):
        return "authors-pth" if any(k.startswith(AUTHORS_PTH_PREFIX) for k in obj) else "state-dict"
    return "unknown"


def _authors_state(obj, fmt: str) -> dict:
    """The open_clip model's state dict inside an authors' file: their prefix stripped.  Keys under the wrapper
    that are not under its `model` stay prefixed (-> reported as unexpected); in a Lightning .ckpt, entries
    outside `segmentor.net.` belong to the training module (losses, a teacher copy, ...) and are ignored."""
    if fmt == "authors-pth":
        items, prefix = obj.items(), AUTHORS_PTH_PREFIX
    else:
        items, prefix = (
            ((k, v) for k, v in obj["state_dict"].items() if k.startswith("segmentor.net.")),
            AUTHORS_CKPT_PREFIX,
        )
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in items}


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _state_mismatch(target: dict, state: dict) -> str:
    """'' when `state` fits `target` exactly (same keys, same shapes); else what does not fit, with key names."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with another shape (file vs model: {_few(shapes, 2)})")
    return "; ".join(parts)


def _bad_values(target: dict, state: dict) -> str:
    """'' when every tensor of `state` is a dense, finite tensor of `target`'s kind (float where it is float); else
    which is not: NaN / inf weights (a diverged run), int or complex tensors, sparse or meta tensors."""
    for k, v in state.items():
        want = target.get(k)
        if v.layout != torch.strided or v.is_meta:
            return f"'{k}' is a {'meta' if v.is_meta else 'sparse'} tensor, not one of numbers"
        if want is not None and want.is_floating_point() and not v.is_floating_point():
            return f"'{k}' holds {str(v.dtype).replace('torch.', '')} numbers where the model has floats"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"'{k}' holds NaN or infinite numbers (a diverged training run?)"
    return ""


def _refuse_bad_values(module: nn.Module, state: dict, what: str):
    bad = _bad_values(module.state_dict(), state)
    if bad:
        raise BackboneError(f"{what}: {bad}; pass another file.")


def _guess_hint(state: dict, name: str) -> str:
    """'; it looks like a clip-b16 file, pass --backbone clip-b16' when a signature key says so."""
    for other, (key, shape) in SIGNATURES.items():
        if other != name and key in state and tuple(state[key].shape) == shape:
            return f"; it looks like a {other} file, pass --backbone {other}"
    return ""


def random_weights(name: str, pretrained) -> bool:
    """Whether `load_backbone(name, pretrained)` has random weights: --pretrained none (or None), or `tiny` without
    a weights file (it has nothing to download).  load_backbone sets it as `backbone.random_weights`."""
    return pretrained is None or str(pretrained).lower() == "none" or (name == "tiny" and pretrained == "default")


def load_checkpoint(backbone, path: str) -> dict:
    """Load a distilled student into `backbone`; returns our checkpoint's settings ({} for the authors' files).

    Three formats, recognised by content (`checkpoint_format`), all read with weights_only=True and loaded
    STRICTLY -- every key present, none extra, every shape equal, checked before anything is assigned:
    * ours (distill.py): {"format": "spar-student", "backbone": name, "settings": {...},
      "image_tower": backbone.image_tower().state_dict()};
    * the authors' released .pth: their eval wrapper's state dict, the open_clip model's keys (image AND text
      tower) prefixed 'model.' -- SigLIP2 files fit `siglip2-b16`, MaskCLIP files fit `clip-b16`;
    * the authors' Lightning .ckpt: {"state_dict": {"segmentor.net.model.<key>": ...}, ...}; other top-level
      keys (optimizer state, epoch, ...) are ignored.
    """
    if not os.path.isfile(path):
        raise BackboneError(
            f"checkpoint '{path}' does not exist; pass the student.pt that distill.py wrote or "
            f"the authors' released .pth / .ckpt."
        )
    ckpt = _read_torch_file(path)
    fmt = checkpoint_format(ckpt)
    module, state = _module_and_state(backbone, path, ckpt, fmt)
    problem = _state_mismatch(module.state_dict(), state)  # validate everything before assigning anything
    if problem:
        raise BackboneError(
            f"'{path}' is {FORMAT_NAMES[fmt]} but does not fit {backbone.name} (open_clip "
            f"{backbone.source}): {problem}"
            f"{_guess_hint(state if fmt != 'ours' else {}, backbone.name)}."
        )
    _refuse_bad_values(module, state, f"checkpoint '{path}' cannot be used")
    module.load_state_dict(state, strict=True)
    if fmt != "ours":  # the authors' files replace the whole model, image AND text tower
        backbone.random_weights = False
    return ckpt.get("settings", {}) if fmt == "ours" else {}


def _module_and_state(backbone, path: str, ckpt, fmt: str):
    """Which module of `backbone` a checkpoint of format `fmt` fills, and with which state dict (its keys in the
    module's names); one sentence for a file that is no student checkpoint."""
    if fmt == "state-dict":
        raise BackboneError(
            f"'{path}' is a plain state dict without the authors' '{AUTHORS_PTH_PREFIX}' prefix "
            f"(e.g. {_few(list(ckpt))}); pass pre-trained open_clip weights with --pretrained."
        )
    if fmt == "unknown":
        raise BackboneError(
            f"'{path}' is not a SPAR student checkpoint (no '{CHECKPOINT_FORMAT}' format tag, no "
            f"'{AUTHORS_PTH_PREFIX}*' state dict, no Lightning 'state_dict'); pass the student.pt "
            f"that distill.py wrote or the authors' released .pth / .ckpt."
        )
    if fmt == "ours":
        if ckpt.get("backbone") != backbone.name:
            raise BackboneError(
                f"checkpoint '{path}' was distilled from backbone '{ckpt.get('backbone')}', not "
                f"'{backbone.name}'; pass --backbone {ckpt.get('backbone')}."
            )
        module, state = backbone.image_tower(), ckpt.get("image_tower")
        if not _is_state_dict(state):
            raise BackboneError(
                f"checkpoint '{path}' is {FORMAT_NAMES[fmt]} but its 'image_tower' is not a "
                f"state dict of tensors; the file is damaged."
            )
    else:
        if fmt == "authors-ckpt" and not any(k.startswith(AUTHORS_CKPT_PREFIX) for k in ckpt["state_dict"]):
            raise BackboneError(
                f"'{path}' holds a Lightning 'state_dict' but no '{AUTHORS_CKPT_PREFIX}*' keys "
                f"(e.g. {_few(list(ckpt['state_dict']))}); it is not an authors' SPAR checkpoint."
            )
        module, state = backbone.model, (ckpt if fmt == "dinotxt" else _authors_state(ckpt, fmt))
        if any(k.startswith(DINOTXT_PREFIXES) for k in state):  # the dino.txt layout: the backbone names it
            state = _released_state(backbone, path, state)
    return module, state


def weights_sha1(pretrained) -> str | None:
    """The content hash of a --pretrained weights file (once per process and file version, `files.content_sha1`);
    None for 'default' (the hub's named weights) and random weights.  Caches made from weights key on it."""
    if pretrained is None or str(pretrained).lower() in ("none", "default"):
        return None
    return content_sha1(str(pretrained))


def _released_state(backbone, path: str, state: dict) -> dict:
    """A dino.txt-layout state dict in `backbone`'s names (`dinotxt.DinoTxt.released_state`); others refuse."""
    if not hasattr(backbone.model, "released_state"):
        raise BackboneError(
            f"'{path}' is {FORMAT_NAMES['dinotxt']}, not a {backbone.name} file; pass --backbone dinov3-l16."
        )
    return backbone.model.released_state(state)


def save_student(path: str, backbone, settings: dict):
    """Our student checkpoint (the reader is `load_checkpoint`): the image tower's weights and the run's settings."""
    tower = backbone.image_tower()
    save_torch(
        path,
        dict(
            format=CHECKPOINT_FORMAT,
            backbone=backbone.name,
            settings=json.loads(json.dumps(settings)),  # fresh objects: equal settings give equal bytes (a rewrite)
            image_tower={k: v.detach().cpu() for k, v in tower.state_dict().items()},
        ),
    )


def not_a_file(path: str) -> str:
    """Why `path` cannot be read as a weights file, in a few words: a folder, or nothing there."""
    return "is a folder, not a file" if os.path.isdir(path) else "does not exist"


def load_state_dict_file(model: nn.Module, path: str, name: str):
    """A plain state dict of the whole open_clip model (or {"state_dict": ...}), e.g. `tiny` weights, strictly."""
    if not os.path.isfile(path):
        raise BackboneError(f"cannot load {name}: weights file '{path}' {not_a_file(path)}.")
    state = _read_torch_file(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not _is_state_dict(state):
        raise BackboneError(
            f"cannot load {name}: '{path}' does not match its architecture (it is not a state dict of tensors)."
        )
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise BackboneError(
            f"cannot load {name}: '{path}' does not match its architecture ({problem}{_guess_hint(state, name)})."
        )
    _refuse_bad_values(model, state, f"cannot load {name}: weights file '{path}' cannot be used")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained weights: open_clip downloads (cached), local files, the offline `tiny` model
# ----------------------------------------------------------------------------------------------------------------

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone's weights, input statistics and tokenizer come from; `window` is K, its native resolution."""

    name: str
    kind: str  # "siglip" | "openclip"
    openclip_name: str  # open_clip architecture name (offline config)
    hub_name: str | None  # what `pretrained="default"` downloads
    pretrained_tag: str | None
    window: int
    mean: tuple
    std: tuple
    tokenizer_name: str


BACKBONES = {
    "siglip2-b16": BackboneSpec(
        "siglip2-b16",
        "siglip",
        "ViT-B-16-SigLIP2-512",
        "hf-hub:timm/ViT-B-16-SigLIP2-512",
        None,
        512,
        SIGLIP_MEAN,
        SIGLIP_STD,
        "hf-hub:timm/ViT-B-16-SigLIP2-512",
    ),
    "clip-b16": BackboneSpec(
        "clip-b16", "openclip", "ViT-B-16", None, "laion2b_s34b_b88k", 224, OPENAI_MEAN, OPENAI_STD, "ViT-B-16"
    ),
    "tiny": BackboneSpec("tiny", "siglip", "spar-tiny", None, None, 128, SIGLIP_MEAN, SIGLIP_STD, "ViT-B-16"),
    # DINOv3.txt (dinotxt.py): a timm trunk and dino.txt's text tower with CLIP's BPE tokenizer (inside open_clip).
    "dinov3-l16": BackboneSpec(
        "dinov3-l16",
        "dinov3",
        "vit_large_patch16_dinov3_qkvb",
        None,
        None,
        384,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "ViT-B-16",
    ),
    "dinov3-tiny": BackboneSpec(
        "dinov3-tiny",
        "dinov3",
        "vit_large_patch16_dinov3_qkvb",
        None,
        None,
        64,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "ViT-B-16",
    ),
    # The SigLIP2 NaFlex baseline (naflex.py): open_clip's SigLIP2 B/16 text tower, timm's NaFlexViT image trunk.
    "siglip2-naflex-b16": BackboneSpec(
        "siglip2-naflex-b16",
        "naflex",
        "ViT-B-16-SigLIP2",
        None,
        None,
        256,
        SIGLIP_MEAN,
        SIGLIP_STD,
        "hf-hub:timm/ViT-B-16-SigLIP2",
    ),
}


# `tiny`: the SigLIP2 structure (timm ViT trunk without CLS, attention-pool head, CLIP-style text tower) at a
# size that runs in milliseconds on a laptop CPU.  Random weights, seeded, so every run builds the same model.
TINY = dict(window=128, patch=16, width=128, depth=4, heads=4, text_width=128, text_layers=2, text_heads=4, seed=0)


def register_tiny_timm_model():
    """Register the tiny trunk with timm so that open_clip's TimmModel can build it like the real SigLIP2."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if "spar_tiny_siglip" in timm.list_models("spar_tiny_siglip"):
        return

    @register_model
    def spar_tiny_siglip(pretrained=False, **kwargs):
        args = dict(
            img_size=TINY["window"],
            patch_size=TINY["patch"],
            embed_dim=TINY["width"],
            depth=TINY["depth"],
            num_heads=TINY["heads"],
            class_token=False,
            global_pool="map",
        )
        args.update({k: v for k, v in kwargs.items() if not k.startswith(("pretrained", "cache"))})
        return VisionTransformer(**args)


def _build_tiny():
    from open_clip.model import CustomTextCLIP

    register_tiny_timm_model()
    vision_cfg = dict(
        image_size=TINY["window"],
        timm_model_name="spar_tiny_siglip",
        timm_model_pretrained=False,
        timm_pool="map",
        timm_proj="none",
    )
    text_cfg = dict(
        context_length=77,
        vocab_size=49408,
        width=TINY["text_width"],
        heads=TINY["text_heads"],
        layers=TINY["text_layers"],
    )
    with seeded(TINY["seed"]):
        model = CustomTextCLIP(embed_dim=TINY["width"], vision_cfg=vision_cfg, text_cfg=text_cfg)
    return model


RANDOM_SEED = 0  # --pretrained none: every architecture's random weights are the same in every run


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED):
    """Build random weights (on the CPU) from a fixed seed: only the CPU generator is seeded, inside a fork of it,
    so the caller's RNG state -- CPU and GPU -- is left as it was (`torch.manual_seed` would reseed every GPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_logging():
    """open_clip / huggingface_hub log every failed download at length; we report it in one sentence instead."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_load_args(name, pretrained, device, checkpoint) -> torch.device:
    """`load_backbone`'s arguments, each of the right type and existing here (one sentence otherwise); the device."""
    if not isinstance(name, str) or name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}.")
    kinds = dict(pretrained="'default', 'none', None or a weights file path", checkpoint="None or a file path")
    for what, value in (("pretrained", pretrained), ("checkpoint", checkpoint)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise BackboneError(f"{what} must be {kinds[what]}, not {type(value).__name__} {value!r}.")
    if not isinstance(device, (str, torch.device)):
        raise BackboneError(f"device must be a str or torch.device such as 'cpu' or 'cuda:0', not {device!r}.")
    return resolve_device(str(device))


def model_width(spec: BackboneSpec, model) -> int:
    """C, the width of the dense features: OpenCLIP's projection (or its transformer's width), else the timm
    trunk's embed_dim (SigLIP2, NaFlex, DINOv3)."""
    if spec.kind == "openclip":
        return model.visual.proj.shape[1] if model.visual.proj is not None else model.visual.transformer.width
    return getattr(model.visual, "trunk", model.visual).embed_dim


def open_clip_model(spec: BackboneSpec, pretrained):
    """The open_clip model of a backbone, in eval mode and frozen: pre-trained weights ("default": downloaded,
    cached), a local weights file, or random (None or "none"); `tiny` is built offline."""
    return _open_clip_model(spec, pretrained).eval().requires_grad_(False)


def _open_clip_model(spec: BackboneSpec, pretrained):
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    if pretrained == "default":
        check_hub(spec)  # in seconds, before open_clip is imported (~10 s), builds the model and tries the network
    import open_clip

    if spec.name == "tiny":
        model = _build_tiny()
        if pretrained not in (None, "default"):
            load_state_dict_file(model, pretrained, spec.name)
        return model
    if pretrained is None:
        with _quiet_logging(), seeded():  # silence open_clip's "initialized randomly" warning: we asked for it
            return open_clip.create_model(spec.openclip_name, pretrained=None)
    if pretrained != "default":
        if not os.path.isfile(pretrained):
            raise BackboneError(
                f"cannot load {spec.name}: weights file '{pretrained}' {not_a_file(pretrained)}; "
                f"pass an existing open_clip checkpoint path, 'default' to download, or None."
            )
        return open_clip.create_model(spec.openclip_name, pretrained=pretrained)
    try:
        with _quiet_logging():
            if spec.hub_name is not None:
                return open_clip.create_model(spec.hub_name)
            return open_clip.create_model(spec.openclip_name, pretrained=spec.pretrained_tag)
    except Exception as exc:  # network, missing package, corrupt cache ... -> one clear sentence
        source = spec.hub_name or f"{spec.openclip_name}/{spec.pretrained_tag}"
        raise BackboneError(
            f"cannot download the {spec.name} weights ({source}) through open_clip ({friendly(exc)}); "
            f"connect to the internet once (the files are cached), or pass a local weights file with "
            f"--pretrained PATH, or use --pretrained none / --backbone tiny to work offline."
        ) from exc


HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # what open_clip downloads
HUB_REPOS = {"clip-b16": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"}  # open_clip's hf_hub of laion2b_s34b_b88k


def hub_repo(spec: BackboneSpec) -> str | None:
    """The Hugging Face repository of a backbone's default weights; None: not downloaded from the hub."""
    return spec.hub_name.removeprefix("hf-hub:") if spec.hub_name else HUB_REPOS.get(spec.name)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub (HF_ENDPOINT, else huggingface.co) within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False


def check_hub(spec: BackboneSpec):
    """Before a download: weights not in the local Hugging Face cache while the hub is off (HF_HUB_OFFLINE=1) or out
    of reach fail in seconds with one sentence, not after open_clip has built the model and waited on the network.
    Nothing is checked (no connection tried) when the files are cached."""
    repo = hub_repo(spec)
    if repo is None:
        return
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in HUB_WEIGHT_FILES):
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline() else None if hub_reachable() else "the hub cannot be reached"
    if why:
        raise BackboneError(
            f"cannot download the {spec.name} weights (huggingface.co/{repo}): they are not in the local Hugging "
            f"Face cache and {why}; use --backbone tiny or --pretrained none (random weights, offline), or "
            f"--pretrained PATH (a local weights file), or connect to the internet once (the files are cached)."
        )


STAND_IN_TOKENIZER = "ViT-B-16"  # CLIP's BPE: it ships inside open_clip, so it needs no download


def tokenizer_factory(spec: BackboneSpec, random_weights: bool = False, context_length: int | None = None):
    """A function that loads the text tokenizer of a backbone when it is first called, then returns the same one.

    With random weights (`random_weights`), a tokenizer that needs a download (SigLIP2's Gemma tokenizer, from the
    hub) is replaced by CLIP's BPE at the model's `context_length`: a random text tower makes every embedding
    meaningless whichever ids it is given, and the random-weight pipeline then runs offline end to end.  Its ids
    (< 49,408) all lie inside Gemma's vocabulary of 256,000."""
    stand_in = random_weights and spec.tokenizer_name.startswith("hf-hub:")

    @functools.cache
    def make():
        import open_clip

        if stand_in:
            return open_clip.get_tokenizer(STAND_IN_TOKENIZER, context_length=context_length)
        try:
            with _quiet_logging():
                return open_clip.get_tokenizer(spec.tokenizer_name)
        except Exception as exc:
            raise BackboneError(
                f"cannot load the {spec.name} text tokenizer ({spec.tokenizer_name}) ({friendly(exc)}); it needs "
                f"the `transformers` package and one download from the Hugging Face hub (then cached); "
                f"--pretrained none runs offline with a stand-in tokenizer."
            ) from exc

    make.stand_in = stand_in  # textcache.py keys its cache on it
    return make
