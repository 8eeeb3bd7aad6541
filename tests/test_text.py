"""Tests for pid_core.text: the PiD text contract on a tiny random Gemma-2 (CPU, no downloads)."""

import hashlib
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, PreTrainedTokenizerFast, T5Config

from pid_core.errors import TextEmbeddingError
from pid_core.wording import CLI, NODE
from pid_core.text import (
    CHI_PROMPT,
    NEGATIVE_PROMPT,
    TEXT_DIM,
    TEXT_TOKENS,
    GemmaTextEncoder,
    contract_token_ids,
    validate_text_embedding,
)

CHI_SHA256 = "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"
HIDDEN = 32
PAD, EOS, BOS, UNK = 0, 1, 2, 3  # Gemma's ids


# ------------------------------------------------------------------------------------------ helpers

# Words with their leading space, single punctuation marks, lone spaces: ~210 tokens for the CHI prompt.
PIECES = r" ?\w+|[^\w ]| "


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the CHI prompt's pieces, BOS added like Gemma's (no EOS)."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK}
    for piece in sorted(set(re.findall(PIECES, CHI_PROMPT)) | set(string.printable)):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",  # the encoder must force right padding itself
    )


TOKENIZER = make_tokenizer()
VOCAB = len(TOKENIZER)


def tiny_config(**overrides) -> Gemma2Config:
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=2048, sliding_window=4096, attn_logit_softcapping=None,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    kw.update(overrides)
    config = Gemma2Config(**kw)
    # Reference models use plain (eager) attention, which applies the soft-cap when one is set:
    # transformers 4.x would otherwise default to SDPA, which silently ignores it.
    config._attn_implementation = "eager"
    return config


def tiny_model(seed: int = 0, **overrides) -> Gemma2Model:
    torch.manual_seed(seed)
    return Gemma2Model(tiny_config(**overrides)).eval()


def manual_reference(model, tokenizer, prompts):
    """The reference computation written out (docs/DESIGN.md §6)."""
    num_chi = len(tokenizer.encode(CHI_PROMPT))
    tokenizer.padding_side = "right"
    tok = tokenizer(
        [CHI_PROMPT + p for p in prompts], max_length=num_chi + 300 - 2, padding="max_length",
        truncation=True, return_tensors="pt",
    )
    with torch.no_grad():
        h = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    select_index = [0] + list(range(-300 + 1, 0))
    return h[:, select_index].float()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture()
def encoder(model):
    return GemmaTextEncoder(model, make_tokenizer())


# ------------------------------------------------------------------------------------------ CHI prompt

def test_chi_prompt_is_byte_exact():
    path = Path(__file__).resolve().parent.parent / "pid_core" / "chi_prompt.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CHI_SHA256
    assert hashlib.sha256(CHI_PROMPT.encode("utf-8")).hexdigest() == CHI_SHA256
    assert len(CHI_PROMPT) == 1057
    assert len(CHI_PROMPT.split("\n")) == 8
    assert CHI_PROMPT.endswith("User Prompt: ") and not CHI_PROMPT.endswith("\n")


def test_constants():
    assert TEXT_TOKENS == 300 and TEXT_DIM == 2304


# ------------------------------------------------------------------------------------------ tokenization

def test_num_chi_counts_bos(encoder):
    ids = encoder.tokenizer.encode(CHI_PROMPT)
    assert ids[0] == BOS
    assert encoder.num_chi == len(re.findall(PIECES, CHI_PROMPT)) + 1  # BOS + one token per piece
    assert encoder.max_length == encoder.num_chi + 298


def test_tokenize_right_pads_to_num_chi_plus_298(encoder):
    tok = encoder.tokenize(["a cat", ""])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert ids.shape == (2, encoder.num_chi + 298)
    assert (ids[:, 0] == BOS).all()
    n_real = len(encoder.tokenizer.encode(CHI_PROMPT + "a cat"))
    assert mask[0, :n_real].all() and not mask[0, n_real:].any()  # right padding
    assert (ids[0, n_real:] == PAD).all()
    assert mask[1].sum() == encoder.num_chi  # empty caption: CHI prompt + pads
    # The CHI tokens come first (the last one may merge with the caption in a real BPE).
    assert ids[0, : encoder.num_chi - 1].tolist() == encoder.tokenizer.encode(CHI_PROMPT)[:-1]


def test_long_caption_is_truncated_on_the_right(encoder):
    caption = " a cat" * 400
    assert len(encoder.tokenizer.encode(CHI_PROMPT + caption)) > encoder.num_chi + 298
    tok = encoder.tokenize([caption])
    assert tok["input_ids"].shape[1] == encoder.num_chi + 298
    assert tok["attention_mask"].all()
    assert tok["input_ids"][0, : encoder.num_chi - 1].tolist() == encoder.tokenizer.encode(CHI_PROMPT)[:-1]


def test_contract_ids_are_the_reference_tokenizer_call(encoder):
    """contract_token_ids (also what PiD Text Encode builds with ComfyUI's tokenizer) is the reference's
    tokenizer call: CHI + caption, right padding and truncation to num_chi + 298."""
    tokenizer = make_tokenizer()
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    for caption in ("", "a cat", " a cat" * 400):
        expected = tokenizer([CHI_PROMPT + caption], max_length=encoder.num_chi + 298, padding="max_length",
                             truncation=True, return_tensors="pt")
        ids, real = contract_token_ids(tokenizer.encode, caption, pad_id=PAD)
        assert ids == expected["input_ids"][0].tolist()
        assert real == int(expected["attention_mask"][0].sum())
        assert torch.equal(encoder.tokenize([caption])["attention_mask"], expected["attention_mask"])


def test_negative_prompt_is_the_references():
    assert NEGATIVE_PROMPT.startswith("low quality, worst quality, over-saturated, three legs, six fingers,")
    assert NEGATIVE_PROMPT.endswith("plastic skin, jpeg artifacts, watermark")


# ------------------------------------------------------------------------------------------ encoding

def test_encode_is_bos_plus_last_299(encoder, model):
    prompts = ["a small fluffy white cat", "a busy city street at dusk"]
    out = encoder.encode(prompts)
    assert out.shape == (2, 300, HIDDEN) and out.dtype == torch.float32
    assert torch.equal(out, manual_reference(model, make_tokenizer(), prompts))

    # The kept window starts at the last CHI token (position num_chi - 1) and runs to the end.
    tok = encoder.tokenize(prompts[:1])
    with torch.no_grad():
        h = model(**tok).last_hidden_state
    assert torch.equal(out[0, 0], h[0, 0])
    assert torch.equal(out[0, 1], h[0, encoder.num_chi - 1])
    assert torch.equal(out[0, 1:], h[0, encoder.num_chi - 1 :])


def test_pad_positions_are_kept(encoder):
    out = encoder.encode("a cat")
    # Tail positions are pads: real hidden states (not zeros, not masked out).
    assert out[0, -50:].abs().sum() > 0


def test_batch_equals_single(model):
    prompts = ["a red ball", "", "two dogs on a beach, golden hour"]
    batch = GemmaTextEncoder(model, make_tokenizer()).encode(prompts)
    for i, p in enumerate(prompts):
        single = GemmaTextEncoder(model, make_tokenizer()).encode(p)
        torch.testing.assert_close(batch[i], single[0], rtol=1e-5, atol=1e-5)


def test_empty_prompt_is_chi_plus_pads(encoder, model):
    out = encoder.encode("")
    assert out.shape == (1, 300, HIDDEN)
    assert torch.equal(out, manual_reference(model, make_tokenizer(), [""]))
    assert torch.isfinite(out).all()


def test_cache_avoids_recomputation(model):
    enc = GemmaTextEncoder(model, make_tokenizer(), cache_size=2)
    batches = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: batches.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        a = enc.encode("a cat")
        assert batches == [1]
        b = enc.encode("a cat")
        assert batches == [1] and torch.equal(a, b)
        enc.encode(["a cat", "a dog", "a dog"])  # only the new prompt, once
        assert batches == [1, 1]
        b.zero_()  # the caller's tensor is a copy
        assert torch.equal(enc.encode("a cat"), a) and batches == [1, 1]
        enc.encode("a bird")  # LRU of 2: "a dog" (least recent) is evicted
        assert list(enc._cache) == ["a cat", "a bird"]
        enc.clear_cache()
        enc.encode("a cat")
        assert batches == [1, 1, 1, 1]
    finally:
        handle.remove()


def test_encode_rejects_bad_input(encoder):
    with pytest.raises(TextEmbeddingError):
        encoder.encode([])
    with pytest.raises(TextEmbeddingError):
        encoder.encode([1, 2])


def test_tokenizer_without_bos_or_pad_is_rejected(model):
    with pytest.raises(TextEmbeddingError, match="BOS"):
        GemmaTextEncoder(model, make_tokenizer(add_bos=False))
    tok = make_tokenizer()
    tok.pad_token = None
    with pytest.raises(TextEmbeddingError, match="pad"):
        GemmaTextEncoder(model, tok)


# ------------------------------------------------------------------------------------------ from_pretrained

# Large weights and a small soft-cap, so that the soft-cap visibly changes the output.
CAPPED = dict(attn_logit_softcapping=1.0, initializer_range=0.5)


def save_tiny_folder(folder: Path, seed: int = 0, **overrides) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    lm = Gemma2ForCausalLM(tiny_config(**overrides)).eval()
    lm.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return lm


def trunk_without_softcap(lm: Gemma2ForCausalLM) -> Gemma2Model:
    ref = Gemma2Model(tiny_config(**{**CAPPED, "attn_logit_softcapping": None})).eval()
    ref.load_state_dict(lm.model.state_dict())
    return ref


def test_from_pretrained_folder_default_is_no_softcap(tmp_path):
    lm = save_tiny_folder(tmp_path, **CAPPED)
    enc = GemmaTextEncoder.from_pretrained(tmp_path, dtype=torch.float32, text_dim=HIDDEN)
    assert isinstance(enc.model, Gemma2Model) and not hasattr(enc.model, "lm_head")
    assert enc.tokenizer.padding_side == "right"
    prompts = ["a cat", ""]
    out = enc.encode(prompts)
    assert out.shape == (2, 300, HIDDEN) and out.dtype == torch.float32
    ref = manual_reference(trunk_without_softcap(lm), make_tokenizer(), prompts)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    # "eager" applies Gemma-2's soft-cap: the original model, and a visibly different result.
    eager = GemmaTextEncoder.from_pretrained(tmp_path, dtype=torch.float32, text_dim=HIDDEN, attn_implementation="eager")
    out_eager = eager.encode(prompts)
    torch.testing.assert_close(out_eager, manual_reference(lm.model, make_tokenizer(), prompts), rtol=1e-4, atol=1e-4)
    assert (out_eager - out).abs().max() > 1e-2


def test_from_pretrained_bf16_default(tmp_path):
    save_tiny_folder(tmp_path)
    enc = GemmaTextEncoder.from_pretrained(tmp_path, text_dim=HIDDEN)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode("a cat")
    assert out.dtype == torch.float32 and out.shape == (1, 300, HIDDEN)


def test_from_pretrained_rejects_other_encoders(tmp_path):
    t5 = tmp_path / "t5"
    T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=100).save_pretrained(t5)
    with pytest.raises(TextEmbeddingError, match="not Gemma-2"):
        GemmaTextEncoder.from_pretrained(t5)

    gemma = tmp_path / "gemma"
    save_tiny_folder(gemma)
    with pytest.raises(TextEmbeddingError, match="Gemma-2-2b-it"):
        GemmaTextEncoder.from_pretrained(gemma)  # width 32, not 2304

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextEmbeddingError, match="config.json"):
        GemmaTextEncoder.from_pretrained(empty)
    with pytest.raises(TextEmbeddingError, match="not found"):
        GemmaTextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(TextEmbeddingError, match="attn_implementation"):
        GemmaTextEncoder.from_pretrained(gemma, attn_implementation="flash", text_dim=HIDDEN)


def test_from_pretrained_folder_without_tokenizer(tmp_path):
    torch.manual_seed(0)
    Gemma2ForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(TextEmbeddingError, match="tokenizer"):
        GemmaTextEncoder.from_pretrained(tmp_path, text_dim=HIDDEN)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_from_pretrained_single_file(tmp_path, prefix):
    lm = save_tiny_folder(tmp_path / "hf", **CAPPED)
    sd = {prefix + k: v.contiguous() for k, v in lm.model.state_dict().items()}
    sd["lm_head.weight"] = lm.model.embed_tokens.weight.detach().clone()  # ignored
    file = tmp_path / "gemma_2_2b_it_elm_bf16.safetensors"
    save_file(sd, file)
    enc = GemmaTextEncoder.from_pretrained(
        file, tokenizer_path=tmp_path / "hf", config=tiny_config(**CAPPED), dtype=torch.float32, text_dim=HIDDEN
    )
    ref = manual_reference(trunk_without_softcap(lm), make_tokenizer(), ["a cat"])
    torch.testing.assert_close(enc.encode("a cat"), ref, rtol=1e-4, atol=1e-4)

    with pytest.raises(TextEmbeddingError, match="tokenizer_path"):
        GemmaTextEncoder.from_pretrained(file, config=tiny_config(), text_dim=HIDDEN)


def test_single_file_config_is_read_from_shapes(tmp_path):
    # Gemma-2-2b's head_dim (256) with a tiny width: everything else comes from the weight shapes.
    torch.manual_seed(0)
    cfg = tiny_config(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      intermediate_size=48, num_hidden_layers=3)
    trunk = Gemma2Model(cfg).eval()
    file = tmp_path / "g.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in trunk.state_dict().items()}, file)
    make_tokenizer().save_pretrained(tmp_path / "tok")
    enc = GemmaTextEncoder.from_pretrained(file, tokenizer_path=tmp_path / "tok", dtype=torch.float32, text_dim=HIDDEN)
    c = enc.model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (3, 48, 2, 1)
    torch.testing.assert_close(enc.encode("a"), manual_reference(trunk, make_tokenizer(), ["a"]), rtol=1e-4, atol=1e-4)


def test_single_file_fp8_scaled_is_dequantized(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    lm = save_tiny_folder(tmp_path / "hf")
    sd = {"model." + k: v.contiguous() for k, v in lm.model.state_dict().items()}
    key = "model.layers.0.mlp.down_proj.weight"
    scale = sd[key].abs().max() / 448.0
    sd[key] = (sd[key] / scale).to(torch.float8_e4m3fn)
    sd[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
    sd["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    file = tmp_path / "gemma_fp8_scaled.safetensors"
    save_file(sd, file)
    enc = GemmaTextEncoder.from_pretrained(file, tokenizer_path=tmp_path / "hf", config=tiny_config(),
                                           dtype=torch.float32, text_dim=HIDDEN)
    expected = sd[key].float() * scale
    torch.testing.assert_close(enc.model.layers[0].mlp.down_proj.weight, expected)


def test_single_file_rejects_other_encoders_and_quant(tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tok")
    t5 = tmp_path / "t5xxl.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(4, 4), "shared.weight": torch.zeros(8, 4)}, t5)
    with pytest.raises(TextEmbeddingError, match="T5"):
        GemmaTextEncoder.from_pretrained(t5, tokenizer_path=tmp_path / "tok")

    gemma3 = tmp_path / "gemma3.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.post_feedforward_layernorm.weight": torch.zeros(4),
               "model.layers.0.self_attn.q_norm.weight": torch.zeros(4)}, gemma3)
    with pytest.raises(TextEmbeddingError, match="Gemma-3"):
        GemmaTextEncoder.from_pretrained(gemma3, tokenizer_path=tmp_path / "tok")

    lm = save_tiny_folder(tmp_path / "hf")
    sd = {"model." + k: v.contiguous() for k, v in lm.model.state_dict().items()}
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "model.layers.0.extra.weight": torch.zeros(2)}, extra)
    with pytest.raises(TextEmbeddingError, match="unexpected"):
        GemmaTextEncoder.from_pretrained(extra, tokenizer_path=tmp_path / "tok", config=tiny_config(), text_dim=HIDDEN)

    key = "model.layers.0.mlp.down_proj"
    sd[key + ".weight"] = sd[key + ".weight"].to(torch.int8)
    sd[key + ".weight_scale"] = torch.ones(1)
    sd[key + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    q = tmp_path / "int8.safetensors"
    save_file(sd, q)
    with pytest.raises(TextEmbeddingError, match="bf16"):
        GemmaTextEncoder.from_pretrained(q, tokenizer_path=tmp_path / "tok", config=tiny_config(), text_dim=HIDDEN)


def test_single_file_embedded_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    import io

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHI_PROMPT.split("\n") * 20), model_writer=proto, vocab_size=120, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, minloglevel=2,
    )
    proto = proto.getvalue()
    lm = save_tiny_folder(tmp_path / "hf", vocab_size=120)
    sd = {"model." + k: v.contiguous() for k, v in lm.model.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    file = tmp_path / "gemma_with_tokenizer.safetensors"
    save_file(sd, file)
    enc = GemmaTextEncoder.from_pretrained(file, config=tiny_config(vocab_size=120), dtype=torch.float32, text_dim=HIDDEN)

    sp = spm.SentencePieceProcessor(model_proto=proto)
    num_chi = 1 + len(sp.encode(CHI_PROMPT))
    assert enc.num_chi == num_chi
    ids = [BOS] + sp.encode(CHI_PROMPT + "a cat")
    n = len(ids)
    ids = ids + [PAD] * (num_chi + 298 - n)
    mask = [1] * n + [0] * (num_chi + 298 - n)
    with torch.no_grad():
        h = lm.model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask])).last_hidden_state
    ref = torch.cat([h[:, :1], h[:, -299:]], dim=1)
    torch.testing.assert_close(enc.encode("a cat"), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ validate

def test_validate_shapes():
    assert validate_text_embedding(torch.randn(300, TEXT_DIM)).shape == (1, 300, TEXT_DIM)
    assert validate_text_embedding(torch.randn(2, 300, TEXT_DIM, dtype=torch.bfloat16)).shape == (2, 300, TEXT_DIM)
    assert validate_text_embedding(torch.randn(1, 7, HIDDEN), text_dim=HIDDEN).shape == (1, 7, HIDDEN)  # shorter: ok
    assert validate_text_embedding(np.zeros((300, HIDDEN), np.float32), text_dim=HIDDEN).shape == (1, 300, HIDDEN)


def test_validate_wrong_width_names_the_encoder():
    with pytest.raises(TextEmbeddingError) as e:
        validate_text_embedding(torch.randn(1, 256, 4096))
    msg = str(e.value)
    assert "4096" in msg and "T5-XXL" in msg and "2304" in msg and "GemmaTextEncoder" in msg
    assert "Load CLIP, type pixeldit" in e.value.render(NODE) and "--text-encoder" in e.value.render(CLI)
    with pytest.raises(TextEmbeddingError, match="CLIP-L"):
        validate_text_embedding(torch.randn(1, 77, 768))
    with pytest.raises(TextEmbeddingError, match="width 48"):
        validate_text_embedding(torch.randn(1, 10, 48), text_dim=HIDDEN)


def test_validate_rejects_bad_embeddings():
    with pytest.raises(TextEmbeddingError, match="301 tokens"):
        validate_text_embedding(torch.randn(1, 301, TEXT_DIM))
    with pytest.raises(TextEmbeddingError, match="at most 8"):
        validate_text_embedding(torch.randn(1, 9, HIDDEN), text_dim=HIDDEN, max_tokens=8)
    bad = torch.randn(1, 300, HIDDEN)
    bad[0, 5, 3] = float("nan")
    with pytest.raises(TextEmbeddingError, match="NaN"):
        validate_text_embedding(bad, text_dim=HIDDEN)
    bad[0, 5, 3] = float("inf")
    with pytest.raises(TextEmbeddingError, match="infinite"):
        validate_text_embedding(bad, text_dim=HIDDEN)
    with pytest.raises(TextEmbeddingError, match="dtype"):
        validate_text_embedding(torch.zeros(1, 300, HIDDEN, dtype=torch.long), text_dim=HIDDEN)
    with pytest.raises(TextEmbeddingError, match="shape"):
        validate_text_embedding(torch.zeros(HIDDEN), text_dim=HIDDEN)
    with pytest.raises(TextEmbeddingError, match="empty"):
        validate_text_embedding(torch.zeros(1, 0, HIDDEN), text_dim=HIDDEN)
    with pytest.raises(TextEmbeddingError, match="not a tensor"):
        validate_text_embedding([[0.0] * HIDDEN], text_dim=HIDDEN)


# ------------------------------------------------------------------------------------------ magnitudes


def test_validate_refuses_magnitudes_no_gemma_hidden_state_has():
    """Gemma-2-2b-it's last hidden state leaves its final RMSNorm, so its values stay small; far larger
    values are no hidden state and, from about 1e17, overflow PiD's own text norm (every token 0)."""
    from pid_core.text import MAX_TEXT_VALUE

    emb = torch.randn(1, 300, TEXT_DIM)
    emb[0, 3, 5] = -0.9 * MAX_TEXT_VALUE  # an outlier inside the bound is still taken
    assert validate_text_embedding(emb).shape == (1, 300, TEXT_DIM)
    assert validate_text_embedding(emb.bfloat16()).dtype == torch.bfloat16
    for scale in (1e6, 1e20, 1e30):
        for dtype in (torch.float32, torch.bfloat16):
            with pytest.raises(TextEmbeddingError, match=r"The text embedding reaches [0-9.e+]+.*Gemma-2-2b-it"):
                validate_text_embedding((torch.randn(1, 300, TEXT_DIM) * scale).to(dtype))


def test_the_text_bound_is_far_below_where_pid_text_norm_overflows():
    """Why MAX_TEXT_VALUE is safe for the network: PiD's text embedder (Linear, then RMSNorm summing
    squares in fp32) gives finite, non-zero tokens at the bound in fp32 and in bf16 autocast, while at
    1e20 the squares overflow and every token becomes exactly 0 (the silent wrong image of issue 22)."""
    from pid_core.network.layers import TokenEmbedder
    from pid_core.text import MAX_TEXT_VALUE

    torch.manual_seed(0)
    embedder = TokenEmbedder(TEXT_DIM, 1536, norm=True)  # the released text layer's shape
    with torch.no_grad():
        embedder.proj.weight.copy_(torch.randn(1536, TEXT_DIM) / TEXT_DIM**0.5)
        at_bound = torch.randn(1, 30, TEXT_DIM).sign() * MAX_TEXT_VALUE  # every value at the bound
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                tokens = embedder(at_bound).float()
                overflowed = embedder(torch.randn(1, 30, TEXT_DIM) * 1e20).float()
            assert torch.isfinite(tokens).all() and (tokens.abs().amax(-1) > 0.1).all()
            assert (overflowed == 0).all()


# ------------------------------------------------------------------------------------------ unreleased text layers


def test_a_text_layer_no_released_pid_has_is_named_not_blamed_on_gemma():
    """A checkpoint whose text layer takes 768-wide text is no released PiD: the message says so (the
    caller's sentence naming the checkpoint) instead of calling 768 Gemma-2-2b-it's width."""
    note = "custom.safetensors is not a released PiD checkpoint: its text layer takes 768-wide text"
    with pytest.raises(TextEmbeddingError) as e:
        validate_text_embedding(torch.randn(1, 300, TEXT_DIM), text_dim=768, unreleased=note)
    msg = str(e.value)
    assert msg.startswith("The text embedding has width 2304 (Gemma-2-2b-it's), but custom.safetensors is not a "
                          "released PiD checkpoint"), msg
    assert "hidden states of width 768" not in msg
    with pytest.raises(TextEmbeddingError) as e:  # without the caller's sentence: still no wrong fact
        validate_text_embedding(torch.randn(1, 300, TEXT_DIM), text_dim=768)
    assert "hidden states of width 768" not in str(e.value) and "768" in str(e.value) and "2304" in str(e.value)
    with pytest.raises(TextEmbeddingError) as e:  # a text layer of 16 tokens is no released one either
        validate_text_embedding(torch.randn(1, 300, HIDDEN), text_dim=HIDDEN, max_tokens=16, unreleased=note)
    assert "300 tokens" in str(e.value) and note in str(e.value) and "PiD takes at most 16" not in str(e.value)
