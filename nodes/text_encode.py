"""PiD Text Encode: a prompt and a negative prompt -> PiD's Gemma-2 conditionings, encoded exactly the
reference's way with core's Gemma CLIP (CLIPLoader type 'pixeldit').

Core's pixeldit tokenizer skips the instruction prompt (CHI) for an empty prompt, while the reference
always encodes CHI + caption; and its prompt parsing (weights, escapes, "embedding:" names) is not the
reference's. So the token ids are built here by pid_core.text.contract_token_ids with core's own
SentencePiece tokenizer, and core's encoder turns them into hidden states (its BOS + last 299).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..pid_core.text import NEGATIVE_PROMPT, TEXT_TOKENS, contract_token_ids
from ..pid_core.wording import term
from .common import CATEGORY, NODE_ID_TEXT_ENCODE, NodeInputError

_LOAD_GEMMA = f"Connect {term.gemma_file} here."


def pid_tokens(clip, caption: str) -> dict:
    """Core's token-weight pairs for CHI + caption, padded to the contract's length."""
    try:
        from comfy.text_encoders.pixeldit import PixelDiTGemma2Tokenizer
    except ImportError:  # a ComfyUI without PiD's Gemma support
        raise NodeInputError(f"This ComfyUI has no PixelDiT Gemma text encoder: update ComfyUI. {_LOAD_GEMMA}") from None
    tokenizer = getattr(clip, "tokenizer", None)
    if not isinstance(tokenizer, PixelDiTGemma2Tokenizer):
        raise NodeInputError(f"The CLIP input is not PiD's Gemma-2 text encoder ({type(tokenizer).__name__}). {_LOAD_GEMMA}")
    gemma = getattr(tokenizer, tokenizer.clip)  # core's SentencePiece tokenizer wrapper

    def encode(text: str) -> list[int]:  # BOS + ids, as core's tokenizer builds them (no EOS)
        return [gemma.start_token] + list(gemma.tokenizer(text)["input_ids"][gemma.tokens_start:])

    ids, _ = contract_token_ids(encode, caption, pad_id=gemma.pad_token, max_tokens=TEXT_TOKENS)
    return {tokenizer.clip_name: [[(token, 1.0) for token in ids]]}


def encode_pid_text(clip, caption: str):
    """CONDITIONING [[hidden states [1, 300, 2304], {...}]] of one caption."""
    return clip.encode_from_tokens_scheduled(pid_tokens(clip, caption))


class PiDTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID_TEXT_ENCODE,
            display_name="PiD Text Encode",
            category=CATEGORY,
            search_aliases=["pid prompt", "pid text", "pid clip text encode", "gemma pid"],
            description=(
                "Encodes PiD's prompt and negative prompt with the Gemma-2 text encoder exactly as the reference "
                "does (instruction prompt + caption, also for an empty prompt). The negative prompt is for the "
                "undistilled checkpoints' guidance; the 4-step students use only the prompt."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="Gemma-2-2b-it from Load CLIP (CLIPLoader) with type 'pixeldit'."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True, default="",
                                tooltip="What the image shows: keep it the same as the latent model's prompt. "
                                        "Empty is fine."),
                io.String.Input("negative_prompt", multiline=True, dynamic_prompts=True, default=NEGATIVE_PROMPT,
                                tooltip="What guidance steers away from (undistilled checkpoints, cfg > 1). The "
                                        "default is the reference's negative prompt."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="The prompt for PiD Decode's conditioning input."),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="The negative prompt for PiD Decode's negative input (undistilled "
                                               "checkpoints)."),
            ],
        )

    @classmethod
    def execute(cls, clip, prompt, negative_prompt) -> io.NodeOutput:
        if clip is None:
            raise NodeInputError(f"No CLIP is connected. {_LOAD_GEMMA}")
        return io.NodeOutput(encode_pid_text(clip, prompt), encode_pid_text(clip, negative_prompt))
