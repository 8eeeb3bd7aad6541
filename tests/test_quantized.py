"""Quantized files outside ComfyUI (pid_core/quantized.py): how the layouts store a weight, the logical
widths of weights stored padded to the layout's blocks, and files whose widths are not multiples of the
block loading and decoding at their own widths.

The files are written here as ComfyUI's quantizers write them (mxfp8: fp8 in blocks of 32 along a row,
rows and columns padded with zeros to multiples of 32, E8M0 scales in cuBLAS's tiles; int8: per-row
scales, "convrot" rotated by groups of the input width). tests/comfyui/loader_checks.py does the same with
ComfyUI's own code and compares pid_core's dequantization with ComfyUI's.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pid_core.checkpoint import build_model, load_pid
from pid_core.decode import decode
from pid_core.errors import CheckpointError
from pid_core.precision import psnr
from pid_core.quantized import _hadamard, logical_size, storage_shape
from pid_core.commands.random_checkpoints import config_shapes, narrow_config, random_state_dict

FP8_MAX = 448.0  # float8_e4m3fn
# Widths off every block: hidden 48, SwiGLU 170, PiT attention 48, pixel width 20, text 40.
ODD = dict(hidden_size=48, num_heads=2, mlp_hidden=170, pixel_attn_hidden_size=48, pixel_num_heads=2,
           pixel_hidden_size=20, text_dim=40, text_tokens=12)
MIN_PSNR = {"mxfp8": 25.0, "int8": 35.0}  # dB against the bf16 decode; the narrow network gives 31 and 45


def _swizzle(scales: torch.Tensor) -> torch.Tensor:
    """[rows, blocks] E8M0 scales -> cuBLAS's tiles (128 rows x 4 blocks, each kept as 32 x 16 with the
    four 32-row groups side by side), zero-padded to whole tiles."""
    rows, cols = scales.shape
    row_tiles, col_tiles = math.ceil(rows / 128), math.ceil(cols / 4)
    padded = torch.zeros(row_tiles * 128, col_tiles * 4, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    t = padded.reshape(row_tiles, 128, col_tiles, 4).permute(0, 2, 1, 3).reshape(row_tiles, col_tiles, 4, 32, 4)
    return t.transpose(2, 3).reshape(row_tiles * 128, col_tiles * 4)


def quantize_mxfp8(w: torch.Tensor):
    """(fp8 data padded to multiples of 32, swizzled E8M0 scales, [rows, cols] exponents) as ComfyUI writes
    mxfp8: per block of 32 the smallest power of two that brings its largest value within fp8's range."""
    rows, cols = w.shape
    padded_rows, padded_cols = -(-rows // 32) * 32, -(-cols // 32) * 32
    x = torch.nn.functional.pad(w.float(), (0, padded_cols - cols, 0, padded_rows - rows))
    x = x.reshape(padded_rows, padded_cols // 32, 32)
    amax = x.abs().amax(-1)
    exponent = torch.ceil(torch.log2(torch.clamp(amax / FP8_MAX, min=2.0**-127))) + 127
    exponent = torch.where(amax == 0, 0, exponent.clamp(0, 254)).to(torch.uint8)
    scaled = x / torch.exp2(exponent.float() - 127)[..., None]
    q = torch.where(amax[..., None] == 0, 0.0, scaled.clamp(-FP8_MAX, FP8_MAX))
    return q.reshape(padded_rows, padded_cols).to(torch.float8_e4m3fn), _swizzle(exponent), exponent


def quantize_int8(w: torch.Tensor):
    """(int8 data, per-row scales, config): rotated by the largest Hadamard group (64, 16 or 4) dividing
    the input width ("convrot"), plain per-row int8 where none does; never padded."""
    out_f, in_f = w.shape
    group = next((g for g in (64, 16, 4) if in_f % g == 0), None)
    w = w.float()
    if group is not None:
        w = torch.matmul(w.reshape(out_f, in_f // group, group), _hadamard(group).T).reshape(out_f, in_f)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    conf = {"format": "int8_tensorwise"} | ({"convrot": True, "convrot_groupsize": group} if group else {})
    return torch.round(w / scale).to(torch.int8), scale, conf


def quantized_file(path, sd: dict, fmt: str):
    """`sd` with every matmul weight (every 2-D weight) in `fmt`, written like Comfy-Org's files (the
    layers named in the header's _quantization_metadata). Returns {layer: (the exact dequantized weight
    (mxfp8) or None, the scale of each value (mxfp8) or row (int8))}."""
    out, layers, expected = dict(sd), {}, {}
    for key, w in sd.items():
        if not (key.endswith(".weight") and w.dim() == 2):
            continue
        layer = key[: -len(".weight")]
        if fmt == "mxfp8":
            q, scales, exponent = quantize_mxfp8(w)
            out[key], out[f"{layer}.weight_scale"] = q, scales
            layers[layer] = {"format": "mxfp8"}
            scale = torch.exp2(exponent.float() - 127).repeat_interleave(32, dim=1)[: w.shape[0], : w.shape[1]]
            expected[layer] = (q.float()[: w.shape[0], : w.shape[1]] * scale, scale)
        else:
            q, scale, layers[layer] = quantize_int8(w)
            out[key], out[f"{layer}.weight_scale"] = q, scale
            expected[layer] = (None, scale)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    return expected


def test_storage_shapes_of_the_layouts():
    assert storage_shape({"format": "mxfp8"}, (48, 170)) == (64, 192)
    assert storage_shape({"format": "mxfp8"}, (64, 192)) == (64, 192)
    assert storage_shape({"format": "nvfp4"}, (20, 48)) == (32, 24)  # 16-blocks, two values a byte
    assert storage_shape({"format": "convrot_w4a4"}, (20, 64)) == (20, 32)
    for fmt in ("int8_tensorwise", "float8_e4m3fn", "float8_e5m2"):
        assert storage_shape({"format": fmt}, (20, 170)) == (20, 170)
    assert storage_shape({"format": "something_new"}, (20, 170)) is None


def test_logical_size_is_read_from_the_zero_padding():
    w = torch.randn(170, 48)
    q, _, _ = quantize_mxfp8(w)
    assert q.shape == (192, 64)
    assert (logical_size(q, {"format": "mxfp8"}, 0), logical_size(q, {"format": "mxfp8"}, 1)) == (170, 48)
    # A real value of zero at the end is not taken for padding beyond one block: 33 rows of which the
    # last is zero are stored as 64, and at least 33 of them are the weight's.
    w = torch.randn(33, 32)
    w[32] = 0
    assert logical_size(quantize_mxfp8(w)[0], {"format": "mxfp8"}, 0) == 33
    # nvfp4: e2m1 codes two a byte, the first in the high nibble; 8 is minus zero.
    codes = torch.zeros(32, 48, dtype=torch.uint8)
    codes[:20, :45] = torch.randint(1, 8, (20, 45), dtype=torch.uint8) | (torch.randint(0, 2, (20, 45), dtype=torch.uint8) << 3)
    codes[20:, 45:] = 8
    packed = codes[:, 0::2] << 4 | codes[:, 1::2]
    assert (logical_size(packed, {"format": "nvfp4"}, 0), logical_size(packed, {"format": "nvfp4"}, 1)) == (20, 45)
    assert logical_size(torch.zeros(20, 170, dtype=torch.int8), {"format": "int8_tensorwise"}, 1) == 170


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A narrow random network with widths off the blocks, its bf16 state dict and its decode."""
    config = narrow_config(**ODD)
    sd = random_state_dict(config_shapes(config), seed=3)
    return config, sd, _decode(build_model(sd, config))


def _decode(model):
    g = torch.Generator().manual_seed(0)
    latent, text = torch.randn(1, 16, 2, 3, generator=g) * 2, torch.randn(1, 5, ODD["text_dim"], generator=g)
    return decode(model, latent, text=text, latent_format="flux", sigma=0.3, steps=2, seed=1)


@pytest.mark.parametrize("fmt", ["mxfp8", "int8"])
def test_widths_off_the_block_load_at_their_logical_shapes_and_decode(tmp_path, odd_model, fmt):
    """Every matmul weight quantized, widths not multiples of 32: mxfp8 stores them padded (48 rows as
    64), int8 and convrot as they are. The loaded network has the source's widths, every weight the
    layout's value of the source weight, and decodes close to the bf16 network."""
    config, sd, reference = odd_model
    path = tmp_path / f"pid_odd_{fmt}.safetensors"
    expected = quantized_file(path, sd, fmt)
    with safe_open(str(path), framework="pt") as f:
        stored = f.get_slice("patch_blocks.0.attn.qkv_x.weight").get_shape()
    assert stored == ([160, 64] if fmt == "mxfp8" else [144, 48])

    model = load_pid(str(path), dtype=torch.float32)
    assert model.config == config
    for layer, (value, scale) in expected.items():
        got, source = model.get_parameter(f"{layer}.weight"), sd[f"{layer}.weight"].float()
        assert got.shape == source.shape, layer
        if fmt == "mxfp8":
            assert torch.equal(got, value.to(torch.bfloat16).float()), layer
            # e4m3 rounding: half a step, 2^-4 of the value (3 mantissa bits) or 2^-10 of the block's scale
            # below the normal range; then the file's bf16 (2^-9)
            assert ((got - source).abs() <= source.abs() * (2**-4 + 2**-8) + scale * 2**-10).all(), layer
        else:
            # int8: half a step of the row's scale per value; the rotation back is orthogonal (the same
            # error norm per row)
            row_error = (got - source).norm(dim=1)
            assert (row_error <= 0.5 * scale[:, 0] * math.sqrt(source.shape[1]) * 1.01).all(), layer
    image = _decode(model)
    assert image.shape == reference.shape and torch.isfinite(image).all()
    assert psnr(image * 2 - 1, reference * 2 - 1) >= MIN_PSNR[fmt]


def test_stored_shape_other_than_the_layouts_is_named(tmp_path, odd_model):
    _, sd, _ = odd_model
    path = tmp_path / "pid_odd_mxfp8.safetensors"
    quantized_file(path, sd, "mxfp8")
    tensors = load_file(str(path))
    key = "patch_blocks.1.attn.qkv_x.weight"  # [144, 48] stored as [160, 64]; one block of rows too many
    tensors[key] = torch.cat([tensors[key], torch.zeros(32, 64, dtype=tensors[key].dtype)])
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"wrong shape.*qkv_x.weight \(192, 64\) != \(160, 64\) "
                                              r"\(the mxfp8 storage of \(144, 48\)\)"):
        load_pid(str(path))
