"""Backbones and the single-pass, any-resolution student (SPAR, CVPR 2026, Sec. 3, Fig. 2 student branch).

The student is the pre-trained ViT itself, run ONCE on the whole image at any resolution:

    (E3)  F_S = f_theta(x),  with the absolute position embeddings resized from g x g to h x w

where g = K / p is the native (pre-training) grid and h x w is the patch grid of the input.  The grid follows the
authors' wrapper of each backbone (`Backbone.grid_rule`): SigLIP2 (and `tiny`) zero-pad to the ceil grid
ceil(H/p) x ceil(W/p); OpenCLIP crops to the floor grid floor(H/p) x floor(W/p) (the last < p rows/columns are
not seen).  This file holds:

* `resize_pos_embed`      -- the position-embedding resize of (E3): bicubic, align_corners=False, no antialias;
                             mode "size" (SigLIP2: an exact identity at the native grid) or "scale+0.1" (the
                             authors' DINO-style OpenCLIP resize);
* `Backbone`              -- the common interface (`normalize`, `grid_size`, `fit_to_grid`, `dense`,
                             `encode_text`, `blocks`, ...);
* `SigLIPBackbone`        -- timm trunk + attention-pool head; dense head = the pooling head with the attention
                             removed (value path), as in the paper's SigLIP2 experiments;
* `OpenCLIPBackbone`      -- OpenCLIP ViT; dense head = MaskCLIP-style value path in the last block;
* `load_backbone(name)`   -- `siglip2-b16`, `clip-b16` and the offline `tiny` backbone;
* `load_checkpoint`       -- a distilled student: ours (`distill.py`) or the authors' released `.pth` / `.ckpt`;
* `autocast`              -- the precision switch every CLI uses ("auto", "fp32", "fp16", "bf16").

Run `python student.py --backbone tiny` to see the dense-feature shapes and timings at a few resolutions.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import BackboneError, friendly, load_checkpoint, load_state_dict_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# (E3) position-embedding resize
# ----------------------------------------------------------------------------------------------------------------

POS_RESIZE_MODES = ("size", "scale+0.1")


def resize_pos_embed(
    pos: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int], mode: str = "size"
) -> torch.Tensor:
    """Resize a grid of absolute position embeddings, (E3).

    pos: (old_h * old_w, C) or (1, old_h * old_w, C), row-major over the grid (no CLS entry).
    Returns the same layout for the new grid.  Bicubic, align_corners=False, no antialias; computed in float32
    and cast back.  Two ways to map output to input coordinates:

    * mode="size" (SigLIP2, `tiny`): `F.interpolate(size=new_hw)`, so output cell i samples the input at
      (i + 0.5) * old / new - 0.5.  At the native grid the input is returned untouched, so a K x K image gives
      bit-identical features to the unmodified model.
    * mode="scale+0.1" (OpenCLIP, the authors' wrapper, from DINO): `F.interpolate(scale_factor=(new + 0.1) / old)`.
      The +0.1 exists because the output size is floor(old * scale): with scale = new / old a float rounding
      like 13.9999 would give one cell too few, and +0.1 makes the floor land on `new` safely.  With a
      scale_factor PyTorch maps coordinates with 1 / scale, i.e. cell i samples (i + 0.5) * old / (new + 0.1)
      - 0.5: a slightly different resize from mode="size", and NOT an identity at the native grid (14 x 14 is
      resampled at scale 14.1 / 14).  We follow the authors at every size, as their numbers were made so.
    """
    if mode not in POS_RESIZE_MODES:
        raise ValueError(f"unknown position-embedding resize mode '{mode}'; choose one of {POS_RESIZE_MODES}.")
    if mode == "size" and tuple(old_hw) == tuple(new_hw):
        return pos
    # ASSIGNMENT 3 BEGIN: resize the position-embedding grid, bicubic (E3)
    lead = pos.shape[:-2]  # () or (1,)
    C = pos.shape[-1]
    grid = pos.reshape(1, old_hw[0], old_hw[1], C).permute(0, 3, 1, 2).float()  # (1, C, gh, gw)
    if mode == "size":
        grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False, antialias=False)
    else:
        scale = ((new_hw[0] + 0.1) / old_hw[0], (new_hw[1] + 0.1) / old_hw[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
        assert tuple(grid.shape[-2:]) == tuple(new_hw), (grid.shape, new_hw)  # the +0.1 guarantees the floor
    out = grid.permute(0, 2, 3, 1).reshape(*lead, new_hw[0] * new_hw[1], C)
    return out.to(pos.dtype)
    # ASSIGNMENT 3 END


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a normalised (B, 3, H, W) batch at the bottom/right so H and W are multiples of `multiple`.

    This is the paper's SigLIP2 convention (ceil grid, `Backbone.grid_rule == "ceil"`).
    """
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def autocast(device: torch.device | str, precision: str = "auto"):
    """The mixed-precision context every CLI runs its forward passes in.

    precision "auto": bf16 autocast on GPUs that support it, fp16 on other GPUs;
              "fp32": no autocast (the authors evaluate in fp32);
              "fp16" / "bf16": autocast to that dtype on CUDA (the authors train and make teacher targets in fp16).
    On CPU every precision is a no-op (fp32): CPU half-precision autocast is slow on most CPUs and would make
    the CPU tests inexact, so it buys nothing here.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The common interface
# ----------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen-or-trainable vision-language ViT that gives dense, text-aligned features at any resolution.

    Attributes: `model` (the open_clip model), `name`, `patch_size` (p), `window` (K, native resolution),
    `dim` (C), `mean`, `std` (3-tuples), `grid_rule` ("ceil": zero-pad to ceil(H/p) x ceil(W/p); "floor": crop
    to floor(H/p) x floor(W/p), as the authors' wrapper of each backbone does).  Subclasses implement `dense`
    and `blocks`.
    """

    grid_rule: str = "ceil"

    def __init__(
        self, model: nn.Module, name: str, patch_size: int, window: int, dim: int, mean, std, tokenizer_factory
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.patch_size = patch_size
        self.window = window
        self.dim = dim
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer = None
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def native_grid(self) -> tuple[int, int]:
        g = self.window // self.patch_size
        return (g, g)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the normalised input the model was trained on."""
        return (images.to(self._mean.dtype) - self._mean) / self._std

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """Patch grid of an H x W image: (ceil(H/p), ceil(W/p)) or, for grid_rule "floor", (floor(H/p),
        floor(W/p)) -- at least 1 x 1, so an image side shorter than one patch is zero-padded instead of empty."""
        p = self.patch_size
        if self.grid_rule == "floor":
            return max(H // p, 1), max(W // p, 1)
        return math.ceil(H / p), math.ceil(W / p)

    def fit_to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, h*p, w*p) with (h, w) = grid_size(H, W): zero-pad bottom/right (ceil rule) or
        crop bottom/right (floor rule)."""
        H, W = x.shape[-2:]
        h, w = self.grid_size(H, W)
        Hg, Wg = h * self.patch_size, w * self.patch_size
        x = x[..., :Hg, :Wg]
        ph, pw = Hg - x.shape[-2], Wg - x.shape[-1]
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The image tower's transformer blocks, in order (distillation trains the last few)."""
        raise NotImplementedError

    def image_tower(self) -> nn.Module:
        """Every parameter that `dense` uses ("all" in `distill.py --train-blocks all`)."""
        return self.model.visual

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """(E3) single-pass dense features: normalised (B, 3, H, W) -> (B, h, w, C), (h, w) = grid_size(H, W)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (un-normalised) text embeddings, (N, C), in the same space as `dense`."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return torch.cat(out) if out else torch.empty(0, self.dim, device=self.device)


class SigLIPBackbone(Backbone):
    """timm ViT trunk (no CLS token) + attention-pooling ("MAP") head, as in SigLIP / SigLIP2 (and `tiny`).

    Dense head (Sec. 3, SigLIP2 rows of the tables): the attention-pool head with its attention removed.  Every
    token goes through the value projection (the value half of `attn_pool.kv`), then `attn_pool.proj`, then the
    head's residual MLP:  v = proj(W_v x + b_v);  v = v + mlp(norm(v)).  That keeps each token in the
    text-aligned output space without mixing it with the others.
    """

    @property
    def trunk(self):
        return self.model.visual.trunk

    @property
    def blocks(self):
        return self.trunk.blocks

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Trunk output tokens after the final norm: (B, h*w, C) and the grid (h, w)."""
        trunk = self.trunk
        x = self.fit_to_grid(x)  # ceil grid, zero padding
        # timm's PatchEmbed asserts the native image size, so call its projection directly.
        x = trunk.patch_embed.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
        x = x + resize_pos_embed(trunk.pos_embed, self.native_grid, (h, w)).to(x.dtype)  # (E3)
        x = trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x)))
        x = trunk.blocks(x)
        return trunk.norm(x), (h, w)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-pool head without attention, applied to every token: (B, N, C) -> (B, N, C)."""
        # ASSIGNMENT 4 BEGIN: the SigLIP2 dense head, the value path of the attention pool (Sec. 3)
        pool = self.trunk.attn_pool
        C = x.shape[-1]
        v = F.linear(x, pool.kv.weight[C:], pool.kv.bias[C:] if pool.kv.bias is not None else None)
        v = pool.proj(v)
        return v + pool.mlp(pool.norm(v))
        # ASSIGNMENT 4 END

    def dense(self, x):
        B = x.shape[0]
        tokens, (h, w) = self.tokens(x)
        return self.head(tokens).reshape(B, h, w, -1)


class OpenCLIPBackbone(Backbone):
    """OpenCLIP ViT (CLS token, `nn.MultiheadAttention` blocks, `ln_post`, `proj`).

    Dense head (MaskCLIP, used as the OpenCLIP baseline in the paper): blocks 0..L-2 unchanged; in the last
    block the self-attention is replaced by its value path, x = x + out_proj(V(ln_1(x))), then
    x = x + mlp(ln_2(x)); `ln_post`, `@ proj`, drop the CLS token.  As in the authors' wrapper: no padding (floor
    grid), the CLS position embedding kept as is and only the patch part resized, DINO-style ("scale+0.1").
    """

    grid_rule = "floor"

    @property
    def visual(self):
        return self.model.visual

    @property
    def blocks(self):
        return self.visual.transformer.resblocks

    def dense(self, x):
        vis = self.visual
        B = x.shape[0]
        x = self.fit_to_grid(x)  # floor grid: crop, no padding
        x = vis.conv1(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = vis.positional_embedding  # (1 + g*g, C)
        patch_pos = resize_pos_embed(pos[1:], self.native_grid, (h, w), mode="scale+0.1")  # (E3), CLS kept
        cls = (vis.class_embedding + pos[0]).to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x + patch_pos.to(x.dtype)], dim=1)  # (B, 1 + h*w, C)
        x = vis.ln_pre(vis.patch_dropout(x))
        batch_first = getattr(vis.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        x = self._value_block(self.blocks[-1], x)
        x = vis.ln_post(x)
        if vis.proj is not None:
            x = x @ vis.proj
        return x[:, 1:].reshape(B, h, w, -1)

    @staticmethod
    def _value_block(blk, x):
        """Last block with self-attention replaced by its value path (MaskCLIP)."""
        attn = blk.attn
        C = x.shape[-1]
        v = F.linear(
            blk.ln_1(x),
            attn.in_proj_weight[2 * C :],
            attn.in_proj_bias[2 * C :] if attn.in_proj_bias is not None else None,
        )
        x = x + blk.ls_1(attn.out_proj(v))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
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
}

# `tiny`: the SigLIP2 structure (timm ViT trunk without CLS, attention-pool head, CLIP-style text tower) at a
# size that runs in milliseconds on a laptop CPU.  Random weights, seeded, so every run builds the same model.
TINY = dict(window=128, patch=16, width=128, depth=4, heads=4, text_width=128, text_layers=2, text_heads=4, seed=0)


def _register_tiny_timm_model():
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

    _register_tiny_timm_model()
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY["seed"])
        model = CustomTextCLIP(embed_dim=TINY["width"], vision_cfg=vision_cfg, text_cfg=text_cfg)
    return model


@contextlib.contextmanager
def _quiet_logging():
    """open_clip / huggingface_hub log every failed download at length; we report it in one sentence instead."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _load_open_clip_model(spec: BackboneSpec, pretrained):
    import open_clip

    if spec.name == "tiny":
        model = _build_tiny()
        if pretrained not in (None, "default"):
            load_state_dict_file(model, pretrained, spec.name)
        return model
    if pretrained is None:
        with _quiet_logging():  # silence open_clip's "initialized randomly" warning: we asked for it
            return open_clip.create_model(spec.openclip_name, pretrained=None)
    if pretrained != "default":
        if not os.path.isfile(pretrained):
            raise BackboneError(
                f"cannot load {spec.name}: weights file '{pretrained}' does not exist; "
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


def _tokenizer_factory(spec: BackboneSpec):
    def make():
        import open_clip

        try:
            with _quiet_logging():
                return open_clip.get_tokenizer(spec.tokenizer_name)
        except Exception as exc:
            raise BackboneError(
                f"cannot load the {spec.name} text tokenizer ({spec.tokenizer_name}) ({friendly(exc)}); it needs "
                f"the `transformers` package and one download from the Hugging Face hub (then cached)."
            ) from exc

    return make


# ----------------------------------------------------------------------------------------------------------------
# Distilled checkpoints: ours and the authors' released files, recognised by content
# ----------------------------------------------------------------------------------------------------------------


def load_backbone(
    name: str, pretrained: str | None = "default", device: str | torch.device = "cpu", checkpoint: str | None = None
) -> Backbone:
    """Build a backbone by name.

    name:        'siglip2-b16' | 'clip-b16' | 'tiny'
    pretrained:  'default' -> the paper's weights through open_clip (needs internet the first time; cached);
                 None      -> the exact architecture with random weights, no network;
                 a path    -> a local open_clip weights file (state dict) for that architecture.
    checkpoint:  optional distilled student (`load_checkpoint`): our student.pt from `distill.py` replaces the
                 image tower (the base weights then only give the text tower, so pass the same `pretrained` as
                 for distilling); the authors' released .pth / .ckpt replace the whole model (image AND text).
    The model is returned in eval mode with gradients disabled; `distill.py` unfreezes what it trains.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)}.")
    spec = BACKBONES[name]
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    model = _load_open_clip_model(spec, pretrained)
    model.eval().requires_grad_(False)
    cls = SigLIPBackbone if spec.kind == "siglip" else OpenCLIPBackbone
    if spec.kind == "siglip":
        dim = model.visual.trunk.embed_dim
    else:
        dim = model.visual.proj.shape[1] if model.visual.proj is not None else model.visual.transformer.width
    patch = 16
    backbone = cls(model, spec.name, patch, spec.window, dim, spec.mean, spec.std, _tokenizer_factory(spec))
    backbone.source = spec.hub_name or spec.openclip_name  # named in the messages of refused checkpoints
    if checkpoint:
        load_checkpoint(backbone, checkpoint)
    return backbone.to(device)


def add_backbone_args(parser: argparse.ArgumentParser, default: str = "tiny"):
    """The --backbone / --pretrained / --device flags shared by every CLI."""
    parser.add_argument("--backbone", default=default, help=f"one of {', '.join(BACKBONES)} (default: {default})")
    parser.add_argument(
        "--pretrained",
        default="default",
        help="'default' (download through open_clip, cached), 'none' (random weights, offline), "
        "or a local open_clip weights file",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_backbone_or_exit(args) -> Backbone:
    """CLI helper: load the backbone named on the command line or print one sentence and exit with status 2."""
    try:
        return load_backbone(args.backbone, args.pretrained, args.device)
    except BackboneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Single-pass dense features at any resolution (E3): prints the "
        "patch grid, feature shape and time for a few image sizes."
    )
    add_backbone_args(parser)
    parser.add_argument(
        "--sizes", default="128x128,256x512,512x1024", help="comma-separated HxW sizes (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    backbone = load_backbone_or_exit(args)
    print(
        f"backbone {backbone.name}: patch {backbone.patch_size}, native window K={backbone.window}, "
        f"dim C={backbone.dim}, device {args.device}"
    )
    print(f"{'input HxW':>12} {'grid hxw':>10} {'features':>22} {'seconds':>8}")
    for size in args.sizes.split(","):
        H, W = (int(v) for v in size.lower().split("x"))
        x = backbone.normalize(torch.rand(1, 3, H, W, device=args.device))
        with torch.inference_mode(), autocast(args.device):
            backbone.dense(x)  # warm-up
            synchronize(args.device)
            t0 = time.perf_counter()
            feats = backbone.dense(x)
            synchronize(args.device)
            dt = time.perf_counter() - t0
        h, w = feats.shape[1:3]
        print(f"{H:>5}x{W:<6} {h:>4}x{w:<5} {str(tuple(feats.shape)):>22} {dt:8.3f}")


if __name__ == "__main__":
    main()
