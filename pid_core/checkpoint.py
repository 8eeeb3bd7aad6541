"""Checkpoint files -> state dict -> detected config -> PidNet, strictly and safely (docs/DESIGN.md §11).

Accepted layouts: the official `.pth` (flat dict, keys prefixed `net.`), the repackaged `.safetensors`
(no prefix) and ComfyUI-style `model.diffusion_model.` prefixes. `.pth` files are read with
`weights_only=True`: a file that needs arbitrary code to unpickle is refused, never executed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from .checks import nonfinite_names, require_device, whole_number
from .errors import ArgumentError, CheckpointError
from .files import CHECKPOINT_FILE, read_tensor_file
from .network import PidConfig, PidNet
from .precision import DTYPES, operations_for, storage_dtype
from .quantized import (dequantize, describe_layers, floating_dtype, logical_size, storage_shape, stores_as_is,
                        unsupported_layouts, without_quantization)
from .variants import TEACHER, kind_from_filename, latent_geometry, resolve_variant, variants_matching
from .wording import term

PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.", "model.")
# Keys that say what a non-PiD file is, so the error can name it.
FOREIGN_MODELS = (
    ("double_blocks.", "a FLUX diffusion model"),
    ("joint_blocks.", "an SD3 diffusion model"),
    ("input_blocks.", "an SD/SDXL UNet"),
    ("decoder.conv_in.", "a VAE"),
    ("encoder.conv_in.", "a VAE"),
    ("encoder.block.", "a T5 text encoder"),
    ("text_model.", "a CLIP text encoder"),
    ("layers.0.self_attn.", f"a language-model text encoder such as Gemma, which goes to {term.text_encoder}"),
    ("transformer_blocks.", "a diffusers transformer (FLUX/SD3/Qwen-Image), not a PiD decoder"),
    ("net_ema.", "a PiD training checkpoint with separate EMA weights (convert it with the official script)"),
)


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a model's weights came from (the model itself holds its config and variant)."""

    path: str
    key_layout: str  # "official (net. prefix)", "repackaged (no prefix)", ...
    file_dtype: torch.dtype
    storage: str = ""  # how the weights are held when not simply their dtype ("mxfp8 x 98 layers", "fp8_e4m3fn")


def describe(model: PidNet) -> str:
    """One line for the user: what the loaded checkpoint is."""
    cfg = model.config
    parts = [
        f"PiD {cfg.layout}",
        f"{cfg.latent_channels}-channel latent" + (" (un-packed to 32)" if cfg.latent_unpatchify > 1 else ""),
        f"adapter width {cfg.adapter_hidden}",
        f"x{cfg.scale} output per latent cell",
        (model.checkpoint.storage if model.checkpoint is not None and model.checkpoint.storage
         else str(storage_dtype(model)).replace("torch.", "")),
    ]
    if model.variant is not None:
        parts.insert(0, model.variant.name)
    elif model.checkpoint is not None and kind_from_filename(model.checkpoint.path) == TEACHER:
        parts.insert(0, "undistilled (by its file name)")
    where = f" [{os.path.basename(model.checkpoint.path)}]" if model.checkpoint is not None else ""
    return ", ".join(parts) + where


def read_state_dict(path: str, device="cpu") -> dict:
    """Read a flat {name: tensor} dict from a safetensors or PyTorch file (recognised by content, not
    name) without running pickled code."""
    obj = read_tensor_file(path, CHECKPOINT_FILE, device=device)
    return _flat_tensor_dict(obj, os.path.basename(str(path)))


def _flat_tensor_dict(obj, name: str) -> dict:
    if isinstance(obj, dict):
        # Tolerate one level of wrapping ({"state_dict": {...}}, {"model": {...}}).
        if not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [v for v in obj.values() if isinstance(v, dict)]
            if len(inner) == 1:
                obj = inner[0]
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{name} holds no tensors ({type(obj).__name__}); it is not a model checkpoint. "
                          f"{term.choose_checkpoint}.")


def strip_prefix(sd: dict) -> tuple[dict, str]:
    """Remove the one prefix every key shares; name the layout it came from."""
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            layout = "official (net. prefix)" if prefix == "net." else f"'{prefix}' prefix"
            return {k[len(prefix) :]: v for k, v in sd.items()}, layout
    return sd, "repackaged (no prefix)"


def _count_indexed(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def detect_config(sd: dict, name: str = "checkpoint", quantized: dict | None = None) -> PidConfig:
    """Read every size from the tensors (docs/DESIGN.md §3.1). Raises CheckpointError for a file that is not PiD.

    quantized: {layer: quantization config} of the layers stored in a quantized layout. Their weights
    may be padded to the layout's blocks, so each width is read from a tensor that holds it as it is
    (a bias or a norm) wherever the network has one (docs/DESIGN.md §11)."""
    if "s_embedder.proj.weight" not in sd or "lq_proj.latent_proj.0.weight" not in sd:
        raise CheckpointError(describe_foreign(sd, name))

    def width(*holders) -> int:
        return _logical_width(sd, quantized or {}, name, holders)

    try:
        hidden = width(("s_embedder.proj.bias", 0), ("s_embedder.proj.weight", 0))
        head_dim = sd["patch_blocks.0.attn.q_norm_x.weight"].shape[0]
        pixel_head_dim = sd["pixel_blocks.0.attn.q_norm.weight"].shape[0]
        pixel_attn = width(("pixel_blocks.0.compress_to_attn.bias", 0), ("pixel_blocks.0.compress_to_attn.weight", 0))
        pixel_hidden = width(("pixel_embedder.proj.bias", 0), ("pixel_embedder.proj.weight", 0))
        adapter_hidden, adapter_in = sd["lq_proj.latent_proj.0.weight"].shape[:2]  # a conv: never quantized
        depth = _count_indexed(sd, "patch_blocks.")
        n_outputs = _count_indexed(sd, "lq_proj.output_heads.")
        layout = "v1.5" if "pit_lq_gate.log_alpha" in sd else "v1"
        has_aux = "lq_proj.lq_aux_rgb_head.0.weight" in sd
        # A PiT block expands each patch token to pixel_hidden values per pixel of the patch.
        patch_values = width(("pixel_blocks.0.expand_from_attn.bias", 0), ("pixel_blocks.0.expand_from_attn.weight", 0))
        patch = int(math.isqrt(patch_values // pixel_hidden))
        geometry = latent_geometry(layout, adapter_in)
        sr_scale = geometry.sr_scale
        if has_aux:  # the training-only RGB head predicts one patch of the VAE-size image: it tells the scale
            last = f"lq_proj.lq_aux_rgb_head.{_count_indexed(sd, 'lq_proj.lq_aux_rgb_head.') - 1}"
            aux_out = width((f"{last}.bias", 0), (f"{last}.weight", 0))
            sr_scale = patch // math.isqrt(aux_out // 3)
        # The SwiGLU width: no bias or norm holds it, only the MLPs' matmul weights.
        mlp_holders = [(f"patch_blocks.{i}.mlp_{s}.{w}.weight", 1 if w == "w2" else 0)
                       for i in range(depth) for s in "xy" for w in ("w1", "w3", "w2")]
        return PidConfig(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            patch_depth=depth,
            mlp_hidden=width(*mlp_holders),
            pixel_depth=_count_indexed(sd, "pixel_blocks."),
            pixel_hidden_size=pixel_hidden,
            pixel_attn_hidden_size=pixel_attn,
            pixel_num_heads=pixel_attn // pixel_head_dim,
            pixel_mlp_hidden=width(("pixel_blocks.0.mlp.fc1.bias", 0), ("pixel_blocks.0.mlp.fc1.weight", 0)),
            patch_size=patch,
            text_dim=width(("y_embedder.proj.weight", 1)),  # only the text projection holds it
            text_max_tokens=sd["y_pos_embedding"].shape[1],
            layout=layout,
            adapter_hidden=adapter_hidden,
            adapter_res_blocks=_count_indexed(sd, "lq_proj.latent_proj.") - 3,
            adapter_in_channels=adapter_in,
            lq_interval=next(i for i in range(1, depth + 1) if math.ceil(depth / i) == n_outputs),
            latent_unpatchify=geometry.unpatchify,
            latent_down_factor=geometry.down_factor,
            sr_scale=sr_scale,
            has_aux_rgb_head=has_aux,
        )
    except (KeyError, StopIteration, ValueError, ZeroDivisionError) as exc:
        lacks = f" (it has no {exc.args[0]})" if isinstance(exc, KeyError) and exc.args else ""
        raise CheckpointError(
            f"{name} looks like a PiD checkpoint but its structure is incomplete{lacks}: the file is damaged or from "
            "an unsupported release."
        ) from None


def _logical_width(sd: dict, quantized: dict, name: str, holders) -> int:
    """One width of the network from the tensors that hold it ((key, dim) pairs, most direct first): the
    first one stored at its logical size (biases and norms always are, and a quantized weight whose
    layout neither pads nor packs). When only block-padded weights hold it (the SwiGLU width, the text
    width), the layout's zero padding tells it, the largest any of them shows (quantized.logical_size)."""
    padded = []
    for key, dim in holders:
        if key not in sd:
            continue
        conf = quantized.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if conf is None or stores_as_is(conf):
            return sd[key].shape[dim]
        padded.append((key, dim, conf))
    if not padded:
        raise KeyError(holders[0][0])
    sizes = [logical_size(sd[key], conf, dim) for key, dim, conf in padded]
    if all(size is None for size in sizes):
        key, _, conf = padded[0]
        raise CheckpointError(
            f"{name}: {key} is quantized as {conf.get('format')}, a layout whose stored shape does not tell the "
            "layer's width here. Use the bf16 file of this checkpoint.")
    return max(size for size in sizes if size is not None)


def describe_foreign(sd: dict, name: str) -> str:
    for marker, what in FOREIGN_MODELS:
        if any(marker in k for k in sd):
            return f"{name} is not a PiD checkpoint: it looks like {what}. {term.choose_checkpoint}."
    sample = ", ".join(list(sd)[:3])
    return f"{name} is not a PiD checkpoint (its first keys are: {sample}). {term.choose_checkpoint}."


def expected_shapes(config: PidConfig) -> dict:
    """{key: shape} of the network for a config (the plain torch network on the meta device: the key
    layout does not depend on the layer namespace)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in PidNet(config).state_dict().items()}


def check_keys(config: PidConfig, sd: dict, name: str, quantized: dict | None = None) -> None:
    """Strict: the key set and every shape must equal the network's (the reference silently loads partial
    files). `quantized`: {layer: quantization config} of the layers stored in a quantized layout, whose
    side tensors are expected and whose weight is stored in the layout's shape for the network's (padded
    to whole blocks, packed); a layout quantized.STORAGE does not describe is not checked here."""
    quantized = quantized or {}
    expected = expected_shapes(config)
    plain = without_quantization(sd, quantized)
    missing = [k for k in expected if k not in plain]
    unexpected = [k for k in plain if k not in expected]
    wrong = []
    for key, shape in expected.items():
        conf = quantized.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        stored = shape if conf is None else storage_shape(conf, shape)
        if key in plain and stored is not None and tuple(plain[key].shape) != stored:
            layout = "" if conf is None else f" (the {conf.get('format')} storage of {shape})"
            wrong.append(f"{key} {tuple(plain[key].shape)} != {stored}{layout}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s), first: {'; '.join(wrong[:3])}")
    if problems:
        cfg = config
        raise CheckpointError(
            f"{name} does not match the PiD {cfg.layout} network it looks like "
            f"({cfg.patch_depth} patch blocks, width {cfg.hidden_size}, {cfg.adapter_in_channels}-channel adapter): "
            + "; ".join(problems)
            + ". The file is incomplete or modified: download it again."
        )


def build_model(sd: dict, config: PidConfig, *, dtype: torch.dtype | None = None, name: str = "checkpoint",
                operations=None, quantized: dict | None = None) -> PidNet:
    """Instantiate on the meta device and adopt the tensors as parameters (no second copy, no init).

    dtype: the storage dtype (None keeps the tensors'). operations: the layer namespace (None: the one
    precision.operations_for gives for that storage on the tensors' device). quantized: layers in a
    quantized layout ({layer: quantization config}), for a namespace that reads them (ComfyUI's)."""
    check_keys(config, sd, name, quantized)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if operations is None:
        first = next(iter(sd.values()))
        operations = operations_for(dtype or floating_dtype(sd), first.device)
    with torch.device("meta"):
        model = PidNet(config, operations)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_metadata(path: str) -> dict:
    """The safetensors header's metadata ({} for other files)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable headers are reported by read_state_dict
        return {}


def load_pid(path: str, *, device="cpu", dtype: torch.dtype | str | None = None, **overrides) -> PidNet:
    """Load a PiD checkpoint. dtype None keeps the file's storage dtype (bf16 stays bf16); torch.float32 /
    bfloat16 / float16 or their names in precision.DTYPES. The network then computes as precision.py
    decides for `device` (fp32 per layer on the CPU). `overrides` set config fields the tensors cannot tell
    (latent_down_factor, sr_scale, latent_unpatchify) when the file name does not. The model's `variant` is
    the released checkpoint it is (None for other structures or unclear names).

    Quantized files in ComfyUI's format are dequantized to the file's float dtype when their layouts are
    the ones Comfy-Org publishes (fp8, mxfp8, int8 / convrot); other layouts are refused with the bf16 file
    to use. Refused with a CheckpointError: files that are not PiD, integer weights without quantization
    metadata, NaN or infinite weights (docs/DESIGN.md §13)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"load_pid takes the checkpoint's path, got {path!r}.")
    path = os.fspath(path)
    device = require_device(device)
    dtype = _weight_dtype_argument(dtype)
    name = os.path.basename(path)
    sd, key_layout = strip_prefix(read_state_dict(path, device=device))
    layers = describe_layers(sd, read_metadata(path))
    refused = unsupported_layouts(layers)
    if refused:
        try:
            variant = read_config(sd, path, layers)[1]
        except CheckpointError:
            variant = None
        raise CheckpointError(_quantized_message(name, refused, variant))
    config, variant = read_config(sd, path, layers, **overrides)
    file_dtype = floating_dtype(sd)
    if layers:
        check_keys(config, sd, name, layers)  # the stored shapes, before the padding is cut off
        sd = dequantize(sd, layers, file_dtype, expected_shapes(config))
    model = build_model(sd, config, dtype=dtype, name=name)
    if dtype == torch.float16 and file_dtype != torch.float16:
        overflowed = nonfinite_names(dict(model.named_parameters()))
        if overflowed:
            raise CheckpointError(
                f"{name}: {len(overflowed)} weight tensor(s) (first {overflowed[0]}) exceed float16's range "
                f"(65504). Load the weights as bf16 or fp32 ({term.weights_bf16})."
            )
    model.variant = variant
    model.checkpoint = CheckpointInfo(path=path, key_layout=key_layout, file_dtype=file_dtype)
    return model


# The config fields the tensors cannot tell (the latent's geometry), which load_pid's overrides may set.
GEOMETRY_OVERRIDES = ("latent_down_factor", "sr_scale", "latent_unpatchify")


def read_config(sd: dict, path: str, quantized: dict | None = None, **overrides):
    """(config, variant) of a state dict: sizes from the tensors (the logical ones of `quantized` layers,
    {layer: quantization config}), the released variant from structure and name (its geometry), then
    `overrides` (GEOMETRY_OVERRIDES, whole numbers from 1)."""
    unknown = [k for k in overrides if k not in GEOMETRY_OVERRIDES]
    if unknown:
        raise ArgumentError(f"load_pid sets only the fields the weights cannot tell ({', '.join(GEOMETRY_OVERRIDES)}); "
                            f"got {', '.join(unknown)}.")
    overrides = {k: whole_number(v, k, 1, 64) for k, v in overrides.items()}
    name = os.path.basename(path)
    quantized = quantized or {}
    plain = without_quantization(sd, quantized)
    config = detect_config(plain, name, quantized)
    variant = _variant_for(path, config)
    check_weight_values({k: v for k, v in plain.items() if k.rsplit(".", 1)[0] not in quantized}, name, variant)
    if variant is not None:
        config = config.with_(
            latent_down_factor=variant.latent_down_factor, sr_scale=variant.sr_scale, latent_unpatchify=variant.unpatchify
        )
    if overrides:
        config = config.with_(**overrides)
    return config, variant


def _quantized_message(name: str, formats, variant) -> str:
    bf16 = variant.repackaged_file.filename if variant is not None and variant.repackaged_file is not None else None
    use = (f"the bf16 file {bf16} (python -m pid_core download {variant.name} --repackaged)" if bf16
           else "the bf16 or the official file of this checkpoint")
    return (f"{name} is quantized ({', '.join(formats)}, ComfyUI's quantization format) in a layout only ComfyUI's "
            f"PiD Loader reads. For the command line and the Python API use {use}.")


def _weight_dtype_argument(dtype) -> torch.dtype | None:
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    if dtype is None or dtype in DTYPES.values():
        return dtype
    raise ArgumentError(
        f"dtype must be None (the file's), torch.bfloat16, torch.float16, torch.float32 or one of "
        f"{', '.join(repr(k) for k in DTYPES)}; got {dtype!r}."
    )


def check_weight_values(sd: dict, name: str, variant=None) -> None:
    """The weights outside quantized layers are finite floating-point values. Integer tensors without
    ComfyUI's quantization metadata have unknown real values, NaN or infinity mean a damaged file; both
    would decode to a black or wrong image."""
    bf16_file = "a bf16 file" if variant is None or variant.repackaged_file is None else variant.repackaged_file.filename
    integers = [k for k, v in sd.items() if not v.is_floating_point()]
    if integers:
        raise CheckpointError(
            f"{name} holds integer tensors ({sd[integers[0]].dtype}, {len(integers)} tensor(s), first {integers[0]}) "
            f"without ComfyUI's quantization metadata, so their real values are unknown (PiD's weights are "
            f"floating-point). Use {bf16_file} (or the official model_ema_bf16.pth)."
        )
    bad = nonfinite_names(sd)
    if bad:
        raise CheckpointError(
            f"{name} holds NaN or infinite weights ({len(bad)} tensor(s), first {bad[0]}): the file is damaged. "
            "Download it again."
        )


def _variant_for(path: str, config: PidConfig):
    """The released variant the file is: its structure decides, its name picks among look-alikes.

    None for structures no release has (test and custom models) and for names that leave a choice."""
    if not variants_matching(config.layout, config.adapter_in_channels, include_deprecated=True):
        return None
    return resolve_variant(path, layout=config.layout, adapter_in_channels=config.adapter_in_channels)
