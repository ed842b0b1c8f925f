"""Backbones and the single-pass, any-resolution student (SPAR, CVPR 2026, Sec. 3, Fig. 2 student branch).

The student is the pre-trained ViT itself, run ONCE on the whole image at any resolution:

    (E3)  F_S = f_theta(x),  with the absolute position embeddings resized from g x g to h x w

where g = K / p is the native (pre-training) grid and h x w is the patch grid of the input.  The grid follows the
authors' wrapper of each backbone (`Backbone.grid_rule`): SigLIP2 (and `tiny`) zero-pad to the ceil grid
ceil(H/p) x ceil(W/p); OpenCLIP crops to the floor grid floor(H/p) x floor(W/p) (the last < p rows/columns are
not seen); DINOv3 resizes (bicubic) UP to the ceil grid.  This file holds:

* `resize_pos_embed`  -- (E3): bicubic, mode "size" (SigLIP2) or "scale+0.1" (OpenCLIP); identity at the native grid;
* `Backbone`          -- the common interface (`normalize`, `grid_size`, `fit_to_grid`, `dense`, `encode_text`, ...);
* `SigLIPBackbone`, `OpenCLIPBackbone` -- dense heads: the attention pool's value path; MaskCLIP's last-block one;
* `DINOv3Backbone`, `NaFlexBackbone` -- DINOv3.txt's last-layer patch tokens; the SigLIP2 NaFlex single pass;
* `load_backbone`     -- by name (weights, `load_checkpoint`: checkpoints.py, dinotxt.py, naflex.py); `autocast`,
                         `PRECISIONS`, `synchronize`, `timed` are cli.py's, re-exported for every CLI.

Run `python student.py --backbone tiny` to see the dense-feature shapes and timings at a few resolutions.
"""

import math

import _startup  # noqa: F401 (first: Ctrl-C or SIGTERM during the imports exits 130)
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import cli
from checkpoints import BACKBONES, BackboneError, load_checkpoint, open_clip_model, tokenizer_factory  # noqa: F401
from cli import ArgumentParser, add_backbone_args, autocast, main_guard, parse_size, timed
from dinotxt import build_dinotxt
from naflex import DEFAULT_PATCHES, build_naflex, naflex_grid

# ----------------------------------------------------------------------------------------------------------------
# (E3) the single pass: position-embedding resize, the backbone interface, the two dense heads
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
      (i + 0.5) * old / new - 0.5.
    * mode="scale+0.1" (OpenCLIP, the authors' wrapper, from DINO): `F.interpolate(scale_factor=(new + 0.1) / old)`.
      The +0.1 makes the output size floor(old * scale) land on `new` despite float rounding; PyTorch then maps
      cell i to (i + 0.5) * old / (new + 0.1) - 0.5, a slightly different resize from mode="size".
    At the native grid both return `pos` untouched, as the authors' `interpolate_pos_encoding` does (DINO's
    `if npatch == N and w == h: return pos_embed`): a K x K image gives the unmodified model's features.
    """
    if mode not in POS_RESIZE_MODES:
        raise ValueError(f"unknown position-embedding resize mode '{mode}'; choose one of {POS_RESIZE_MODES}.")
    if tuple(old_hw) == tuple(new_hw):  # the native grid: no resize, in both modes
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


class Backbone(nn.Module):
    """A frozen-or-trainable vision-language ViT that gives dense, text-aligned features at any resolution.

    `grid_rule`: "ceil" zero-pads to ceil(H/p) x ceil(W/p), "floor" crops to floor(H/p) x floor(W/p), "resize"
    interpolates up to the ceil grid (`resize`: how), as the authors' wrapper of each backbone does.  Subclasses
    implement `dense` and `blocks`; `build(spec, pretrained)` makes the model (weights: checkpoints.py).
    """

    grid_rule, resize = "ceil", dict(mode="bicubic", align_corners=False)
    build = staticmethod(open_clip_model)
    patch_size: int = 16  # p, the same for every backbone here

    def __init__(self, model: nn.Module, spec, dim: int):
        super().__init__()
        self.model = model  # the open_clip model: image tower `model.visual`, text tower `model.encode_text`
        self.name = spec.name
        self.window = spec.window  # K, the native resolution
        self.dim = dim  # C
        self.mean = tuple(spec.mean)
        self.std = tuple(spec.std)
        self.source = spec.hub_name or spec.openclip_name  # named in the messages of refused checkpoints
        self._tokenizer = tokenizer_factory(spec)  # loaded on first use, then cached
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def native_grid(self) -> tuple[int, int]:
        g = self.window // self.patch_size
        return (g, g)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the normalised input the model was trained on (uint8 / 0..255: UserError)."""
        cli.check_unit_images(images, "Backbone.normalize")
        return (images.to(self._mean.dtype) - self._mean) / self._std

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """Patch grid of an H x W image: (ceil(H/p), ceil(W/p)) or, for grid_rule "floor", (floor(H/p),
        floor(W/p)) -- at least 1 x 1, so an image side shorter than one patch is zero-padded instead of empty."""
        p = self.patch_size
        if self.grid_rule == "floor":
            return max(H // p, 1), max(W // p, 1)
        return math.ceil(H / p), math.ceil(W / p)

    def fit_to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, h*p, w*p) with (h, w) = grid_size(H, W): zero-pad bottom/right (ceil rule),
        crop bottom/right (floor rule) or interpolate the whole image (resize rule)."""
        H, W = x.shape[-2:]
        h, w = self.grid_size(H, W)
        Hg, Wg = h * self.patch_size, w * self.patch_size
        if self.grid_rule == "resize":  # linear in x, so resizing before or after `normalize` is the same
            return x if (Hg, Wg) == (H, W) else F.interpolate(x, size=(Hg, Wg), **self.resize)
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
        return self._tokenizer()

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (un-normalised) text embeddings, (N, C), in the same space as `dense`; one str is one prompt."""
        out, texts = [], cli.prompt_list(texts)
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
        x = trunk.patch_embed.proj(x)  # (B, C, h, w); not patch_embed(x), which asserts the native size
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
        tokens, (h, w) = self.tokens(x)
        return self.head(tokens).unflatten(1, (h, w))  # (B, h, w, C)


class OpenCLIPBackbone(Backbone):
    """OpenCLIP ViT (CLS token, `nn.MultiheadAttention` blocks, `ln_post`, `proj`).

    Dense head (MaskCLIP, used as the OpenCLIP baseline in the paper): blocks 0..L-2 unchanged; in the last
    block the self-attention is replaced by its value path, x = x + out_proj(V(ln_1(x))), then
    x = x + mlp(ln_2(x)); `ln_post`, `@ proj`, drop the CLS token.  As in the authors' wrapper: no padding (floor
    grid), the CLS position embedding kept as is and only the patch part resized, DINO-style ("scale+0.1"; none
    at the native 14 x 14 grid).
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
        seq_first = not getattr(vis.transformer, "batch_first", True)  # an open_clip built sequence-first
        x = x.transpose(0, 1) if seq_first else x
        for blk in self.blocks[:-1]:
            x = blk(x)
        x = x.transpose(0, 1) if seq_first else x
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
        w, b = attn.in_proj_weight[2 * C :], attn.in_proj_bias  # V: the last third of the in-projection
        v = F.linear(blk.ln_1(x), w, b[2 * C :] if b is not None else None)
        x = x + blk.ls_1(attn.out_proj(v))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class DINOv3Backbone(Backbone):
    """DINOv3 ViT-L/16 + dino.txt's text tower (dinotxt.py); dense head (the authors'): the last block's patch tokens
    after the final norm, no CLS, registers or vision head.  (E3): nothing to resize, RoPE uses normalised coords."""

    grid_rule, build = "resize", staticmethod(build_dinotxt)  # bicubic up to the ceil grid, never padded

    @property
    def blocks(self):
        return self.model.visual.blocks

    def dense(self, x):
        x, trunk, p = self.fit_to_grid(x), self.model.visual, self.patch_size
        tokens = trunk.forward_features(x)  # (B, 5 + h*w, C): patch embed, RoPE for h x w, blocks, final norm
        return tokens[:, trunk.num_prefix_tokens :].unflatten(1, (x.shape[-2] // p, x.shape[-1] // p))


class NaFlexBackbone(SigLIPBackbone):
    """SigLIP2 NaFlex B/16 (naflex.py), single pass only: the image resized, aspect kept, to the largest grid within
    `max_patches` patches (None: its ceil grid); timm resizes the 16 x 16 position grid to it.  Head: SigLIP2's."""

    grid_rule, build, slides, max_patches = "resize", staticmethod(build_naflex), False, DEFAULT_PATCHES
    resize = dict(mode="bilinear", align_corners=False, antialias=True)  # as the reference preprocessing

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        return naflex_grid(H, W, self.max_patches, self.patch_size)

    def tokens(self, x):
        x, p = self.fit_to_grid(x), self.patch_size  # one image size per batch: no padding, no mask needed
        return self.trunk.forward_features(x), (x.shape[-2] // p, x.shape[-1] // p)


# ----------------------------------------------------------------------------------------------------------------
# Plumbing every CLI shares: loading a backbone by name
# ----------------------------------------------------------------------------------------------------------------


def load_backbone(
    name: str, pretrained: str | None = "default", device: str | torch.device = "cpu", checkpoint: str | None = None
) -> Backbone:
    """Build a backbone by name.

    name:        'siglip2-b16' | 'clip-b16' | 'tiny' | 'dinov3-l16' | 'dinov3-tiny' | 'siglip2-naflex-b16'
    pretrained:  'default' -> the paper's weights through open_clip (needs internet the first time; cached);
                 None      -> the exact architecture with random weights, no network;
                 a path    -> a local open_clip weights file (state dict) for that architecture.
    checkpoint:  optional distilled student (`load_checkpoint`): our student.pt from `distill.py` replaces the
                 image tower (the base weights then only give the text tower, so pass the same `pretrained` as
                 for distilling); the authors' released .pth / .ckpt replace the whole model (image AND text).
    The model is returned in eval mode with gradients disabled; `distill.py` unfreezes what it trains.
    """
    device = checkpoints.check_load_args(
        name, pretrained, device, checkpoint
    )  # one sentence for a wrong type or device
    spec = BACKBONES[name]
    kinds = dict(siglip=SigLIPBackbone, openclip=OpenCLIPBackbone, dinov3=DINOv3Backbone, naflex=NaFlexBackbone)
    cls = kinds[spec.kind]
    model = cls.build(spec, pretrained)  # the model its `dense` and `encode_text` run
    backbone = cls(model, spec, checkpoints.model_width(spec, model))
    backbone.random_weights = checkpoints.random_weights(name, pretrained)  # the authors' files clear it
    if checkpoint:
        load_checkpoint(backbone, checkpoint)
    if backbone.random_weights:  # offline: a stand-in for a tokenizer that needs a download (checkpoints.py)
        backbone._tokenizer = tokenizer_factory(spec, True, getattr(model, "context_length", None))
    return backbone.to(device)


def _run(argv):
    parser = ArgumentParser(
        description="Single-pass dense features at any resolution (E3): grid, shape, time per size."
    )
    add_backbone_args(parser, BACKBONES)
    parser.add_argument("--sizes", default="128x128,256x512,512x1024", help="HxW sizes, comma-separated (%(default)s)")
    args = parser.parse_args(argv)
    sizes = [parse_size(size, "each size in --sizes") for size in args.sizes.split(",")]
    backbone = load_backbone(args.backbone, args.pretrained, args.device)  # the device checked there, first
    print(
        f"backbone {backbone.name}: patch {backbone.patch_size}, native window K={backbone.window}, "
        f"dim C={backbone.dim}, device {args.device}"
    )
    [cli.check_memory(H, W, backbone.patch_size, backbone.dim, backbone.device, "a single pass at") for H, W in sizes]
    print(f"{'input HxW':>12} {'grid hxw':>10} {'features':>22} {'seconds':>8}")
    for H, W in sizes:
        x = backbone.normalize(torch.rand(1, 3, H, W, device=backbone.device))
        with torch.inference_mode(), autocast(backbone.device):
            feats, dt = timed(lambda: backbone.dense(x), backbone.device)
        h, w = feats.shape[1:3]
        print(f"{H:>5}x{W:<6} {h:>4}x{w:<5} {str(tuple(feats.shape)):>22} {dt:8.3f}")


def main(argv=None):
    return main_guard(_run, argv)


if __name__ == "__main__":
    main()
