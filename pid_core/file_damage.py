"""What is wrong with a tensor file that its reader could not read, told from the file's own structure.

The readers say it in their terms ("incomplete metadata, file not fully covered", "PytorchStreamReader
failed reading zip archive", "internal miniz error", "unexpected EOF"); the file says it plainly: a
safetensors or .npy header announces the file's length, a zip archive (PyTorch, .npz) ends with its
directory. Messages name that cause in our words and keep the reader's text out (docs/DESIGN.md §13).
Read only after a reader failed, so the cost of a second look never falls on a file that reads.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

_ZIP_END = b"PK\x05\x06"  # a zip archive's end record: this signature, 22 bytes with a comment of up to 64 KiB


def what_is_wrong(path: str, kind: str, exc: BaseException | None = None) -> str | None:
    """A phrase that follows the file's name ("is truncated: ...", "is damaged: ..."), or None when the
    structure looks whole and only the reader's own words are left. kind: files.sniff's kind."""
    try:
        size = os.path.getsize(path)
        if kind == "safetensors":
            return _safetensors(path, size)
        if kind in ("torch", "numpy-archive"):
            return _zip(path, size)
        if kind == "numpy":
            return _npy(path, size)
        if kind == "torch-legacy" and (isinstance(exc, EOFError) or "EOF" in str(exc) or "truncated" in str(exc)):
            return "is truncated (it ends inside its pickled data)"
    except (OSError, ValueError):
        return None
    return None


def _truncated(size: int, announced: int) -> str:
    return f"is truncated ({size:,} of the {announced:,} bytes its header announces)"


def _safetensors(path: str, size: int) -> str | None:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 + header_len:
            return _truncated(size, 8 + header_len)
        header = f.read(header_len)
    try:
        entries = json.loads(header)
        end = max((entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is damaged (its safetensors header does not read as a list of tensors)"
    announced = 8 + header_len + int(end)
    if size < announced:
        return _truncated(size, announced)
    if size > announced:
        return f"is damaged ({size - announced:,} bytes follow the tensors its header lists)"
    return None


def _zip(path: str, size: int) -> str | None:
    try:
        with zipfile.ZipFile(path):
            return None
    except zipfile.BadZipFile:
        pass
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    end = tail.rfind(_ZIP_END)
    if end < 0 or len(tail) - end < 22 + int.from_bytes(tail[end + 20:end + 22], "little"):
        return "is truncated (it ends before the directory that closes its zip archive)"
    return "is damaged (the directory of its zip archive does not read)"


def _npy(path: str, size: int) -> str | None:
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        shape, _, dtype = readers[version](f)
        announced = f.tell() + math.prod(shape) * dtype.itemsize
    return _truncated(size, announced) if size < announced else None
