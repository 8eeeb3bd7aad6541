"""Reading what a user gives: checkpoints, latent files and precomputed text embeddings.

A file's kind is read from its first bytes, never from its name (`sniff`): a .safetensors file named
.pth loads, and a download that saved a web page or a Git LFS pointer is named as such. Only tensors
are read: PyTorch files load with weights_only=True and numpy files without pickles, so a file can
never run code (docs/DESIGN.md §13).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LatentError, PidError, TextEmbeddingError
from .file_damage import what_is_wrong
from .latent_formats import Flux2BNStats, flux2_bn_stats_from_state_dict
from .latents import LatentMeta
from .wording import library_detail, term

log = logging.getLogger("pid_core")


@dataclass(frozen=True)
class FileRole:
    """What a file is for, for messages: its name, the error to raise, how to re-save it with tensors
    only, where to look for it when it is missing, and where to look when given a folder."""

    what: str
    error: type = PidError
    resave: str = ""
    place: str = "the path"  # what to check when the file is missing (a wording term where readers differ)
    folder_hint: str = ""
    image_hint: str = ""  # what to do when given an image instead
    text_hint: str = ""  # what to do when given a text file instead


CHECKPOINT_FILE = FileRole(
    "checkpoint", CheckpointError, "Use the official model_ema_bf16.pth or a repackaged .safetensors file.",
    place=term.checkpoint_place, folder_hint=" (for the official release: checkpoints/<experiment>/model_ema_bf16.pth)")
LATENT_FILE = FileRole(
    "latent file", LatentError,
    "Save the latent as a tensor: safetensors.torch.save_file({'latent': t}, path), torch.save(t, path) or numpy.save.",
    image_hint=" PiD decodes latents: encode the image with its model's VAE first (PiD Encode-Degrade in ComfyUI "
               "does that to upscale an image).")
TEXT_EMBEDDING_FILE = FileRole(
    "text embedding file", TextEmbeddingError,
    "Re-save it with safetensors.torch.save_file({'text_embedding': t}, path) or numpy.save.",
    text_hint=" A prompt is encoded by the Gemma-2-2b-it text encoder (a prompt and a text encoder instead of an "
              "embedding).")

# The first bytes of image files, to name an image given where a tensor file belongs.
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))

# What torch.save writes first in its legacy (non-zip) format: its magic number, pickled as a LONG1.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@contextlib.contextmanager
def _library_warnings_to_debug_log(name: str):
    """Warnings the libraries raise while we read a file (torch's "Detected pickle protocol 4 ...", numpy's,
    ...) go to the debug log (the command line's --verbose), never ahead of our own one-line message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                log.debug("while reading %s: %s: %s", name, warning.category.__name__, warning.message)

FLUX2_VAE_FILE = FileRole(
    "FLUX.2 VAE file", LatentError,
    "Give the FLUX.2 VAE (flux2-vae.safetensors), or a file of its bn.running_mean and bn.running_var.")

def unreadable(path, kind: str, exc: BaseException, role: FileRole) -> PidError:
    """The role's error for a file of a known kind that its reader could not read: the cause in our words
    from the file's structure (truncated, damaged), else our sentence with the reader's words after it."""
    name = os.path.basename(str(path))
    wrong = what_is_wrong(str(path), kind, exc)
    if wrong:
        return role.error(f"{name} {wrong}: download or save it again.")
    fmt = {"safetensors": "safetensors", "numpy": "numpy", "numpy-archive": "numpy"}.get(kind, "a PyTorch file")
    return role.error(f"{name} could not be read as {fmt}, so it is damaged or not such a file: download or save it "
                      f"again{library_detail(exc)}.")


def sniff(path, role: FileRole) -> str:
    """The kind of a tensor file, from its content: "safetensors", "torch" (zip), "torch-legacy" (a pickle),
    "numpy" (.npy) or "numpy-archive" (.npz).

    Raises the role's error naming the real cause for anything else: a missing path, a folder, an empty or
    unreadable file, a GGUF file, a Git LFS pointer, a web page saved by a failed download, or content
    of no known kind, each message naming the file by its role."""
    what, error = role.what, role.error
    if path is None or str(path) == "":
        raise error(f"No {what} was given: pass the path of the file.")
    path = str(path)
    name = os.path.basename(path) or path
    if not os.path.exists(path):
        raise error(f"{what[0].upper()}{what[1:]} not found: {path}. Check {role.place}.")
    if os.path.isdir(path):
        raise error(f"{path} is a folder, not a {what}. Give the file itself{role.folder_hint}.")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise error(f"The {what} {name} cannot be read ({exc.strerror or exc}). Check its permissions.") from None
    if not head:
        raise error(f"{name} is empty (0 bytes), an interrupted download or copy: get the {what} again.")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"  # a damaged archive: the loader names it
        if names and all(n.endswith(".npy") for n in names):
            return "numpy-archive"
        if not any(n.endswith("data.pkl") for n in names):  # torch.save's zip holds <archive>/data.pkl
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise error(f"{name} is a zip archive ({shown or 'empty'}), not a {what} written by torch.save: unpack it "
                        "and give the file inside, or get the file again.")
        return "torch"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        if _TORCH_LEGACY_MAGIC in head[:32]:
            return "torch-legacy"  # PyTorch's format before zip files: its magic number, then pickles
        raise error(f"{name} is a plain Python pickle (pickle.dump), not a {what} written by torch.save, safetensors "
                    f"or numpy, so it was not read: unpickling it could run arbitrary code. {role.resave}".rstrip())
    if head.startswith(b"GGUF"):
        raise error(f"{name} is a GGUF file (quantized weights for ComfyUI-GGUF), not a {what} this pack reads. "
                    "Use the .safetensors or .pth file.")
    if head.startswith(b"version https://git-lfs"):
        raise error(f"{name} is a Git LFS pointer (a small text file standing in for the real one), not the {what}: "
                    "fetch the real file (git lfs pull, or download it from its Hugging Face page).")
    if head.lstrip()[:14].lower().startswith((b"<!doctype html", b"<html")):
        raise error(f"{name} is a web page, not a {what}: the download saved an error or login page. "
                    "Download the file again (gated files need a Hugging Face login).")
    image = next((fmt for magic, fmt in _IMAGE_MAGIC if head.startswith(magic)), None)
    if image is None and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        image = "WebP"
    if image:
        raise error(f"{name} is a {image} image, not a {what}.{role.image_hint}")
    if _looks_like_text(head):
        raise error(f"{name} is a text file (it starts with {head[:24].decode('utf-8', 'replace')!r}), not a "
                    f"{what}.{role.text_hint}")
    raise error(f"{name} is not a {what}: its content is neither safetensors, PyTorch nor numpy "
                f"(it starts with {head[:12]!r}).")


def _looks_like_text(head: bytes) -> bool:
    """Printable UTF-8 (a prompt, JSON, a README), allowing a character cut off at the end."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[:exc.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\r\n\t" for c in text)


def read_tensor_file(path, role: FileRole, *, device="cpu") -> Any:
    """The tensors of a file of any kind `sniff` knows: a dict of tensors (safetensors, PyTorch dicts,
    numpy archives), a tensor (numpy arrays, PyTorch tensors), or what else a PyTorch file holds.

    Never runs code: a PyTorch file that needs more than tensors to unpickle is refused, with the role's
    way to re-save it as the fix. A damaged file of a known kind is called truncated or corrupt."""
    kind = sniff(path, role)
    error, resave = role.error, role.resave
    path = str(path)
    name = os.path.basename(path)
    try:
        with _library_warnings_to_debug_log(name):
            if kind == "safetensors":
                from safetensors.torch import load_file

                return load_file(path, device=str(device))
            if kind in ("numpy", "numpy-archive"):
                return _read_numpy(path, name, role)
            return _read_torch(path, device, mmap=kind == "torch")
    except PidError:
        raise
    except Exception as exc:  # noqa: BLE001 - every library error becomes one message
        if kind.startswith("torch") and "Unsupported operand" in str(exc):
            # pickle instructions of protocol 4+ (torch.save(..., pickle_protocol=4)), which the safe loader lacks
            raise error(f"{name} was saved with a pickle protocol that PyTorch's safe loader (tensors only) cannot read "
                        f"(torch.save's pickle_protocol above 2), so it was not loaded: loading it otherwise could run "
                        f"arbitrary code. {resave}".rstrip()) from None
        if kind.startswith("torch") and ("Weights only load failed" in str(exc) or "Unsupported global" in str(exc)):
            # The advice in torch's own message (weights_only=False) would run the file's code: never passed on.
            raise error(f"{name} holds pickled Python objects, not only tensors, so it was not loaded: unpickling "
                        f"it could run arbitrary code. {resave}".rstrip()) from None
        raise unreadable(path, kind, exc, role) from None


def _read_torch(path: str, device, *, mmap: bool):
    if path.lower().endswith(".safetensors"):  # torch.load reads such a name as safetensors, whatever it holds
        with open(path, "rb") as f:
            return torch.load(f, map_location=device, weights_only=True)
    if mmap:  # zip files map into memory instead of being copied
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location=device, weights_only=True)


def _read_numpy(path: str, name: str, role: FileRole):
    import numpy as np

    error, resave = role.error, role.resave
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise error(f"{name} holds Python objects, not numbers, so it was not loaded: unpickling them could "
                        f"run arbitrary code. {resave}".rstrip()) from None
        raise
    arrays = {k: loaded[k] for k in loaded.files} if hasattr(loaded, "files") else {None: loaded}
    out = {}
    for key, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise error(f"{name} holds {array.dtype} values, not real numbers. {resave}".rstrip())
        out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out.get(None, out)


def load_latent_file(path: str) -> tuple[torch.Tensor, LatentMeta]:
    """A latent from a safetensors file (also ComfyUI's .latent, key latent_tensor), a PyTorch file
    (weights only) or a numpy file, and what travels with it: an optional `pid_sigma` (a scalar or one
    value per sample)."""
    loaded = read_tensor_file(path, LATENT_FILE)
    tensors = loaded if isinstance(loaded, dict) else {"latent": loaded}
    meta = LatentMeta(sigma=tensors.get("pid_sigma"), source=f"the latent file {os.path.basename(str(path))}")
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return tensors[_latent_key(path, shapes)], meta


def _latent_key(path, shapes: dict) -> str:
    """Which tensor of a latent file is the latent: a known key, else the one tensor of 4+ dims."""
    for key in ("latent_tensor", "samples", "latent"):
        if key in shapes:
            return key
    candidates = [k for k, shape in shapes.items() if len(shape) >= 4 and not str(k).startswith("pid_")]
    if len(candidates) != 1:
        name = os.path.basename(str(path))
        keys = ", ".join(map(str, list(shapes)[:5])) + (f", ... ({len(shapes)} in all)" if len(shapes) > 5 else "")
        if any(str(k).endswith((".weight", ".bias")) for k in shapes):
            raise LatentError(f"{name} holds a model's weights ({keys}), not a latent: give the latent file here, "
                              "not a checkpoint.")
        raise LatentError(f"{name} should hold one latent tensor (key 'latent' or 'samples'); found keys: {keys or 'none'}.")
    return candidates[0]


def latent_file_shape(path: str) -> tuple[int, ...]:
    """The shape of the latent in a file (as load_latent_file reads it), from the file's header where the
    format has one (safetensors, .npy): cheap enough to size thousands of files."""
    kind = sniff(path, LATENT_FILE)
    try:
        with _library_warnings_to_debug_log(os.path.basename(str(path))):
            if kind == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return shapes[_latent_key(path, shapes)]
            if kind == "numpy":
                import numpy as np

                return tuple(np.load(str(path), mmap_mode="r", allow_pickle=False).shape)
    except PidError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header: the full read names it
        if kind == "safetensors":
            raise unreadable(path, kind, exc, LATENT_FILE) from None
    return tuple(load_latent_file(path)[0].shape)


def load_text_embedding(path: str | os.PathLike) -> torch.Tensor:
    """Read a precomputed text embedding: a safetensors, PyTorch (tensors only) or numpy file.

    A file with several tensors must name the one to use "text_embedding". The result is not
    validated: pass it to validate_text_embedding() with the network's width.
    """
    data = read_tensor_file(path, TEXT_EMBEDDING_FILE)
    name = Path(path).name
    if isinstance(data, dict):
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if "text_embedding" in tensors:
            data = tensors["text_embedding"]
        elif len(tensors) == 1:
            data = next(iter(tensors.values()))
        elif any(str(k).endswith((".weight", ".bias")) for k in tensors):
            raise TextEmbeddingError(f"{name} holds a model's weights ({len(tensors)} tensors), not a text embedding: "
                                     "give the text embedding file here, not a checkpoint.")
        else:
            raise TextEmbeddingError(
                f"{name} holds {len(tensors)} tensors ({', '.join(sorted(map(str, tensors))[:5])}); name the text "
                "embedding 'text_embedding' or save it alone."
            )
    if not isinstance(data, torch.Tensor):
        raise TextEmbeddingError(
            f"{name} holds a {type(data).__name__}, not a tensor. Save the embedding tensor itself."
        )
    return data


def load_flux2_bn_stats(path: str | os.PathLike) -> Flux2BNStats:
    """The BatchNorm statistics of a FLUX.2 VAE file, which a raw 32-channel FLUX.2 latent needs (format
    flux2_raw). From a safetensors file only those two tensors are read, not the whole VAE."""
    kind = sniff(path, FLUX2_VAE_FILE)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("bn.running_mean", "bn.running_var"))}
        except Exception as exc:  # noqa: BLE001 - a damaged header
            raise unreadable(path, kind, exc, FLUX2_VAE_FILE) from None
    else:
        tensors = read_tensor_file(path, FLUX2_VAE_FILE)
        if not isinstance(tensors, dict):
            tensors = {}
    return flux2_bn_stats_from_state_dict(tensors)
