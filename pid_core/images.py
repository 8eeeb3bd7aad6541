"""Images: [0, 1] tensors -> 8-bit RGB -> PNG (written with zlib, no dependency) or JPEG / WebP (Pillow, when
present); atomic writes and the checks of an output path (docs/DESIGN.md §13); previews."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import struct
import tempfile
import zlib

import numpy as np
import torch

from .errors import ColourReferenceError, OutputError
from .wording import library_detail

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


# Output formats by extension: (Pillow's format name, or None for our own PNG writer; the largest side
# the format can hold; Pillow's save options).
IMAGE_FORMATS = {
    ".png": (None, 2**31 - 1, {}),
    ".jpg": ("JPEG", 65535, {"quality": 95}),
    ".jpeg": ("JPEG", 65535, {"quality": 95}),
    ".webp": ("WEBP", 16383, {"quality": 95}),
}


def image_format(path: str) -> str:
    """The extension of an output path, if this pack can write it (.png always; .jpg, .jpeg, .webp with
    Pillow, which every ComfyUI has). Raises OutputError naming what to use instead."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise OutputError(
            f"{os.path.basename(str(path)) or path!r} has {'the extension ' + repr(ext) if ext else 'no extension'}; "
            f"images are written as {', '.join(IMAGE_FORMATS)}. Name the output e.g. out.png."
        )
    if IMAGE_FORMATS[ext][0] is not None:
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise OutputError(f"Writing {ext} needs Pillow (pip install pillow); or write .png, which needs nothing.") from None
    return ext


def check_image_size(path: str, height: int, width: int) -> None:
    ext = image_format(path)
    limit = IMAGE_FORMATS[ext][1]
    if max(height, width) > limit:
        raise OutputError(f"A {width}x{height} image is too large for {ext} (at most {limit} px a side). Write .png.")


def encode_image(rgb: np.ndarray, ext: str) -> bytes:
    """[H, W, 3] uint8 -> the bytes of an image file of the format `ext` names."""
    name, _, options = IMAGE_FORMATS[ext]
    if name is None:
        return encode_png(rgb)
    import io

    from PIL import Image

    buffer = io.BytesIO()
    try:
        Image.fromarray(rgb, "RGB").save(buffer, format=name, **options)
    except (OSError, KeyError, ValueError) as exc:  # e.g. a Pillow built without WebP
        raise OutputError(f"This Pillow cannot write {ext}: write .png instead{library_detail(exc)}.") from None
    return buffer.getvalue()


def save_image(image: torch.Tensor, path: str) -> None:
    """[3, H, W] in [0, 1] -> the file `path` (its format from the extension), written atomically."""
    write_atomically(path, encode_image(to_uint8(image), image_format(path)))


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
    """Write `data` to a temporary file in the target's folder, then rename it over `path` in one step:
    `path` holds either its old content or all of the new, never part of it. A new file gets the usual
    permissions (0o666 less the umask); a replaced file keeps its own."""
    write_all_atomically([(path, data)])


def write_all_atomically(files) -> None:
    """Write several (path, data) so that either every target is replaced or none is: each is first
    written in full to a temporary file beside its target, and only when all are written are they
    renamed into place (a rename within a folder does not fail for want of space). An OSError names
    the target it failed on (`filename`)."""
    for path, _ in files:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
    staged = []
    try:
        for path, data in files:
            try:
                staged.append((_write_temporary(path, data), path))
            except OSError as exc:
                exc.filename = path
                raise
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _write_temporary(path: str, data: bytes) -> str:
    """`data` in a new temporary file beside `path`, with the permissions `path` has (when it exists)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def numbered_path(path: str, index: int) -> str:
    """The file of image `index` when a batch of several is written to `path`: name_00.png, name_01.png ..."""
    stem, ext = os.path.splitext(path)
    return f"{stem}_{index:02d}{ext}"


def check_output_path(path, inputs=()) -> str:
    """Refuse, before anything is loaded, an output that cannot be written: no name, a folder, a known
    extension missing, a folder that cannot be created or written, an existing file that is read-only,
    or one of the inputs (also as a numbered batch file: name_00.png). Returns the path."""
    if path is None or not str(path).strip():
        raise OutputError("The output path is empty: give a file name such as out.png.")
    path = str(path)
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        raise OutputError(f"The output {path} is a folder: give a file name inside it, such as {os.path.join(path, 'out.png')}.")
    target = os.path.realpath(path)
    stem, ext = os.path.splitext(target)
    batch_file = re.compile(re.escape(stem) + r"_\d{2,}" + re.escape(ext) + "$")
    for given in inputs:
        if given is None:
            continue
        source = os.path.realpath(str(given))
        if source == target or batch_file.match(source) or _same_file(source, target):
            raise OutputError(f"The output {path} is the input {given}: writing it would replace the input. "
                              "Choose another output name.")
    image_format(path)
    folder = os.path.dirname(target)
    existing = folder
    while not os.path.exists(existing):  # a folder to be made: its nearest existing parent must take it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"Cannot write {path}: {existing} is a file, not a folder.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".pid-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"Cannot write to the folder {existing} ({exc.strerror or exc}). Choose another folder.") from None
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise OutputError(f"The output {path} exists and is read-only. Choose another name or make it writable.")
    return path


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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


def read_image(path: str) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, ... whatever Pillow reads) as RGB [1, 3, H, W] float32 in [0, 1]: a
    colour reference from the command line (alpha is dropped)."""
    name = os.path.basename(str(path)) or str(path)
    if not os.path.isfile(str(path)):
        what = "is a folder" if os.path.isdir(str(path)) else "was not found"
        raise ColourReferenceError(f"The colour reference {path} {what}: give an image file (PNG, JPEG, WebP).")
    try:
        from PIL import Image
    except ImportError:
        raise ColourReferenceError("Reading a colour reference image needs Pillow (pip install pillow).") from None
    try:
        with Image.open(str(path)) as opened:
            array = np.asarray(opened.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ColourReferenceError(f"{name} is not an image Pillow can read ({type(exc).__name__}): give a PNG, "
                                   "JPEG or WebP file.") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
