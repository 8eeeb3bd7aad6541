"""The files the GPU kit carries: wheels repacked for transport, archives, and the size that travels.

The device machine takes the checkout plus named ignored paths, 64 MiB in all. The wheels ComfyUI
needs there are ~100 MB as downloaded (comfy-kitchen's CUDA kernels alone 48 MB deflated), so
prepare.sh repacks them: each wheel rewritten uncompressed (a valid wheel: pip installs it as it is)
without the members the GPU machine never uses (comfy-kitchen's AMD backend), then all of them in one
xz archive, which compresses the shared libraries about twice as well as a wheel's deflate. ComfyUI's
source travels the same way, without its tests and the API nodes it is started without.

    python kit_files.py repack WHEEL_DIR OUT_DIR     # every wheel, stored, trimmed
    python kit_files.py pack FOLDER ARCHIVE.tar.xz   # FOLDER's contents (xz, all cores when xz is there)
    python kit_files.py unpack ARCHIVE DEST           # the reverse (Python only: no xz binary needed)
    python kit_files.py size REPO [PATH ...]          # bytes that travel: the checkout plus PATHs
    python kit_files.py trim-comfyui TREE             # delete what the tests never run from a ComfyUI tree
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

# Members dropped from a wheel, by wheel name prefix: (member prefixes). Only what cannot run on an
# NVIDIA machine.
DROP = {"comfy_kitchen": ("comfy_kitchen/backends/hip/",)}

# ComfyUI's folders and files that no test or benchmark of the kit uses: its own tests, the API nodes
# (the server starts with --disable-api-nodes), subgraph blueprints, examples, CI files.
COMFYUI_TRIM = ("tests", "tests-unit", "comfy_api_nodes", "blueprints", "script_examples", ".github", ".ci",
                "openapi.yaml")

LIMIT_BYTES = 64 * 1024 * 1024  # what the device tool carries, checkout included


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack_wheel(src: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """`src` rewritten uncompressed into out_dir, without the DROP members of its project (RECORD
    rewritten to match)."""
    drop = next((prefixes for name, prefixes in DROP.items() if src.name.startswith(name + "-")), ())
    dst = out_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename == record_name or info.filename.startswith(drop):
                continue
            data = zin.read(info)
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_STORED
            zout.writestr(out, data)
            if not info.is_dir():
                lines.append(_record_line(info.filename, data))
        lines.append(f"{record_name},,")
        zout.writestr(zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0)), "\n".join(lines) + "\n")
    return dst


def pack(folder: pathlib.Path, archive: pathlib.Path) -> None:
    """folder's contents as a .tar.xz (the xz binary on all cores when present, else Python's lzma)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    xz = shutil.which("xz")
    if xz:
        with open(tmp, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(folder), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run([xz, "-T0", "-6", "-c"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {folder} failed")
    else:
        with tarfile.open(tmp, "w:xz", preset=6) as t:
            t.add(folder, arcname=".")
    os.replace(tmp, archive)


def unpack(archive: pathlib.Path, dest: pathlib.Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:  # Python < 3.12 (the kit's own archives only)
            t.extractall(dest)


def travelling_files(repo: pathlib.Path) -> list[pathlib.Path]:
    """What the device tool sends of the checkout: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return [repo / p for p in out.decode().split("\0") if p]


def folder_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def carried_bytes(repo: pathlib.Path, carried: list[pathlib.Path]) -> tuple[int, int]:
    """(bytes of the checkout that travels, bytes of the carried paths)."""
    checkout = sum(p.stat().st_size for p in travelling_files(repo) if p.is_file() and not p.is_symlink())
    return checkout, sum(folder_bytes(p) for p in carried if p.exists())


def trim_comfyui(tree: pathlib.Path) -> None:
    for name in COMFYUI_TRIM:
        path = tree / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def main(argv):
    if not argv:
        sys.exit(__doc__)
    cmd, args = argv[0], [pathlib.Path(a) for a in argv[1:]]
    if cmd == "repack":
        src, out = args
        out.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(src.glob("*.whl")):
            repack_wheel(wheel, out)
    elif cmd == "pack":
        pack(*args)
    elif cmd == "unpack":
        unpack(*args)
    elif cmd == "size":
        checkout, carried = carried_bytes(args[0], args[1:])
        print(checkout, carried)
    elif cmd == "trim-comfyui":
        trim_comfyui(args[0])
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
