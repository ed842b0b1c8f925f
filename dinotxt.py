"""DINOv3.txt (dino.txt on DINOv3 ViT-L/16): the model behind the DINOv3.txt rows of Table 1 (not a part of the
method; `student.DINOv3Backbone` is its dense head).

* `DinoTxt`        -- the vision trunk (timm `vit_large_patch16_dinov3_qkvb`: 24 blocks, width 1024, 16 heads, CLS +
                      4 registers, RoPE, layer-scale, q/v bias) and the dino.txt text tower, written here in plain
                      PyTorch with the parameter names of the released checkpoint so that it loads strictly;
* `CONFIGS`        -- `dinov3-l16` (the real sizes) and `dinov3-tiny` (the same code path, 2 blocks, width 64, seeded:
                      for tests and laptops);
* `released_state` -- the released layout (dino.txt / the authors' SPAR DINOv3-TXT file) -> `DinoTxt`'s names:
                      `[model.]visual_model.backbone.*` (Meta's DINOv3 names, mapped by timm's own checkpoint filter),
                      `[model.]visual_model.head.*` (dino.txt's vision head: declared and ignored -- the dense
                      features do not use it), `[model.]text_model.*`, `[model.]logit_scale`;
* `build_dinotxt`  -- random weights (`--pretrained none`) or local files (`--pretrained FILE[,FILE]`).

Facts from facebookresearch/dinov3 (`dinov3/hub/dinotxt.py`, `dinov3/eval/text/text_tower.py`,
`text_transformer.py`, `dinov3/layers/block.py`, `attention.py`): causal text transformer, context 77, vocabulary
49,408, width 1280, 20 heads, 24 layers, MLP x4, GELU, LayerNorm, no layer-scale; pooled at the end-of-text token
(the largest token id: `argmax`), then a 1280 -> 2048 projection without bias.  The 2048-d embedding is two halves:
the first is trained against the CLS token, the second against the pooled patch tokens; dense features use the
second (the authors' wrapper: `[:, 1024:]`).  The tokenizer is CLIP's BPE (the one inside open_clip).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import BackboneError, _read_torch_file, _state_mismatch, not_a_file, seeded

CONFIGS = {
    "dinov3-l16": dict(
        timm_name="vit_large_patch16_dinov3_qkvb",
        vision={},
        text=dict(context=77, vocab=49408, width=1280, heads=20, layers=24),
        embed_dim=2048,
        seed=0,  # --pretrained none: the same random weights in every run
    ),
    "dinov3-tiny": dict(
        timm_name="vit_large_patch16_dinov3_qkvb",
        vision=dict(embed_dim=64, depth=2, num_heads=4),
        text=dict(context=77, vocab=49408, width=64, heads=4, layers=2),
        embed_dim=128,
        seed=0,
    ),
}
VISION, HEAD = "visual_model.backbone.", "visual_model.head."  # the released layout's vision parts
RELEASED_KEYS = (VISION, HEAD, "text_model.", "logit_scale")


class CausalAttention(nn.Module):
    """dinov3.layers.CausalSelfAttention: one fused q/k/v projection without bias, causal SDPA, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TextBlock(nn.Module):
    """dinov3.layers.CausalSelfAttentionBlock (pre-norm, no layer-scale), parameter names kept."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, causal blocks, final LayerNorm: (N, L) ids -> (N, L, width)."""

    def __init__(self, context: int, vocab: int, width: int, heads: int, layers: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class TextHead(nn.Module):
    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.linear_projection = nn.Linear(width, embed_dim, bias=False)


class TextTower(nn.Module):
    """dino.txt's text model: the transformer, pooled at the end-of-text token, projected to the joint space."""

    def __init__(self, text: dict, embed_dim: int):
        super().__init__()
        self.backbone = TextTransformer(**text)
        self.head = TextHead(text["width"], embed_dim)
        self.embed_dim = embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.backbone(tokens)
        x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token (largest id)
        return self.head.linear_projection(x)  # (N, embed_dim)


class DinoTxt(nn.Module):
    """The dino.txt model as `student.Backbone` uses it: `.visual` (the timm trunk), `.encode_text`."""

    def __init__(self, cfg: dict):
        super().__init__()
        import timm

        self.visual = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, **cfg["vision"])
        self.text_model = TextTower(cfg["text"], cfg["embed_dim"])
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 77) ids -> (N, embed_dim / 2): the SECOND half of the text embedding, the half aligned with the
        patch tokens (the first is aligned with the CLS token)."""
        return self.text_model(tokens)[:, self.text_model.embed_dim // 2 :]

    def released_state(self, state: dict) -> dict:
        """A state dict in the released layout, in this model's names (`checkpoints.load_checkpoint` calls it)."""
        return released_state(state, self)


def released_state(state: dict, model: DinoTxt) -> dict:
    """A state dict in the released layout -> `model`'s names.  The backbone part goes through timm's checkpoint
    filter for DINOv3 (storage_tokens -> reg_token, ls1.gamma -> gamma_1, qkv.bias -> q_bias + v_bias with the
    zero k part dropped, rope periods and the pre-training mask token discarded); the vision head is dropped."""
    from timm.models.eva import checkpoint_filter_fn

    state = {k.removeprefix("model."): v for k, v in state.items()}
    vision = {k[len(VISION) :]: v for k, v in state.items() if k.startswith(VISION)}
    out = {"visual." + k: v for k, v in checkpoint_filter_fn(vision, model.visual).items()} if vision else {}
    out.update({k: v for k, v in state.items() if not k.startswith((VISION, HEAD))})
    return out


def is_meta_backbone(state: dict) -> bool:
    """Meta's stand-alone DINOv3 backbone file (`dinov3_vitl16_pretrain_*.pth`): its names, no prefix."""
    return "storage_tokens" in state and "patch_embed.proj.weight" in state


def build_dinotxt(spec, pretrained) -> DinoTxt:
    """`DinoTxt` of a `checkpoints.BackboneSpec`, eval mode, frozen.  pretrained: None / "none" -> random (seeded:
    the same in every run); a file in the released layout; or "BACKBONE.pth,DINOTXT.pth" -- Meta's DINOv3 backbone file
    plus its dino.txt vision-head-and-text-encoder file (then joined into the released layout)."""
    cfg = CONFIGS[spec.name]
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    if pretrained == "default":
        raise BackboneError(
            f"{spec.name} has no download through open_clip or timm (Meta's dino.txt files need their licence); "
            f"pass --pretrained BACKBONE.pth,DINOTXT.pth (Meta's two files) or a file in the released layout, "
            f"segment.py / evaluate.py --checkpoint the authors' SPAR DINOv3-TXT file, or --pretrained none."
        )
    with seeded(cfg["seed"]):
        model = DinoTxt(cfg)
    if pretrained is not None:
        load_released_files(model, spec.name, pretrained)
    return model.eval().requires_grad_(False)


def load_released_files(model: DinoTxt, name: str, pretrained: str):
    """--pretrained FILE or BACKBONE,DINOTXT into `model`, strictly (every key, every shape, checked first)."""
    paths = [pretrained] if os.path.isfile(pretrained) else pretrained.split(",")
    state = {}
    for path in paths:
        if not os.path.isfile(path):
            raise BackboneError(f"cannot load {name}: weights file '{path}' {not_a_file(path)}.")
        obj = _read_torch_file(path, "weights file")
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise BackboneError(f"cannot load {name}: '{path}' is not a state dict of tensors.")
        state.update({VISION + k: v for k, v in obj.items()} if is_meta_backbone(obj) else obj)
    if not any(k.removeprefix("model.").startswith(RELEASED_KEYS) for k in state):
        raise BackboneError(
            f"cannot load {name}: '{paths[-1]}' is not in the dino.txt layout (no 'visual_model.*' / "
            f"'text_model.*' keys); pass Meta's backbone and dino.txt files or the released SPAR DINOv3-TXT file."
        )
    state = released_state(state, model)
    problem = _state_mismatch(model.state_dict(), state)
    if problem:
        raise BackboneError(f"cannot load {name}: {', '.join(paths)} does not match its architecture ({problem}).")
    model.load_state_dict(state)
