"""The commands: `python -m pid_core <command> ...`, each a module here over the engine's library.

    decode        one latent file -> image (decode.py)
    decode-many   many latent files -> images, shared among torchrun's ranks (decode_many.py)
    info          what a checkpoint file is (info.py)
    download      a released checkpoint or the Gemma text encoder (download.py)
    selftest      a decode with a small random checkpoint, offline (selftest.py)
    conformance   the engine against reference case folders (conformance.py)
    bench         time, memory and seam figures with a full-size random model (bench.py)
    bench-ranks   the commands timed in one process and under torchrun (bench_ranks.py)
    bench-colour  colour matching on synthetic images: colour error, detail, time, seams (bench_colour.py)

The library (pid_core's other modules) never imports from here; what the decode commands share lives
in options.py, the random checkpoints of selftest, the benchmarks and the tests in random_checkpoints.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import PidError
from ..wording import CLI
from . import bench, bench_colour, bench_ranks, conformance, decode, decode_many, download, info, selftest

COMMANDS = (decode, decode_many, info, download, selftest, conformance, bench, bench_ranks, bench_colour)


class OneLineErrors(argparse.ArgumentParser):
    """A usage mistake ends like every other error of the command: one line `error: ...`, exit code 2
    (argparse would print the whole usage first); --help still shows it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m pid_core", description="PiD pixel-diffusion decoder")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.add_argument("--verbose", action="store_true",
                                    help="also print debug lines (such as the libraries' warnings while reading files)")
    return parser


class _LevelPrefix(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "negative_prompt", None) is not None and not args.text_encoder:
        parser.error("--negative-prompt needs --text-encoder (a Gemma-2-2b-it folder); or give --negative-embedding")
    if getattr(args, "prompt", None) is not None and not args.text_encoder:
        parser.error("--prompt needs --text-encoder (a Gemma-2-2b-it folder)")
    handler = logging.StreamHandler()
    handler.setFormatter(_LevelPrefix())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # "warning: ...", as before; no-op if set up
    # --verbose: our own debug lines too (pid_core's logger hands them to the root's handler), no library's
    logging.getLogger("pid_core").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    try:
        return args.func(args)
    except PidError as exc:
        print(f"error: {exc.render(CLI)}", file=sys.stderr)
        return 2
