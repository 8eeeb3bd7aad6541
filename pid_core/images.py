"""Images without extra dependencies: [0, 1] tensors -> 8-bit RGB, PNG written with zlib, previews."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib

import numpy as np
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8. Truncates like the reference ((x+1)*127.5 cast, docs/DESIGN.md §10)."""
    x = image.detach().float().clamp(0, 1).mul(255.0).to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().cpu().numpy()


def encode_png(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (8-bit RGB, no filtering)."""
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError("encode_png takes [H, W, 3] uint8")
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


def save_png(image: torch.Tensor, path: str) -> None:
    """Write atomically: the bytes go to a temporary file in the target folder, which then replaces
    `path` in one step, so a failed write never leaves a truncated file where a good one was."""
    write_atomically(path, encode_png(to_uint8(image)))


def is_complete_png(path: str) -> bool:
    """Whether the file is a whole PNG (its signature first, its end chunk last): what a finished
    write leaves, and what a cut-off copy or another kind of file does not."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pid-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def preview_uint8(x0: torch.Tensor, max_side: int = 512) -> np.ndarray:
    """x0 [B, 3, H, W] in [-1, 1] -> the first sample as uint8 [h, w, 3], longest side <= max_side (for
    progress previews)."""
    img = x0[0:1].detach().float()
    h, w = img.shape[-2:]
    scale = max(h, w) / max_side
    if scale > 1:
        img = torch.nn.functional.interpolate(img, size=(max(1, int(h / scale)), max(1, int(w / scale))),
                                              mode="area")
    return to_uint8((img[0].clamp(-1, 1) + 1) / 2)
