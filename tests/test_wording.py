"""Messages in their reader's words (docs/DESIGN.md §13): the same engine error says `tiling=TileOptions()` in
the API, `--tile auto` on the command line and `tiling auto` in a ComfyUI node; the rest of it is the same.

For the size, format, text and file errors: the API's str(exc), the command line's stderr line (which must be
the API's error rendered for the command line, so both ran the same check) and the node's rendering.
tests/comfyui/test_comfyui_nodes.py runs the size and file errors through a real ComfyUI prompt.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

import pid_core.tiling
from pid_core.checkpoint import load_pid
from pid_core.commands import main
from pid_core.commands.random_checkpoints import make_random_checkpoint
from pid_core.decode import decode
from pid_core.errors import CheckpointError, DecodeError, LatentError, PidError, TextEmbeddingError
from pid_core.wording import API, CLI, CONTEXTS, NODE, TERMS, render, term

TEXT_DIM, TEXT_TOKENS = 64, 16
FLUX = "pid_flux1_512_to_2048_4step_bf16.safetensors"
TEACHER = "pid_flux1_512_to_2048_undistilled_bf16.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wording")
    made = {}

    def path(name):
        made[name] = str(root / name)
        return made[name]

    dims = dict(text_dim=TEXT_DIM, text_tokens=TEXT_TOKENS)
    make_random_checkpoint(path(FLUX), **dims)
    make_random_checkpoint(path(TEACHER), **dims)
    make_random_checkpoint(path("my_decoder.safetensors"), **dims)  # a name that tells no backbone
    (root / "released_text").mkdir()  # narrow, but taking Gemma-2-2b-it's text as every released PiD does
    make_random_checkpoint(path(f"released_text/{FLUX}"), text_dim=2304, text_tokens=300)
    data = open(made[FLUX], "rb").read()
    open(path("truncated.safetensors"), "wb").write(data[: len(data) // 2])
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, path("flux_dit.safetensors"))
    save_file({"latent": torch.randn(1, 16, 3, 4)}, path("latent.safetensors"))
    save_file({"latent": torch.randn(1, 4, 3, 4)}, path("sdxl_latent.safetensors"))
    save_file({"latent": torch.randn(1, 16, 512, 512)}, path("giant_latent.safetensors"))
    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM)}, path("text.safetensors"))
    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, 4096)}, path("t5_text.safetensors"))
    made["missing"] = str(root / "not_there.safetensors")
    return made


def decode_args(files, *extra, checkpoint=FLUX, latent="latent.safetensors", text="text.safetensors"):
    return ["decode", "--checkpoint", files.get(checkpoint, checkpoint), "--latent", files[latent],
            "--text-embedding", files[text], "--out", files["missing"] + ".png", "--steps", "1", *extra]


def cli_message(capsys, argv) -> str:
    """The one `error: ...` line of a command that must fail, without its prefix."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0][len("error: "):]


def in_three_contexts(exc: PidError, cli: str) -> dict[str, str]:
    """The API's, the command line's and the node's message of one error; the command line printed the
    engine's message rendered for it, nothing of its own."""
    assert cli == exc.render(CLI)
    messages = {API: str(exc), CLI: cli, NODE: exc.render(NODE)}
    for message in messages.values():
        assert "\n" not in message and "\x1f" not in message, message
    return messages


def speaks(messages: dict[str, str], **words: tuple[str, ...]) -> None:
    """Each context's message holds its own words and none of the other contexts'."""
    for context, message in messages.items():
        for other, phrases in words.items():
            for phrase in phrases:
                assert (phrase in message) == (other == context), (context, phrase, message)


# --- the table ---------------------------------------------------------------------------------------

def test_every_term_has_words_for_every_reader():
    for name, words in TERMS.items():
        assert all(getattr(words, c).strip() for c in CONTEXTS), name
        assert not re.search(r"(^|[\s(])--\w", words.api), (name, words.api)  # the API names no option
        assert not re.search(r"\w=|pid_core\.", words.cli), (name, words.cli)  # the command line no argument
        assert not re.search(r"\w=|pid_core\.|(?<!ComfyUI's )--\w", words.node), (name, words.node)


def test_render_puts_terms_in_the_readers_words_and_leaves_the_rest():
    message = f"Use {term.tiling_auto} for {{tiling_auto}} in /data/{{x}}.pt"
    assert render(message) == "Use tiling=TileOptions() for {tiling_auto} in /data/{x}.pt"
    assert render(message, CLI) == "Use --tile auto for {tiling_auto} in /data/{x}.pt"
    assert render(message, NODE) == "Use tiling auto for {tiling_auto} in /data/{x}.pt"
    with pytest.raises(AttributeError, match="no term 'tiling_automatic'"):
        term.tiling_automatic
    with pytest.raises(ValueError, match="context must be one of"):
        render(message, "gui")


def test_a_wrapped_message_keeps_its_terms():
    """A message that quotes another (the negative text's, a latent file's sigma) quotes its template, so the
    outer one renders both in one reader's words."""
    inner = TextEmbeddingError(f"Set {term.no_guidance}.")
    outer = TextEmbeddingError(f"The negative text: {inner.template}")
    assert outer.render(CLI) == "The negative text: Set --cfg 1." and str(outer) == "The negative text: Set cfg=1."


# --- size: the giant untiled decode ----------------------------------------------------------------

def test_the_giant_untiled_decode_in_three_contexts(files, capsys, monkeypatch):
    monkeypatch.setattr(pid_core.tiling, "device_memory_budget", lambda device, **k: 8 << 30)
    cli = cli_message(capsys, decode_args(files, "--tile", "off", latent="giant_latent.safetensors"))
    with pytest.raises(DecodeError) as api:
        decode(load_pid(files[FLUX]), torch.randn(1, 16, 512, 512), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), steps=1)
    messages = in_three_contexts(api.value, cli)
    assert messages[NODE].startswith("Decoding 16384x16384 px needs about ")
    assert messages[NODE].endswith("Use tiling auto, which fits any size, or decode fewer images at once.")
    speaks(messages, api=("tiling=TileOptions()",), cli=("--tile auto",), node=("tiling auto",))


def test_tiles_too_large_and_out_of_memory_in_three_contexts(files):
    from pid_core.decode import check_memory, out_of_memory_message
    from pid_core.plan import plan_decode
    from pid_core.tiling import TileOptions

    model = load_pid(files[FLUX])
    plan = plan_decode(model, torch.randn(1, 16, 16, 16), torch.randn(1, TEXT_TOKENS, TEXT_DIM),
                       tiling=TileOptions(mode="manual", tile_px=256, memory_budget_bytes=1 << 10))
    with pytest.raises(DecodeError) as too_large:
        check_memory(plan)
    speaks(in_three_contexts(too_large.value, too_large.value.render(CLI)),
           api=("TileOptions(tile_px=...)", "tiling=TileOptions()"), cli=("a smaller --tile", "--tile auto"),
           node=("a smaller tile_size (tiling manual)", "tiling auto"))
    oom = DecodeError(out_of_memory_message(plan, MemoryError()))
    assert str(oom).startswith("Out of memory on cpu while decoding 512x512 px in tiles of ")
    speaks(in_three_contexts(oom, oom.render(CLI)), api=("TileOptions(tile_px",), cli=("--tile",),
           node=("tile_size",))


# --- format: the latent does not fit the format, and 16 channels that the checkpoint cannot tell -----

def test_a_latent_format_mismatch_in_three_contexts(files, capsys):
    cli = cli_message(capsys, decode_args(files, "--latent-format", "flux", latent="sdxl_latent.safetensors"))
    with pytest.raises(LatentError) as api:
        decode(load_pid(files[FLUX]), torch.randn(1, 4, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM),
               latent_format="flux")
    messages = in_three_contexts(api.value, cli)
    assert messages[NODE] == (
        "The latent has 4 channels (SDXL), but the latent format 'flux' (FLUX.1 / Z-Image) and the checkpoint take "
        "16-channel latents: load the SDXL PiD checkpoint (sdxl-2kto4k) and set latent_format to 'auto', or give "
        "this checkpoint a latent from a model it was made for.")
    assert messages[NODE].count("SDXL") == 2  # the latent's family, and the checkpoint to load: once each
    speaks(messages, cli=("--latent-format",))


def test_sixteen_channels_the_checkpoint_cannot_tell_in_three_contexts(files, capsys):
    cli = cli_message(capsys, decode_args(files, checkpoint="my_decoder.safetensors"))
    with pytest.raises(LatentError) as api:
        decode(load_pid(files["my_decoder.safetensors"]), torch.randn(1, 16, 3, 4),
               text=torch.randn(1, TEXT_TOKENS, TEXT_DIM))
    messages = in_three_contexts(api.value, cli)
    # a narrow test checkpoint: the message first says it is no released PiD (tests/test_bad_input.py)
    assert messages[NODE].startswith("my_decoder.safetensors is not a released PiD checkpoint: ")
    assert "Set latent_format to one of: flux, qwenimage, sd3 (the one" in messages[NODE]
    assert "Set --latent-format to one of: flux, qwenimage, sd3 (the one" in messages[CLI]


# --- text: the wrong width, a missing encoder -------------------------------------------------------

def test_a_text_embedding_of_another_width_in_three_contexts(files, capsys):
    checkpoint = f"released_text/{FLUX}"
    cli = cli_message(capsys, decode_args(files, checkpoint=checkpoint, text="t5_text.safetensors"))
    with pytest.raises(TextEmbeddingError) as api:
        decode(load_pid(files[checkpoint]), torch.randn(1, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, 4096))
    messages = in_three_contexts(api.value, cli)
    assert all(m.startswith("The text embedding has width 4096") for m in messages.values())
    speaks(messages, api=("pid_core.text.GemmaTextEncoder",), cli=("--prompt and --text-encoder",),
           node=("PiD Text Encode", "Load CLIP, type pixeldit"))


def test_a_guided_decode_without_a_negative_text_in_three_contexts(files, capsys):
    cli = cli_message(capsys, decode_args(files, "--latent-format", "flux", checkpoint=TEACHER))
    with pytest.raises(TextEmbeddingError) as api:
        decode(load_pid(files[TEACHER]), torch.randn(1, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM),
               steps=1, latent_format="flux")
    messages = in_three_contexts(api.value, cli)
    assert all(m.startswith("A guided decode (teacher, cfg 5) needs a negative text: ") for m in messages.values())
    speaks(messages, api=("negative=", "text_encoder=", "cfg=1"), cli=("--negative-embedding", "--text-encoder", "--cfg 1"),
           node=("PiD Decode's negative input", "set cfg 1 "))


def test_a_prompt_without_an_encoder_names_each_readers_encoder(files):
    with pytest.raises(TextEmbeddingError) as api:
        decode(load_pid(files[FLUX]), torch.randn(1, 16, 3, 4), text="a red fox")
    messages = in_three_contexts(api.value, api.value.render(CLI))
    speaks(messages, api=("text_encoder=",), cli=("--text-encoder",), node=("Load CLIP, type pixeldit",))


# --- files: missing, truncated, not a PiD checkpoint -------------------------------------------------

def test_a_missing_checkpoint_in_three_contexts(files, capsys):
    cli = cli_message(capsys, decode_args(files, checkpoint=files["missing"]))
    with pytest.raises(CheckpointError) as api:
        load_pid(files["missing"])
    messages = in_three_contexts(api.value, cli)
    where = f"Checkpoint not found: {files['missing']}. Check "
    assert messages == {API: where + "the path.", CLI: where + "the path given to --checkpoint.",
                        NODE: where + "ComfyUI's models/pid folder (or models/diffusion_models), then refresh the page."}


def test_a_truncated_checkpoint_in_three_contexts(files, capsys):
    """Nothing in it differs by reader, and no reader's library text reaches it."""
    cli = cli_message(capsys, decode_args(files, checkpoint="truncated.safetensors"))
    with pytest.raises(CheckpointError) as api:
        load_pid(files["truncated.safetensors"])
    messages = in_three_contexts(api.value, cli)
    assert len(set(messages.values())) == 1
    assert re.fullmatch(r"truncated.safetensors is truncated \([\d,]+ of the [\d,]+ bytes its header announces\): "
                        r"download or save it again.", messages[API]), messages[API]


def test_a_model_that_is_not_pid_in_three_contexts(files, capsys):
    cli = cli_message(capsys, decode_args(files, checkpoint="flux_dit.safetensors"))
    with pytest.raises(CheckpointError) as api:
        load_pid(files["flux_dit.safetensors"])
    messages = in_three_contexts(api.value, cli)
    assert messages[NODE] == ("flux_dit.safetensors is not a PiD checkpoint: it looks like a FLUX diffusion model. "
                              "Pick a PiD checkpoint in PiD Loader.")
    speaks(messages, api=("load_pid",), cli=("--checkpoint",), node=("PiD Loader",))
