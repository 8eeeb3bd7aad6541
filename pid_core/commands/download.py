"""python -m pid_core download NAME: a released checkpoint (or the Gemma text encoder) from the Hugging Face Hub."""

from __future__ import annotations

import os

from ..errors import PidError

GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"  # the text encoder the reference loads


def cmd_download(args) -> int:
    from ..variants import LICENSE_NOTE, get_variant

    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise PidError("Downloading needs huggingface_hub: pip install huggingface_hub") from None
    print(LICENSE_NOTE)
    dest = args.dest or "."
    try:
        if args.name.lower() in ("gemma", "text-encoder", "gemma-2-2b-it"):
            path = snapshot_download(GEMMA_REPO, local_dir=os.path.join(dest, "gemma-2-2b-it"),
                                     allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        else:
            variant = get_variant(args.name)
            hub = variant.repackaged_file if args.repackaged else variant.official_file
            if hub is None:
                raise PidError(f"{variant.name} has no repackaged file; omit --repackaged to get the official one.")
            path = hf_hub_download(hub.repo, hub.path, local_dir=dest)
    except PidError:
        raise
    except Exception as exc:  # network, authentication, missing file: all reported the same way
        raise PidError(
            f"Download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check the network connection (this command needs the Hugging Face Hub) or download the file by hand."
        ) from None
    print(f"saved: {path}")
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("download", help="download a released checkpoint (or 'gemma') from the Hugging Face Hub")
    g.add_argument("name", help="variant (e.g. flux-2k, flux-2kto4k-v1.5, sdxl-2kto4k) or 'gemma'")
    g.add_argument("--repackaged", action="store_true", help="the Comfy-Org .safetensors instead of the official .pth")
    g.add_argument("--dest", help="target folder (default: current folder)")
    g.set_defaults(func=cmd_download)
