"""Text conditioning: prompt -> Gemma-2-2b-it hidden states [B, 300, 2304] (docs/DESIGN.md §6).

The PiD text contract, all of it part of the model's input:
  text    = CHI_PROMPT + caption                       (no separator: the prompt ends with "User Prompt: ")
  num_chi = len(tokenizer.encode(CHI_PROMPT))          (counts BOS)
  ids     = tokenize(text, right padding and right truncation to num_chi + 300 - 2 tokens)
  h       = Gemma2Model(ids, attention_mask).last_hidden_state   (after the final RMSNorm)
  y       = h[:, [0, -299, ..., -1]]                   (BOS + last 299 = 300 tokens, pads included)
The mask is not returned: PiD runs its network without a text mask, so the pad states matter.

Also here: checks for precomputed embeddings (a ComfyUI CONDITIONING tensor or a file), so that a
wrong encoder (T5, CLIP, ...) fails with a message instead of a shape error deep in the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import TextEmbeddingError
from .file_damage import what_is_wrong
from .wording import library_detail, term

TEXT_TOKENS = 300  # tokens the network was trained with (y_pos_embedding length)
TEXT_DIM = 2304  # Gemma-2-2b hidden size

# The largest value taken in a text embedding. Gemma-2-2b-it's last hidden state leaves its final RMSNorm:
# x_i / rms(x) is at most sqrt(2304) = 48 in size, times the norm's weight (1 + w_i), so real values are a few
# hundred at most; 1e5 would need a norm weight above 2000. PiD's own text norm sums the squares of its
# projected input in fp32, which overflows (every token becomes exactly 0, the prompt silently ignored) from
# text values of about 1e17 in fp32 and bf16 alike (bf16 has fp32's range): 1e5 is 12 orders of magnitude
# below. Values beyond it are no hidden state: a scaled tensor, or another layer's or model's output.
MAX_TEXT_VALUE = 1e5

CHI_PROMPT_SHA256 = "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"
_CHI_PROMPT_FILE = Path(__file__).with_name("chi_prompt.txt")


def _read_chi_prompt() -> str:
    # Read bytes, not text mode: the prompt must be byte exact (no trailing newline). A CRLF
    # checkout (git autocrlf) is the one harmless corruption, so undo it; anything else is caught by
    # the checksum in _check_chi_prompt().
    return _CHI_PROMPT_FILE.read_bytes().decode("utf-8").replace("\r\n", "\n")


CHI_PROMPT: str = _read_chi_prompt()

# The unconditional text of the undistilled checkpoints' classifier-free guidance: the reference model
# config's default negative prompt, encoded like any caption, CHI prompt included (docs/DESIGN.md §6).
NEGATIVE_PROMPT = (
    "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, low res, "
    "blurry, deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, watermark"
)


def _check_chi_prompt() -> None:
    digest = hashlib.sha256(CHI_PROMPT.encode("utf-8")).hexdigest()
    if digest != CHI_PROMPT_SHA256:
        raise TextEmbeddingError(
            f"{_CHI_PROMPT_FILE} was modified (sha256 {digest[:12]}..., expected {CHI_PROMPT_SHA256[:12]}...). "
            "It is part of PiD's input and must be byte exact, with no trailing newline: restore it from "
            "the node pack (e.g. `git checkout -- pid_core/chi_prompt.txt`)."
        )


# --------------------------------------------------------------------------------------------------
# Checks and files for precomputed embeddings
# --------------------------------------------------------------------------------------------------

# Widths of other text encoders, to name the likely mistake. Only widths we are sure of.
_KNOWN_WIDTHS = {
    768: "a CLIP-L text encoder (SD1.5)",
    1280: "a CLIP-G text encoder",
    2048: "an SDXL conditioning (CLIP-L + CLIP-G)",
    2560: "a Qwen3-4B text encoder (Z-Image)",
    3584: "a Qwen2.5-VL-7B text encoder (Qwen-Image)",
    4096: "a T5-XXL (FLUX.1 / SD3) text encoder",
}
_HOW_TO_LOAD = term.encode_prompt
_HOW_TO_ENCODE = f"PiD needs Gemma-2-2b-it hidden states encoded with its instruction prompt: {_HOW_TO_LOAD}"


def released_text_difference(text_dim: int, max_tokens: int) -> Optional[str]:
    """How a text layer taking `text_dim`-wide text of at most `max_tokens` tokens differs from every
    released PiD's (Gemma-2-2b-it's hidden states, 2304 wide, 300 tokens), or None when it does not."""
    differences = []
    if text_dim != TEXT_DIM:
        differences.append(f"{text_dim}-wide text, where every released PiD takes Gemma-2-2b-it's hidden states, "
                           f"{TEXT_DIM} wide")
    if max_tokens != TEXT_TOKENS:
        differences.append(f"at most {max_tokens} text tokens, where every released PiD takes {TEXT_TOKENS}")
    return "; and ".join(differences) or None


def validate_text_embedding(emb: Any, *, text_dim: int = TEXT_DIM, max_tokens: int = TEXT_TOKENS,
                            unreleased: Optional[str] = None) -> torch.Tensor:
    """Check a precomputed text embedding and return it as [B, T, D] (dtype and device unchanged).

    Accepts [T, D] or [B, T, D]. T < max_tokens is allowed (the network takes shorter text; the
    reference only ever cuts to 300), T > max_tokens is not. Values must be finite and at most
    MAX_TEXT_VALUE in size. unreleased: the sentence saying why the checkpoint is none of the released
    PiDs (variants.unreleased_structure), for a width or length that only such a checkpoint asks for.
    """
    if not isinstance(emb, torch.Tensor):
        try:
            import numpy as np

            if isinstance(emb, np.ndarray):
                if emb.dtype.kind != "f":
                    raise TextEmbeddingError(
                        f"The text embedding is a numpy array of {emb.dtype}, not floating-point hidden states. "
                        f"{_HOW_TO_ENCODE}."
                    )
                emb = torch.from_numpy(emb)
        except ImportError:  # pragma: no cover - numpy is a requirement
            pass
    if not isinstance(emb, torch.Tensor):
        raise TextEmbeddingError(
            f"The text embedding is a {type(emb).__name__}, not a tensor. {_HOW_TO_ENCODE}."
        )
    if not emb.is_floating_point():
        raise TextEmbeddingError(
            f"The text embedding has dtype {emb.dtype}; it must hold floating-point hidden states, not token "
            f"ids or a mask. {_HOW_TO_ENCODE}."
        )
    if emb.ndim == 2:
        emb = emb.unsqueeze(0)
    if emb.ndim != 3:
        raise TextEmbeddingError(
            f"The text embedding has shape {tuple(emb.shape)}; expected [tokens, {text_dim}] or "
            f"[batch, tokens, {text_dim}]. {_HOW_TO_ENCODE}."
        )
    b, t, d = emb.shape
    # A checkpoint whose text layer is no released PiD's: say so, instead of calling its width Gemma's.
    custom = released_text_difference(text_dim, max_tokens)
    if custom and (d != text_dim or t > max_tokens):
        what = f"width {d}" + (" (Gemma-2-2b-it's)" if d == TEXT_DIM else "") if d != text_dim else f"{t} tokens"
        checkpoint = unreleased or f"the checkpoint's text layer takes {custom}"
        raise TextEmbeddingError(
            f"The text embedding has {what}, but {checkpoint}. Load a released PiD checkpoint (an official "
            "model_ema_bf16.pth or a Comfy-Org pid_*.safetensors), or an embedding made for this one."
        )
    if d != text_dim:
        guess = _KNOWN_WIDTHS.get(d)
        looks = f"; width {d} looks like {guess}" if guess else ""
        raise TextEmbeddingError(
            f"The text embedding has width {d}{looks}. PiD needs Gemma-2-2b-it hidden states of width "
            f"{text_dim}: {_HOW_TO_LOAD}."
        )
    if b == 0 or t == 0:
        raise TextEmbeddingError(
            f"The text embedding is empty (shape {tuple(emb.shape)}). Encode a prompt (an empty prompt is fine)."
        )
    if t > max_tokens:
        raise TextEmbeddingError(
            f"The text embedding has {t} tokens; PiD takes at most {max_tokens} (its text contract keeps BOS + the "
            f"last {max_tokens - 1} tokens of instruction prompt + caption + padding). It was not made by a PiD "
            f"text encoder. {_HOW_TO_ENCODE}."
        )
    peak = emb.detach().float().abs().amax().item()  # NaN propagates
    if not math.isfinite(peak):
        raise TextEmbeddingError(
            "The text embedding contains NaN or infinite values, usually a text encoder run in float16 that "
            "overflowed. Re-encode the prompt with the encoder in bfloat16 or float32."
        )
    if peak > MAX_TEXT_VALUE:
        raise TextEmbeddingError(
            f"The text embedding reaches {peak:.3g}, but Gemma-2-2b-it's hidden states leave its final norm a few "
            f"hundred in size at most (up to {MAX_TEXT_VALUE:g} is taken): it was scaled, or it is not Gemma's last "
            f"hidden state. {_HOW_TO_ENCODE}."
        )
    return emb


# --------------------------------------------------------------------------------------------------
# The token ids of the contract
# --------------------------------------------------------------------------------------------------


def contract_token_ids(encode: Callable[[str], Sequence[int]], caption: str, *, pad_id: int,
                       max_tokens: int = TEXT_TOKENS) -> tuple[list[int], int]:
    """(ids, real tokens) that PiD's text contract hands to Gemma for one caption (docs/DESIGN.md §6).

    encode(text) -> Gemma ids with BOS first (any tokenizer: transformers', ComfyUI's SentencePiece).
    CHI_PROMPT + caption, right-truncated and right-padded with pad_id to num_chi + max_tokens - 2,
    num_chi = len(encode(CHI_PROMPT)). An empty caption is CHI_PROMPT + "" like any other."""
    length = len(encode(CHI_PROMPT)) + max_tokens - 2
    ids = list(encode(CHI_PROMPT + caption))[:length]
    return ids + [pad_id] * (length - len(ids)), len(ids)


# --------------------------------------------------------------------------------------------------
# Gemma-2 encoder
# --------------------------------------------------------------------------------------------------

# Attention without the logit soft-cap by default. The reference runs transformers 4.57 with its
# default "sdpa" path, which silently ignores Gemma-2's attn_logit_softcapping=50 (docs/DESIGN.md §6), so
# the reference embeddings are the no-softcap ones (ComfyUI's Gemma-2 has no soft-cap either). We set
# the soft-cap to None in the config, so no backend applies it. transformers >= 5 refuses "sdpa" for
# Gemma-2, so plain SDPA is registered under our own name (which must not contain "sdpa": transformers
# checks that substring). "eager" keeps the soft-cap, as an option (unverified which one PiD saw).
_NO_SOFTCAP_ATTENTION = "pid_nocap_attention"


def _attention_backend(attn_implementation: str) -> str:
    if attn_implementation == "eager":
        return "eager"
    if attn_implementation != "sdpa":
        raise TextEmbeddingError(
            f"attn_implementation={attn_implementation!r} is not supported; use 'sdpa' (reference, no soft-cap) "
            "or 'eager' (Gemma-2 soft-cap applied)."
        )
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older transformers: Gemma-2 accepts "sdpa" itself and ignores the soft-cap
        return "sdpa"
    AttentionInterface.register(_NO_SOFTCAP_ATTENTION, AttentionInterface._global_mapping["sdpa"])
    AttentionMaskInterface.register(_NO_SOFTCAP_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
    return _NO_SOFTCAP_ATTENTION


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed torch_dtype= to dtype= in 4.56.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _check_gemma2_config(config: Any, text_dim: int, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "gemma2":
        raise TextEmbeddingError(
            f"{where} is a '{model_type}' model, not Gemma-2. PiD needs the Gemma-2-2b-it text encoder "
            "(google/gemma-2-2b-it, or ComfyUI's gemma_2_2b_it_elm_bf16.safetensors)."
        )
    if config.hidden_size != text_dim:
        raise TextEmbeddingError(
            f"{where} is a Gemma-2 model of width {config.hidden_size}; PiD needs Gemma-2-2b-it (width {text_dim}). "
            "Gemma-2-9b/27b do not fit."
        )


# Gemma-2-2b(-it) config.json; used for a single weights file, which carries no config.
_GEMMA2_2B_CONFIG = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
)

_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _gemma_state_dict(raw: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """HF-layout Gemma-2 weights from a single file -> Gemma2Model keys (no "model." prefix, no LM head).

    ComfyUI's gemma_2_2b_it_elm_*.safetensors uses the HF names ("model.layers.N.self_attn.q_proj.weight",
    norms stored as HF does, i.e. applied as 1 + w), may embed its tokenizer as a uint8 "spiece_model"
    tensor, and the fp8_scaled variant stores float8 weights with a per-tensor scale.
    """
    sd: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key in ("spiece_model", "scaled_fp8") or key.startswith("lm_head."):
            continue
        key = key[len("model."):] if key.startswith("model.") else key
        if key.endswith((".scale_input", ".input_scale")):
            continue
        if key.endswith(".comfy_quant"):
            try:
                conf = json.loads(bytes(value.tolist()).decode("utf-8"))
            except Exception:
                conf = {}
            if not isinstance(conf, dict) or not str(conf.get("format", "")).startswith("float8") or conf.get("convrot"):
                raise TextEmbeddingError(
                    f"{name} uses a quantized format this encoder cannot read ({conf}). Use the bf16 Gemma file "
                    "(gemma_2_2b_it_elm_bf16.safetensors) or the Hugging Face folder."
                )
            continue
        if key.endswith((".scale_weight", ".weight_scale")):
            scales[key.rsplit(".", 1)[0] + ".weight"] = value
            continue
        sd[key] = value
    for key, scale in scales.items():
        w = sd.get(key)
        if w is None or scale.numel() != 1 or w.dtype not in _FP8_DTYPES:
            raise TextEmbeddingError(
                f"{name}: unsupported quantized weight {key}. Use the bf16 Gemma file or the Hugging Face folder."
            )
        sd[key] = w.float() * scale.float()
    bad = [k for k, v in sd.items() if not v.is_floating_point() or v.dtype in _FP8_DTYPES]
    if bad:
        raise TextEmbeddingError(
            f"{name}: quantized tensors without a scale ({bad[0]}, ...). Use the bf16 Gemma file or the Hugging Face folder."
        )
    if (
        "embed_tokens.weight" not in sd
        or "layers.0.post_feedforward_layernorm.weight" not in sd
        or "layers.0.self_attn.q_norm.weight" in sd  # Gemma-3
    ):
        hint = ""
        if "layers.0.self_attn.q_norm.weight" in sd:
            hint = " It looks like a Gemma-3 model."
        elif any(k.startswith(("encoder.block.", "shared.")) for k in sd):
            hint = " It looks like a T5 encoder (FLUX/SD3)."
        elif any("text_model" in k or "resblocks" in k for k in sd):
            hint = " It looks like a CLIP text encoder."
        raise TextEmbeddingError(
            f"{name} is not a Gemma-2 checkpoint.{hint} "
            "PiD needs Gemma-2-2b-it (ComfyUI's gemma_2_2b_it_elm_bf16.safetensors or google/gemma-2-2b-it)."
        )
    return sd


def _config_from_state_dict(sd: dict[str, torch.Tensor]):
    """Gemma-2-2b config with the sizes the weights show (head_dim cannot be read from shapes)."""
    from transformers import Gemma2Config

    vocab, hidden = sd["embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    head_dim = _GEMMA2_2B_CONFIG["head_dim"]
    return Gemma2Config(**{
        **_GEMMA2_2B_CONFIG,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": sd["layers.0.mlp.gate_proj.weight"].shape[0],
        "num_attention_heads": sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
    })


class _SentencePieceTokenizer:
    """The subset of a transformers tokenizer that encode() uses, over a SentencePiece model.

    For ComfyUI's Gemma file, which embeds its tokenizer.model as a "spiece_model" tensor. Settings
    as Gemma's: BOS added, no EOS, pad id from the model (0).
    """

    padding_side = "right"
    truncation_side = "right"

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.bos_token_id = self.sp.bos_id()
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + self.sp.encode(text)

    def __call__(self, texts, *, max_length: int, padding="max_length", truncation=True, return_tensors="pt"):
        ids = [self.encode(t)[:max_length] for t in texts]
        mask = [[1] * len(x) + [0] * (max_length - len(x)) for x in ids]
        ids = [x + [self.pad_token_id] * (max_length - len(x)) for x in ids]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}


def _load_tokenizer(tokenizer_path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    except Exception as e:
        raise TextEmbeddingError(
            f"{tokenizer_path} holds no tokenizer that loads: give {term.tokenizer_folder}{library_detail(e)}."
        ) from e


def _load_folder(path: Path, tokenizer_path, backend: str, dtype: torch.dtype, text_dim: int):
    """(Gemma2Model, tokenizer) from a Hugging Face folder."""
    from transformers import AutoConfig, Gemma2Model

    if not (path / "config.json").is_file():
        raise TextEmbeddingError(
            f"{path} has no config.json, so it is not a Hugging Face model folder: give {term.gemma_file}."
        )
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise TextEmbeddingError(
            f"{path / 'config.json'} is not a model config that transformers reads: give {term.gemma_file}"
            f"{library_detail(e)}."
        ) from e
    _check_gemma2_config(cfg, text_dim, str(path))
    tokenizer = _load_tokenizer(tokenizer_path or path)
    if backend != "eager":
        cfg.attn_logit_softcapping = None  # see _attention_backend
    try:
        # Gemma2Model loads the trunk of a Gemma2ForCausalLM checkpoint; the LM head is never built.
        model = Gemma2Model.from_pretrained(
            str(path), config=cfg, local_files_only=True, attn_implementation=backend, **_dtype_kwargs(dtype)
        )
    except Exception as e:
        raise TextEmbeddingError(f"The Gemma-2 weights in {path} do not load: the folder is incomplete or damaged; get "
                                 f"google/gemma-2-2b-it again{library_detail(e)}.") from e
    return model, tokenizer


def _single_file_tokenizer(path: Path, tokenizer_path, spiece):
    """The tokenizer for a single weights file: a folder given by the user, or the one it embeds."""
    if tokenizer_path is not None:
        return _load_tokenizer(tokenizer_path)
    if spiece is None:
        raise TextEmbeddingError(f"{path.name} holds no tokenizer: give {term.tokenizer_folder}.")
    try:
        return _SentencePieceTokenizer(spiece.numpy().tobytes())
    except ImportError as e:
        raise TextEmbeddingError(
            f"{path.name} embeds a SentencePiece tokenizer, but the sentencepiece package is not "
            f"installed: `pip install sentencepiece`, or give {term.tokenizer_folder}."
        ) from e


def _load_single_file(path: Path, tokenizer_path, backend: str, dtype: torch.dtype, text_dim: int, config):
    """(Gemma2Model, tokenizer) from one .safetensors file (ComfyUI's Gemma file, HF key names)."""
    from safetensors.torch import load_file
    from transformers import Gemma2Model

    if path.suffix.lower() != ".safetensors":
        raise TextEmbeddingError(
            f"{path.name} is not a .safetensors file, the one single-file form of Gemma read here: give {term.gemma_file}."
        )
    try:
        raw = load_file(str(path), device="cpu")
    except Exception as e:
        wrong = what_is_wrong(str(path), "safetensors", e)
        raise TextEmbeddingError(f"{path.name} {wrong}: download it again." if wrong else
                                 f"{path.name} could not be read as safetensors, so it is damaged or not such a file: "
                                 f"download it again{library_detail(e)}.") from None
    spiece = raw.get("spiece_model")
    sd = _gemma_state_dict(raw, path.name)
    del raw
    cfg = config if config is not None else _config_from_state_dict(sd)
    _check_gemma2_config(cfg, text_dim, path.name)
    tokenizer = _single_file_tokenizer(path, tokenizer_path, spiece)
    if backend != "eager":
        cfg.attn_logit_softcapping = None
    try:
        model, info = Gemma2Model.from_pretrained(
            None, config=cfg, state_dict=sd, attn_implementation=backend, output_loading_info=True,
            **_dtype_kwargs(dtype),
        )
    except Exception as e:
        raise TextEmbeddingError(f"{path.name} does not fit the Gemma-2-2b architecture: use an unmodified "
                                 f"Gemma-2-2b-it file{library_detail(e)}.") from e
    problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:3]}" for k, v in problems.items() if v)
        raise TextEmbeddingError(
            f"{path.name} does not match the Gemma-2-2b architecture ({detail}). Use an unmodified Gemma-2-2b-it file."
        )
    return model, tokenizer


class GemmaTextEncoder:
    """Gemma-2-2b-it trunk + tokenizer implementing the PiD text contract, with a per-prompt cache.

    `model` is a Gemma2Model (decoder trunk, no LM head) or anything called as
    model(input_ids=..., attention_mask=...) returning .last_hidden_state.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_tokens: int = TEXT_TOKENS, cache_size: int = 64):
        _check_chi_prompt()
        self.model = model.eval()
        self.tokenizer = tokenizer
        # right padding; truncation keeps the start (BOS, instruction prompt).
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise TextEmbeddingError("The tokenizer has no pad token. Use the Gemma-2-2b-it tokenizer (pad id 0).")
        self.max_tokens = max_tokens
        chi_ids = list(tokenizer.encode(CHI_PROMPT))
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None or not chi_ids or chi_ids[0] != bos:
            raise TextEmbeddingError(
                "The tokenizer does not add a BOS token; PiD's text contract counts it. Use the Gemma-2-2b-it "
                "tokenizer files from google/gemma-2-2b-it."
            )
        self.num_chi = len(chi_ids)  # counts BOS
        self.max_length = self.num_chi + max_tokens - 2  # docs/DESIGN.md §6, step 2
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        attn_implementation: str = "sdpa",
        config: Any = None,
        text_dim: int = TEXT_DIM,
        cache_size: int = 64,
    ) -> "GemmaTextEncoder":
        """Load from a Hugging Face folder (config.json + weights + tokenizer) or a single .safetensors.

        Never downloads (local_files_only). A single file needs `tokenizer_path` unless it embeds a
        SentencePiece tokenizer (ComfyUI's file; needs the sentencepiece package, which ComfyUI has).
        `config` (a Gemma2Config) overrides the Gemma-2-2b config assumed for a single file.
        Gemma runs in bf16 by default, like the reference (docs/DESIGN.md §6).
        """
        path = Path(path)
        backend = _attention_backend(attn_implementation)
        if path.is_dir():
            model, tokenizer = _load_folder(path, tokenizer_path, backend, dtype, text_dim)
        elif path.is_file():
            model, tokenizer = _load_single_file(path, tokenizer_path, backend, dtype, text_dim, config)
        else:
            raise TextEmbeddingError(f"Gemma text encoder not found: {path}. Check the path.")
        return cls(model.to(device), tokenizer, cache_size=cache_size)

    # ------------------------------------------------------------------ encoding

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> [B, 300, hidden] float32 on the CPU. Cached prompts cost nothing."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TextEmbeddingError("encode() takes a prompt string or a non-empty list of strings.")
        results: dict[str, torch.Tensor] = {}
        todo = []
        for p in prompts:
            if p in results:
                continue
            if p in self._cache:
                self._cache.move_to_end(p)
                results[p] = self._cache[p]
            else:
                todo.append(p)
                results[p] = None  # placeholder, keeps todo unique
        if todo:
            for p, emb in zip(todo, self._forward(todo)):
                results[p] = emb
                self._cache[p] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack([results[p] for p in prompts])  # a copy: callers cannot alter the cache

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """CHI prompt + caption, right-padded/truncated to num_chi + 300 - 2 tokens (contract_token_ids)."""
        encoded = [contract_token_ids(self.tokenizer.encode, p, pad_id=self.tokenizer.pad_token_id,
                                      max_tokens=self.max_tokens) for p in prompts]
        return {
            "input_ids": torch.tensor([ids for ids, _ in encoded], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * n + [0] * (len(ids) - n) for ids, n in encoded], dtype=torch.long),
        }

    @torch.inference_mode()
    def _forward(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        tokens = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        hidden = self.model(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
        ).last_hidden_state  # after the final norm
        n = self.max_tokens
        index = torch.tensor([0, *range(hidden.shape[1] - (n - 1), hidden.shape[1])], device=hidden.device)
        selected = hidden.index_select(1, index)  # BOS + last 299; no mask kept
        return list(selected.float().cpu().unbind(0))
