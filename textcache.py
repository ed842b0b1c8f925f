"""The cache of segment.py's text embeddings t_q (not a part of the paper): computing them runs the text tower over
Q queries x 80 templates, seconds to minutes on a CPU, so they are kept in memory and on disk.

The key is the backbone's name, a fingerprint of its TEXT tower's weights, the queries and the templates: a
distilled checkpoint (which replaces only the image tower) shares the cache with its base model, random and real
weights never do.  A file is written atomically (`files.save_torch`), checked against its queries and templates
when read, and recomputed when it is corrupt; a cache that cannot be written is a warning, not an error.

    --text-cache DIR   (default: $SPAR_TEXT_CACHE, else $XDG_CACHE_HOME/spar/text, else ~/.cache/spar/text;
                        'none' or SPAR_TEXT_CACHE=none: no disk cache)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from files import WriteError, save_torch

CACHE_ENV = "SPAR_TEXT_CACHE"  # directory for cached text embeddings; "none" disables the disk cache
_MEMORY_CACHE: dict[str, torch.Tensor] = {}


def default_cache_dir() -> Path | None:
    """$SPAR_TEXT_CACHE, else $XDG_CACHE_HOME/spar/text, else ~/.cache/spar/text; None if the env var is 'none'."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return None if env.lower() == "none" else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spar" / "text"


def cache_dir_arg(value: str | None):
    """The --text-cache flag: unset -> True (the default folder), 'none' -> None (no disk cache), else the folder."""
    if value is None:
        return True
    return None if value.lower() == "none" else value


def text_weights_fingerprint(backbone) -> str:
    """A cheap identity of the TEXT tower's weights (everything outside `model.visual`).

    A distilled checkpoint only replaces the image tower, so it shares the cache with its base model, while
    random weights (`--pretrained none`) and real weights never do.  Every value counts (other weights of the
    same shapes are another key): per tensor, up to 256 evenly spaced values and its row and column sums, each
    weighted by position, in float64 on the device; one device->host copy, milliseconds on a GPU.
    """
    names, samples = [], []
    for name, p in backbone.model.named_parameters():
        if name.startswith("visual."):
            continue
        flat = p.detach().reshape(-1)
        grid = p.detach().reshape(p.shape[0] if p.dim() else 1, -1).double()
        rows, cols = (torch.arange(1, n + 1, device=p.device, dtype=torch.float64) for n in grid.shape)
        sums = torch.stack([(grid.sum(1) * rows).sum(), (grid.sum(0) * cols).sum(), grid.square().sum()])
        samples += [flat[:: max(1, flat.numel() // 256)][:256].double(), sums]
        names.append(f"{name}:{tuple(p.shape)}")
    h = hashlib.sha256("|".join(names).encode())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_key(backbone, queries: list[str], templates: list[str]) -> str:
    blob = json.dumps(
        {
            "backbone": backbone.name,
            "weights": text_weights_fingerprint(backbone),
            "precision": "fp32",
            "queries": queries,
            "templates": templates,
            **({"tokenizer": "stand-in"} if getattr(getattr(backbone, "_tokenizer", None), "stand_in", False) else {}),
        },
        ensure_ascii=False,
    )
    return f"{backbone.name}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


def usable(emb, num_queries: int, dim: int | None = None) -> bool:
    """A cached (Q, C) float tensor of finite numbers, one row per query, C = `dim` (the backbone's width)."""
    ok = torch.is_tensor(emb) and emb.dim() == 2 and emb.shape[0] == num_queries and emb.is_floating_point()
    return ok and (dim is None or emb.shape[1] == dim) and bool(torch.isfinite(emb).all())


def cached(backbone, queries: list[str], templates: list[str], cache_dir, compute) -> torch.Tensor:
    """The (Q, C) embeddings of `queries`: from memory, else from `cache_dir` (True -> `default_cache_dir()`,
    None/False -> no disk cache), else `compute()`, kept in memory and saved."""
    key = _cache_key(backbone, queries, templates)
    if cache_dir is True:
        cache_dir = default_cache_dir()
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None

    emb = _MEMORY_CACHE.get(key)
    if emb is None and path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            emb = (
                saved["embeddings"] if saved.get("queries") == queries and saved.get("templates") == templates else None
            )
            if emb is not None and not usable(emb, len(queries), backbone.dim):
                print(
                    f"warning: the text cache '{path}' is damaged (not finite, or not (Q, C) with C = {backbone.dim}, "
                    f"{backbone.name}'s width: made by another backbone?); recomputing.",
                    file=sys.stderr,
                )
                emb = None
        except Exception:  # a corrupt cache file is simply recomputed
            emb = None
    if emb is None:
        emb = compute().cpu()
        if path is not None:
            try:
                save_torch(path, {"queries": queries, "templates": templates, "embeddings": emb})
            except WriteError as exc:
                print(f"warning: the text cache is not saved ({exc}); continuing.", file=sys.stderr)
    _MEMORY_CACHE[key] = emb
    return emb
