"""decode-many: many latent files -> many PNGs, in one process or shared among torchrun's ranks.

    python -m pid_core decode-many --checkpoint F --manifest items.jsonl
    python -m pid_core decode-many --checkpoint F --latents DIR --out-dir OUT --text-embedding E
    torchrun --nproc-per-node 8 -m pid_core decode-many ...          (the same, on 8 GPUs)

Every item is one decode as `python -m pid_core decode` runs it: plan.plan_decode + decode.run_plan,
with the command line's loading and options (options.load_model, options.tile_options, options.write_images).

  1. Rank 0 lists the items (a manifest or a folder), checks what it can without decoding (the latent
     file's shape, output paths, options), and sets aside items whose outputs all exist as complete
     PNGs: finished by an earlier run, they are skipped and never written again. It sends the list
     of what is left to every rank, so all ranks split the same list.
  2. Each rank takes its share, balanced by output size (distributed.shard_by_cost), loads the model
     once and decodes its items, ordered so that items with the same prompt follow each other: each
     distinct prompt (or embedding file) is encoded (read) once per rank. Outputs are written
     atomically, so an interrupted run leaves finished images and nothing half-written.
  3. A bad item (a missing file, a latent that does not fit the checkpoint, a bad option) is reported
     and skipped. At the end rank 0 prints the summary (done, skipped, failed with reasons) and every
     rank exits 1 when anything failed (docs/DESIGN.md §14).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Union

import torch

from .. import distributed
from ..errors import PidError
from ..wording import CLI, library_detail
from .options import add_decode_options, check_run_options

LATENT_SUFFIXES = (".safetensors", ".latent", ".pt", ".pth", ".npy")
MANIFEST_KEYS = ("latent", "out", "sigma", "prompt", "embedding", "seed", "steps", "latent_format", "tile",
                 "overlap", "leftover_noise", "color_reference", "color_match")
# Ranks wait for the slowest at the start (rank 0 lists the items) and at the end (the summary); the
# shares are balanced, but a listing of many files or one large last item can take long.
WAIT_FOR_SLOWEST = timedelta(hours=24)


Problem = tuple[str, str]  # (where, reason): an item that cannot be decoded


@dataclass(frozen=True)
class Item:
    """One decode: a latent file to PNG(s), with its own options (defaults from the command line)."""

    where: str  # for messages: "items.jsonl:3" or the latent's file name
    latent: str
    out: str
    prompt: Optional[Union[str, list]] = None  # one of prompt / embedding gives the text
    embedding: Optional[str] = None
    sigma: Optional[Union[float, list]] = None  # None: the file's pid_sigma, else 0
    seed: int = 0
    steps: Optional[int] = None  # None: the sampler's default (4, or 25 for an undistilled checkpoint)
    latent_format: str = "auto"
    tile: str = "auto"
    overlap: Optional[int] = None
    leftover_noise: bool = False
    sampler: str = "auto"  # the run's --sampler and --cfg (not manifest keys)
    cfg: Optional[float] = None
    color_reference: Optional[str] = None  # an image of the scene with the colours to keep
    color_match: Optional[float] = None

    @property
    def text_key(self) -> str:
        """Items with the same key share one text embedding."""
        return f"embedding:{self.embedding}" if self.embedding else f"prompt:{json.dumps(self.prompt)}"


@dataclass(frozen=True)
class Job:
    """An item left to decode: its batch (images per latent), the outputs still missing, its cost."""

    item: Item
    batch: int
    missing: tuple[int, ...]
    cost: int  # latent cells of all its images x steps: proportional to its work


@dataclass
class Listing:
    jobs: list[Job] = field(default_factory=list)
    skipped: int = 0
    failures: list[Problem] = field(default_factory=list)


@dataclass
class RankReport:
    done: int = 0
    failures: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    texts: int = 0  # prompts encoded and embedding files read


# --------------------------------------------------------------------------------------- the items


def defaults_from(args) -> dict:
    """The command line's options, the defaults of every item."""
    return dict(prompt=args.prompt, embedding=args.text_embedding, sigma=args.sigma, seed=args.seed,
                steps=args.steps, latent_format=args.latent_format, tile=args.tile, overlap=args.overlap,
                leftover_noise=args.leftover_noise, sampler=args.sampler, cfg=args.cfg,
                color_reference=args.color_reference, color_match=args.color_match)


def folder_items(folder: str, out_dir: str, defaults: dict) -> list[Item]:
    """Every latent file in `folder` (not its subfolders), by name -> out_dir/<name>.png."""
    if not os.path.isdir(folder):
        if os.path.isfile(folder):
            raise PidError(f"--latents takes a folder of latent files; {folder} is a file (use decode for one latent).")
        raise PidError(f"Latent folder not found: {folder!r}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(LATENT_SUFFIXES) and not n.startswith("."))
    if not names:
        raise PidError(f"No latent files ({', '.join(LATENT_SUFFIXES)}) in {folder}.")
    return [Item(where=n, latent=os.path.join(folder, n), out=os.path.join(out_dir, os.path.splitext(n)[0] + ".png"),
                 **defaults) for n in names]


def manifest_items(path: str, out_dir: Optional[str], defaults: dict) -> list[Union[Item, Problem]]:
    """The items of a JSON Lines manifest (one object per line; blank lines and lines starting with #
    are ignored), in order, with a Problem in place of each line that is not a valid item. Relative
    input paths are taken from the manifest's folder, relative outputs from out_dir (default: that
    folder too); `out` defaults to <latent name>.png."""
    if not os.path.exists(path):
        raise PidError(f"Manifest not found: {path!r}")
    if not os.path.isfile(path):
        raise PidError(f"The manifest {path} is a folder: give the JSON Lines file (or the folder as --latents).")
    base = os.path.dirname(os.path.abspath(path))
    out_dir = out_dir or base
    entries: list[Union[Item, Problem]] = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # also with the byte-order mark Windows editors write
            lines = f.readlines()
    except UnicodeDecodeError:
        raise PidError(f"The manifest {path} is not a text file (JSON Lines, UTF-8): one JSON object per line, "
                       "such as {\"latent\": \"a.safetensors\"}.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{os.path.basename(path)}:{number}"
        try:
            entries.append(_manifest_item(json.loads(line), where, base, out_dir, defaults))
        except json.JSONDecodeError as exc:
            entries.append((where, f"not a JSON object: {exc.msg} at column {exc.colno}"))
        except PidError as exc:
            entries.append((where, exc.render(CLI)))
    if not entries:
        raise PidError(f"The manifest {path} lists no items: one JSON object per line, such as "
                       "{\"latent\": \"a.safetensors\"}.")
    return entries


def _manifest_item(entry, where: str, base: str, out_dir: str, defaults: dict) -> Item:
    if not isinstance(entry, dict):
        raise PidError("each line must be a JSON object such as {\"latent\": \"a.safetensors\", \"prompt\": \"...\"}")
    unknown = sorted(set(entry) - set(MANIFEST_KEYS))
    if unknown:
        raise PidError(f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(MANIFEST_KEYS)}")
    latent = _typed(entry, "latent", str, None)
    if latent is None:
        raise PidError("no \"latent\": the path of the latent file")
    if "prompt" in entry and "embedding" in entry:
        raise PidError("give \"prompt\" or \"embedding\", not both")
    options = dict(defaults)
    if "prompt" in entry or "embedding" in entry:  # the item's own text replaces the command line's
        options.update(prompt=None, embedding=None)
    prompt = entry.get("prompt", options["prompt"])
    if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                              and all(isinstance(p, str) for p in prompt))):
        raise PidError("\"prompt\" must be a string or a list of strings (one per image of the latent)")
    sigma = entry.get("sigma", options["sigma"])
    if sigma is not None and not (_is_number(sigma) or (isinstance(sigma, list) and sigma and all(map(_is_number, sigma)))):
        raise PidError("\"sigma\" must be a number or a list of numbers (one per image of the latent)")
    embedding = _typed(entry, "embedding", str, options["embedding"])
    tile = entry.get("tile", options["tile"])
    if not isinstance(tile, (str, int)) or isinstance(tile, bool):
        raise PidError("\"tile\" must be \"auto\", \"off\" or a tile size in pixels")
    overlap = _typed(entry, "overlap", int, options["overlap"])
    steps = _typed(entry, "steps", int, options["steps"])
    if steps is not None and steps < 0:
        raise PidError(f"\"steps\" must be a number of steps (0: the sampler's default), not {steps}")
    reference = _typed(entry, "color_reference", str, options["color_reference"])
    if "color_reference" in entry:
        reference = os.path.join(base, reference)
    strength = entry.get("color_match", options["color_match"])
    if strength is not None and (not _is_number(strength) or not 0 <= strength <= 1):
        raise PidError(f"\"color_match\" must be a number from 0 to 1, not {json.dumps(strength)}")
    if strength is not None and reference is None:
        raise PidError("\"color_match\" needs a \"color_reference\" (or the command's --color-reference)")
    out = _typed(entry, "out", str, None)
    out = os.path.join(out_dir, out if out is not None else os.path.splitext(os.path.basename(latent))[0] + ".png")
    inside = os.path.abspath(out_dir)
    if os.path.commonpath([inside, os.path.abspath(out)]) != inside:
        raise PidError(f"\"out\" {entry['out']!r} is outside the output folder {out_dir}: give a name inside it")
    return Item(
        where=where, latent=os.path.join(base, latent), out=out, prompt=prompt,
        embedding=os.path.join(base, embedding) if "embedding" in entry else embedding, sigma=sigma,
        seed=_typed(entry, "seed", int, options["seed"]), steps=steps,
        latent_format=_typed(entry, "latent_format", str, options["latent_format"]), tile=str(tile),
        overlap=overlap, leftover_noise=_typed(entry, "leftover_noise", bool, options["leftover_noise"]),
        sampler=options["sampler"], cfg=options["cfg"], color_reference=reference, color_match=strength,
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(entry: dict, key: str, kind: type, default):
    value = entry.get(key, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise PidError(f"\"{key}\" must be {'a string' if kind is str else 'true or false' if kind is bool else 'a whole number'}, "
                       f"not {json.dumps(value)}")
    return value


# ------------------------------------------------------------------------------ what is left to do


def list_jobs(entries: list[Union[Item, Problem]], *, text_encoder: Optional[str]) -> Listing:
    """What is left to decode, what was finished before (skipped), and the items that cannot be decoded
    (reported without decoding): an output that is not a .png or is another item's too, an output that
    exists but is not a complete PNG (never overwritten), unreadable latent files, a text missing."""
    from .options import output_paths
    from ..files import latent_file_shape
    from ..images import is_complete_png

    listing = Listing()
    claimed: dict[str, str] = {}  # output path -> the item writing it
    for item in entries:
        if not isinstance(item, Item):
            listing.failures.append(item)
            continue
        try:
            if not item.out.lower().endswith(".png"):
                raise PidError(f"the output {item.out} must be a .png file")
            if item.prompt is None and item.embedding is None:
                raise PidError("no text: give the item a \"prompt\" or an \"embedding\" (or the command --prompt / --text-embedding)")
            if item.prompt is not None and not text_encoder:
                raise PidError("a prompt needs the Gemma text encoder: give --text-encoder")
            shape = latent_file_shape(item.latent)
            if item.color_reference is not None and not os.path.isfile(item.color_reference):
                raise PidError(f"the colour reference {item.color_reference} was not found: give an image file")
            batch = shape[0] if len(shape) >= 4 else 1
            outputs = output_paths(item.out, batch)
            for path in outputs:
                real = os.path.realpath(path)
                if real in claimed:
                    raise PidError(f"{claimed[real]} writes {path} too: give every item its own \"out\"")
                claimed[real] = item.where
            present = [os.path.exists(p) for p in outputs]
            broken = [p for p, there in zip(outputs, present) if there and not is_complete_png(p)]
            if broken:
                raise PidError(f"{broken[0]} exists but is not a complete PNG: it is left as it is; move it away to decode this item")
        except PidError as exc:
            listing.failures.append((item.where, exc.render(CLI)))
            continue
        if all(present):
            listing.skipped += 1
        else:
            cells = batch * shape[-2] * shape[-1]
            listing.jobs.append(Job(item, batch, tuple(i for i, there in enumerate(present) if not there), cells * (item.steps or 4)))
    return listing


def _listing_or_error(args) -> Union[Listing, str]:
    try:
        check_run_options(args)
        defaults = defaults_from(args)
        if args.manifest is not None:
            entries = manifest_items(args.manifest, args.out_dir, defaults)
        elif not args.out_dir:
            raise PidError("--latents needs --out-dir (where the PNGs go)")
        else:
            entries = folder_items(args.latents, args.out_dir, defaults)
        return list_jobs(entries, text_encoder=args.text_encoder)
    except PidError as exc:
        return exc.render(CLI)


# ------------------------------------------------------------------------------------- the decoding


class Texts:
    """The text embedding of each item: prompts through one Gemma encoder (loaded on first use),
    embedding files read from disk. Items come ordered by text, so only the latest is kept."""

    def __init__(self, text_encoder: Optional[str], device: torch.device):
        self.text_encoder, self.device = text_encoder, device
        self.encoder = None
        self.key, self.value = None, None
        self.made = 0

    def __call__(self, item: Item) -> torch.Tensor:
        if item.text_key != self.key:
            self.key, self.value = item.text_key, None
            try:
                self.value = self._make(item)
            except Exception as exc:
                self.value = exc  # the same text fails the same way for the next items: tried once
            self.made += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def negative(self, args) -> torch.Tensor:
        """The unconditional text of a guided decode, made once for the run (options.negative_embedding)."""
        if not hasattr(self, "_negative"):
            from .options import negative_embedding

            self._negative = negative_embedding(args, self._encoder)
        return self._negative

    def _encoder(self):
        if self.encoder is None and self.text_encoder:
            from ..text import GemmaTextEncoder

            self.encoder = GemmaTextEncoder.from_pretrained(self.text_encoder, device=self.device)
        return self.encoder

    def _make(self, item: Item) -> torch.Tensor:
        from ..decode import encode_text
        from ..files import load_text_embedding

        if item.embedding:
            return load_text_embedding(item.embedding)
        return encode_text(item.prompt, self._encoder())


def in_text_order(jobs: list[Job]) -> list[Job]:
    """The jobs grouped by text (groups in order of first appearance), each group in listed order."""
    first: dict[str, int] = {}
    for k, job in enumerate(jobs):
        first.setdefault(job.item.text_key, k)
    return sorted(jobs, key=lambda job: first[job.item.text_key])  # stable: listed order inside a group


def decode_job(model, job: Job, text: torch.Tensor, device: torch.device, negative, bn_stats,
               on_colour=None) -> torch.Tensor:
    """One item, as the decode command runs it: its images [B, 3, H, W] in [0, 1]. negative() gives the
    run's negative text of a guided decode; bn_stats: the run's --bn-stats; on_colour: run_plan's."""
    from ..decode import run_plan
    from ..files import load_latent_file
    from .options import plan_for

    item = job.item
    latent, meta = load_latent_file(item.latent)
    if latent.shape[0] != job.batch:
        raise PidError(f"{item.latent} changed while this run went on (now {latent.shape[0]} images, listed with {job.batch})")
    plan = plan_for(model, latent, meta, text, item, budget_bytes=distributed.memory_budget(device), negative=negative,
                    bn_stats=bn_stats)
    return run_plan(model, plan, seed=item.seed, on_colour=on_colour)


def _reason(exc: Exception) -> str:
    if isinstance(exc, PidError):
        return exc.render(CLI)
    return f"an unexpected error{library_detail(exc)}"  # what the engine does not name: a bug, worth reporting


def decode_share(jobs: list[Job], args, device: torch.device) -> RankReport:
    """Decode this rank's jobs; each failure is reported (on stderr, and in the report) and skipped.

    An item's PNGs are encoded and written in a second thread while the next item decodes (zlib
    releases the GIL): at 8K, encoding takes seconds of one CPU core, as long as a GPU's decode."""
    from .options import flux2_bn_stats, load_model, write_images

    ranks = distributed.current()
    report = RankReport()
    started = time.perf_counter()
    if not jobs:
        return report
    model = load_model(args.checkpoint, device, args.dtype)
    bn_stats = flux2_bn_stats(args)
    texts = Texts(args.text_encoder, device)

    def failed(head: str, job: Job, exc: Exception) -> None:
        report.failures.append((job.item.where, _reason(exc)))
        print(f"{head} FAILED: {_reason(exc)}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(pending) -> None:
        """Wait for an item's write and report it."""
        if pending is None:
            return
        head, job, began, writing, colour = pending
        try:
            written = writing.result()
        except Exception as exc:
            failed(head, job, exc)
        else:
            report.done += 1
            print(f"{head} -> {', '.join(written)} ({time.perf_counter() - began:.1f}s{colour})", file=sys.stderr,
                  flush=True)

    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pid-png") as writer:  # waits for a write under way
        for k, job in enumerate(in_text_order(jobs), 1):
            began = time.perf_counter()
            head = f"{ranks.label}[{k}/{len(jobs)}] {job.item.where}"
            colour = []
            try:
                image = decode_job(model, job, texts(job.item), device, lambda: texts.negative(args), bn_stats,
                                   on_colour=lambda before, after: colour.append(
                                       f"; colour against the reference: {before.describe()} -> {after.describe()}"))
            except Exception as exc:  # this item fails, the run goes on
                failed(head, job, exc)
                continue
            finish(pending)
            # on the CPU: the device's memory stays what one decode needs while the next one runs
            pending = (head, job, began, writer.submit(write_images, image.cpu(), job.item.out, only=job.missing),
                       "".join(colour))
            del image
        finish(pending)
    report.seconds = time.perf_counter() - started
    report.texts = texts.made
    return report


def summary(listing: Listing, reports: list[RankReport]) -> str:
    failures = listing.failures + [f for r in reports for f in r.failures]
    done = sum(r.done for r in reports)
    total = done + listing.skipped + len(failures)
    lines = [f"decode-many: {total} item(s): {done} done, {listing.skipped} skipped (finished before), "
             f"{len(failures)} failed"]
    if len(reports) > 1:
        for rank, r in enumerate(reports):
            lines.append(f"  rank {rank}: {r.done} done, {len(r.failures)} failed, {r.seconds:.1f}s, {r.texts} text(s)")
    elif reports[0].done or reports[0].failures:
        lines.append(f"  {reports[0].seconds:.1f}s, {reports[0].texts} text(s) encoded or read")
    if failures:
        lines.append("failed:")
        lines += [f"  {where}: {reason}" for where, reason in failures]
    return "\n".join(lines)


@contextlib.contextmanager
def _stop_cleanly_on_sigterm():
    """torchrun stops the other ranks with SIGTERM when one fails: end as on Ctrl-C, so a write under
    way removes its temporary file (images.write_atomically)."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_decode_many(args) -> int:
    device = distributed.compute_device(args.device)
    with _stop_cleanly_on_sigterm(), distributed.session(device, timeout=WAIT_FOR_SLOWEST):
        ranks = distributed.current()
        listing = distributed.from_main(_listing_or_error(args) if ranks.is_main else None)
        if isinstance(listing, str):
            raise PidError(listing)
        if ranks.is_main:
            for where, reason in listing.failures:
                print(f"{where} FAILED: {reason}", file=sys.stderr, flush=True)
            print(f"decode-many: {len(listing.jobs)} to decode, {listing.skipped} finished before, "
                  f"{len(listing.failures)} not decodable" + (f"; {ranks.world_size} ranks" if ranks.several else ""),
                  file=sys.stderr, flush=True)
        share = distributed.shard_by_cost([job.cost for job in listing.jobs], ranks.world_size)[ranks.rank]
        report = decode_share([listing.jobs[i] for i in share], args, device)
        reports = distributed.gather_objects(report)
        if ranks.is_main:
            print(summary(listing, reports), flush=True)
        distributed.barrier()  # rank 0 has printed before any rank ends (torchrun stops the rest when one fails)
        failed = listing.failures or any(r.failures for r in reports)
        return 1 if failed else 0


def add_parser(sub) -> None:
    m = sub.add_parser("decode-many", help="decode many latent files (a folder or a JSON Lines manifest) to PNGs; "
                                           "under torchrun the ranks share them",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=MANIFEST_HELP)
    source = m.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSON Lines file, one item per line (see below)")
    source.add_argument("--latents", help="a folder: every latent file in it, with the command's prompt or embedding")
    m.add_argument("--out-dir", help="where the PNGs go: <latent name>.png, or a manifest's relative \"out\" paths (default for a manifest: its own folder)")
    add_decode_options(m, text_required=False)
    m.set_defaults(func=cmd_decode_many)


MANIFEST_HELP = """\
Manifest: one JSON object per line; inputs relative to the manifest's folder, outputs to --out-dir; e.g.
  {"latent": "a.safetensors", "prompt": "a red fox in snow", "seed": 1, "out": "png/a.png"}
  {"latent": "b.latent", "embedding": "b_text.safetensors", "sigma": 0.3, "steps": 4, "tile": 2048}
Keys: latent (required), out, sigma, prompt or embedding, seed, steps, latent_format, tile, overlap,
leftover_noise, color_reference (an image), color_match; a key left out takes the command line's option.
Outputs that exist are skipped."""
