"""The words a message uses for what its reader sets, decided in one table for the three readers.

An engine error reaches a Python caller (the API: arguments such as tiling=TileOptions()), the
command line (options such as --tile auto) or a ComfyUI node (inputs such as PiD Decode's tiling).
A message names such a thing through a term, `f"Use {term.tiling_auto}, which fits any size."`,
and the term is put in its reader's words when the message is shown: str(exc) for the API (the
engine is a library), `exc.render(CLI)` in the command line's main, `exc.render(NODE)` in the nodes.
Everything else in a message is said the same way to all three (docs/DESIGN.md §13).

A new option or input is one row of TERMS; `term.<name>` then works in any message.
"""

from __future__ import annotations

import re
from typing import NamedTuple

API, CLI, NODE = "api", "cli", "node"
CONTEXTS = (API, CLI, NODE)


class Words(NamedTuple):
    """One term in each reader's words."""

    api: str  # a Python caller's: arguments and functions of pid_core
    cli: str  # the command line's: `python -m pid_core ...` options
    node: str  # a ComfyUI user's: the pack's nodes, their inputs, ComfyUI's own nodes and folders


# One row per term: Words(api, cli, node). A term the nodes have no input for still gets the words that
# lead a ComfyUI user to the same result.
TERMS: dict[str, Words] = {
    # What a user sets, by its name.
    "seed": Words("seed", "--seed", "seed"),
    "steps": Words("steps", "--steps", "steps"),
    "cfg": Words("cfg", "--cfg", "cfg"),
    "latent_format": Words("latent_format", "--latent-format", "latent_format"),
    "tiling": Words("tiling (TileOptions)", "--tile and --overlap", "tiling, tile_size and tile_overlap"),
    "color_reference": Words("color_reference", "--color-reference", "color_reference"),
    "color_match": Words("color_match", "--color-match", "color_match"),
    "compile_takes": Words("compile= takes True, False or", "--compile takes no value or", "compile takes on, off or"),
    # Settings with their value.
    "tiling_auto": Words("tiling=TileOptions()", "--tile auto", "tiling auto"),
    "manual_tile": Words("tiling=TileOptions(mode='manual', tile_px=1024)", "--tile 1024", "tiling manual, tile_size 1024"),
    "smaller_tile": Words("a smaller TileOptions(tile_px=...)", "a smaller --tile", "a smaller tile_size (tiling manual)"),
    "no_guidance": Words("cfg=1", "--cfg 1", "cfg 1"),
    "sampler_teacher": Words("sampler='teacher'", "--sampler teacher", "sampler teacher"),
    "device_cpu": Words("device='cpu'", "--device cpu", "ComfyUI's --cpu"),
    "weights_bf16": Words("load_pid(..., dtype=torch.bfloat16)", "--dtype bf16", "weight_dtype bf16 in PiD Loader"),
    # Fixes that take a different way in each context.
    "sigma_override": Words("pass sigma=", "give --sigma", "set sigma (-1 is auto)"),
    "other_device": Words("another device (device=)", "another device (--device)", "a GPU with more free memory"),
    "encode_prompt": Words("encode the prompt with pid_core.text.GemmaTextEncoder (Gemma-2-2b-it)",
                           "give --prompt and --text-encoder (a Gemma-2-2b-it folder or file)",
                           "encode the prompt with PiD Text Encode (Gemma-2-2b-it from Load CLIP, type pixeldit)"),
    "text_encoder": Words("text_encoder= (a pid_core.text.GemmaTextEncoder)", "--text-encoder (a Gemma-2-2b-it folder)",
                          "PiD Text Encode (Gemma-2-2b-it from Load CLIP, type pixeldit)"),
    "text_embedding": Words("a precomputed embedding [B, 300, 2304]", "--text-embedding (a precomputed embedding)",
                            "a Gemma-2-2b-it CONDITIONING"),
    "gemma_file": Words("a Gemma-2-2b-it folder or .safetensors file (GemmaTextEncoder.from_pretrained)",
                        "a Gemma-2-2b-it folder or .safetensors file as --text-encoder",
                        "Load CLIP with type pixeldit and gemma_2_2b_it_elm_bf16.safetensors"),
    "tokenizer_folder": Words("tokenizer_path= (a folder with the google/gemma-2-2b-it tokenizer files)",
                              "--text-encoder the google/gemma-2-2b-it folder, which holds the tokenizer files",
                              "Load CLIP, type pixeldit, ComfyUI's Gemma file (it embeds its tokenizer)"),
    "give_negative": Words("pass negative= (an embedding or prompt), or text_encoder= to encode the reference's "
                           "negative prompt",
                           "give --negative-embedding, or --text-encoder to encode the reference's negative prompt",
                           "connect PiD Text Encode's negative output to PiD Decode's negative input"),
    "flux2_stats": Words("bn_stats=files.load_flux2_bn_stats(the FLUX.2 VAE file), or the 128-channel latent of "
                         "ComfyUI's FLUX.2 VAE (latent_format 'flux2')",
                         "--bn-stats (the FLUX.2 VAE file), or the 128-channel latent of ComfyUI's FLUX.2 VAE "
                         "(--latent-format flux2)",
                         "the 128-channel latent of ComfyUI's FLUX.2 VAE (latent_format flux2)"),
    "checkpoint_place": Words("the path", "the path given to --checkpoint",
                              "ComfyUI's models/pid folder (or models/diffusion_models), then refresh the page"),
    "choose_checkpoint": Words("Load a PiD checkpoint with load_pid", "Give --checkpoint a PiD checkpoint",
                               "Pick a PiD checkpoint in PiD Loader"),
    "checkpoint_summary": Words("checkpoint.describe(model)", "python -m pid_core info", "PiD Loader's summary"),
}

_MARK = "\x1f"  # encloses a term's name in a message until it is rendered; no path or repr() holds it
_TERM = re.compile(f"{_MARK}([a-z0-9_]+){_MARK}")


class _Term:
    """`term.<name>`: the place of a term in a message (an unknown name fails where the message is built)."""

    def __getattr__(self, name: str) -> str:
        if name not in TERMS:
            raise AttributeError(f"no term {name!r} in pid_core.wording.TERMS")
        return f"{_MARK}{name}{_MARK}"


term = _Term()


def render(message: str, context: str = API) -> str:
    """The message with each term in the words of `context` (API, CLI or NODE)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    return _TERM.sub(lambda m: getattr(TERMS[m.group(1)], context), message)


def library_detail(exc: BaseException) -> str:
    """A library's own words for a failure whose cause we could not name, to follow our sentence (the
    one rule for library text, docs/DESIGN.md §13): ' (TypeName: its first line)'. Never torch's advice
    to load with weights_only=False, which would run the file's code."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if "weights_only" in line:
        line = ""
    if len(line) > 160:
        line = line[:157] + "..."
    return f" ({type(exc).__name__}: {line})" if line else f" ({type(exc).__name__})"
