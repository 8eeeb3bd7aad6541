"""Reading what a user gives the command line: latent files and precomputed text embeddings.

Only tensors are read: `.pt`/`.pth` files load with weights_only=True and `.npy` without pickles, so a
file can never run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import LatentError, TextEmbeddingError
from .plan import LatentMeta


def load_latent_file(path: str) -> tuple[torch.Tensor, LatentMeta]:
    """A latent from .safetensors / ComfyUI .latent (key latent_tensor), .pt/.pth (weights only) or .npy,
    and what travels with it: optional `pid_sigma` (a scalar or one value per sample) and
    `pid_latent_format` tensors."""
    if not os.path.exists(path):
        raise LatentError(f"Latent file not found: {path}")
    try:
        if path.endswith((".safetensors", ".latent")):
            from safetensors.torch import load_file

            tensors = load_file(path)
        elif path.endswith(".npy"):
            import numpy as np

            tensors = {"latent": torch.from_numpy(np.load(path, allow_pickle=False))}
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            tensors = loaded if isinstance(loaded, dict) else {"latent": loaded}
    except Exception as exc:
        raise LatentError(f"Could not read the latent file {path}: {exc}") from None
    meta = LatentMeta(sigma=tensors.get("pid_sigma"), source=os.path.basename(path))
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return tensors[_latent_key(path, shapes)], meta


def _latent_key(path: str, shapes: dict[str, tuple]) -> str:
    """Which tensor of a latent file is the latent: a known key, else the one tensor of 4+ dims."""
    for key in ("latent_tensor", "samples", "latent"):
        if key in shapes:
            return key
    candidates = [k for k, shape in shapes.items() if len(shape) >= 4 and not k.startswith("pid_")]
    if len(candidates) != 1:
        raise LatentError(f"{path} should hold one latent tensor (key 'latent' or 'samples'); found keys {list(shapes)}.")
    return candidates[0]


def latent_file_shape(path: str) -> tuple[int, ...]:
    """The shape of the latent in a file (as load_latent_file reads it), from the file's header where the
    format has one (.safetensors, .latent, .npy): cheap enough to size thousands of files."""
    if not os.path.exists(path):
        raise LatentError(f"Latent file not found: {path}")
    try:
        if path.endswith((".safetensors", ".latent")):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes[_latent_key(path, shapes)]
        if path.endswith(".npy"):
            import numpy as np

            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except LatentError:
        raise
    except Exception as exc:
        raise LatentError(f"Could not read the latent file {path}: {exc}") from None
    return tuple(load_latent_file(path)[0].shape)


def load_text_embedding(path: str | os.PathLike) -> torch.Tensor:
    """Read a precomputed text embedding: .safetensors, .pt/.pth (tensors only) or .npy.

    A file with several tensors must name the one to use "text_embedding". The result is not
    validated: pass it to validate_text_embedding() with the network's width.
    """
    path = Path(path)
    if not path.is_file():
        raise TextEmbeddingError(f"Text embedding file not found: {path}. Check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth"):
            # weights_only: a pickle can run code on load; a text embedding never needs more than tensors.
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(str(path), allow_pickle=False))
        else:
            raise TextEmbeddingError(
                f"{path.name}: unsupported text embedding file type '{suffix}'. Use .safetensors, .pt/.pth or .npy."
            )
    except TextEmbeddingError:
        raise
    except Exception as e:  # corrupt file, pickled objects, object arrays, ...
        raise TextEmbeddingError(
            f"Could not read the text embedding {path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "The file must hold a plain tensor (no pickled Python objects): re-save it with "
            "safetensors.torch.save_file({'text_embedding': t}, path) or numpy.save."
        ) from e

    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if "text_embedding" in tensors:
            data = tensors["text_embedding"]
        elif len(tensors) == 1:
            data = next(iter(tensors.values()))
        else:
            raise TextEmbeddingError(
                f"{path.name} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); name the text "
                "embedding 'text_embedding' or save it alone."
            )
    if not isinstance(data, torch.Tensor):
        raise TextEmbeddingError(
            f"{path.name} holds a {type(data).__name__}, not a tensor. Save the embedding tensor itself."
        )
    return data
