"""Image references of a pair record: ``cache:<record id>`` (a row of a token cache) or a file path, and the codes
they stand for.

    ref "cache:abc"        -> TokenCache["abc"]                                   (N,) int64 codes
    ref "imgs/1.png"       -> root/imgs/1.png (absolute paths kept), encoded once by an image tokenizer

``image_problem(path)`` is the cheap check validation runs on a path: exists, and PIL reads the header and verifies the
file (``Image.verify``: checksums/structure, no full decode). ``ImageCodes`` resolves refs to codes for batching.

    python -m pytest -q tests/data/test_validate.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from hermesflow_fast.data.pairs import CACHE_PREFIX

__all__ = ["ImageCodes", "cache_id", "image_problem", "resolve_path"]


def cache_id(ref: str) -> str | None:
    """The token-cache record id of a ``cache:<id>`` ref, None for a path."""
    return ref[len(CACHE_PREFIX):] if ref.startswith(CACHE_PREFIX) else None


def resolve_path(ref: str, root: str | os.PathLike) -> Path:
    """The file a path ref names: relative to ``root`` (the JSONL file's folder), absolute paths as they are."""
    p = Path(ref)
    return p if p.is_absolute() else Path(root) / p


def image_problem(path: Path) -> str | None:
    """None if ``path`` is an image file PIL can open and verify; else the reason (``"missing: …"`` when it does not
    exist, ``"unreadable: …"`` otherwise)."""
    if not path.is_file():
        return f"missing: {path} does not exist"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), SyntaxError (bad chunk), …
        return f"unreadable: {path} ({type(exc).__name__}: {exc})"
    return None


class ImageCodes:
    """``codes(ref) -> (N,) int64``: ``cache:`` refs from ``token_cache``; path refs (relative to ``root``) loaded and
    encoded by ``image_tokenizer`` (an ImageTokenizer) once and remembered. A ref neither can serve is a KeyError
    naming it."""

    def __init__(self, root: str | os.PathLike, token_cache: Any = None, image_tokenizer: Any = None) -> None:
        self.root, self.token_cache, self.image_tokenizer = Path(root), token_cache, image_tokenizer
        self._encoded: dict[Path, Tensor] = {}

    def __call__(self, ref: str) -> Tensor:
        rid = cache_id(ref)
        if rid is not None:
            if self.token_cache is None:
                raise KeyError(f"image ref {ref!r} names a token cache, but none was given")
            return self.token_cache[rid]
        path = resolve_path(ref, self.root)
        if path not in self._encoded:
            if self.image_tokenizer is None:
                raise KeyError(f"image ref {ref!r} is a path ({path}) and no image tokenizer was given; tokenize the "
                               f"images into a token cache (hermesflow tokenize) and refer to them as cache:<id>")
            from hermesflow_fast.model.tokenizer_vq import load_image

            tok = self.image_tokenizer
            x = load_image(path, tuple(tok.image_size), bool(tok.convert_to_rgb))
            self._encoded[path] = tok.encode(x[None].to(tok.device))[0].cpu().long()
        return self._encoded[path]
