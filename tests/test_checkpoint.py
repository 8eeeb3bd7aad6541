"""Checkpoint loading: layouts, detection, and the clear errors for bad files."""

import collections
import os

import pytest
import torch

from pid_core.checkpoint import load_pid, read_state_dict
from pid_core.errors import ArgumentError, CheckpointError, DeviceError
from pid_core.testing import config_shapes, make_random_checkpoint, narrow_config, random_state_dict, save_checkpoint


@pytest.mark.parametrize(
    "filename,prefix,layout_word",
    [("c.pth", "net.", "official"), ("c.safetensors", "", "repackaged"), ("c.safetensors", "model.diffusion_model.", "model.diffusion_model.")],
)
def test_key_layouts_load(tmp_path, filename, prefix, layout_word):
    path = str(tmp_path / filename)
    config = make_random_checkpoint(path, prefix=prefix)
    model = load_pid(path)
    assert model.config == config
    assert layout_word in model.checkpoint.key_layout


@pytest.mark.parametrize("layout,channels", [("v1", 16), ("v1", 4), ("v1", 128), ("v1", 768), ("v1", 1152), ("v1.5", 16), ("v1.5", 128)])
def test_detection_reads_everything_from_the_tensors(tmp_path, layout, channels):
    path = str(tmp_path / "x.safetensors")
    config = make_random_checkpoint(path, layout=layout, latent_channels=channels, text_dim=32, text_tokens=12)
    detected = load_pid(path).config
    assert detected == config
    assert detected.latent_channels == channels
    assert detected.gate == ("per_token" if layout == "v1.5" else "per_token_per_dim")
    assert detected.rope_ref_px == (2048 if layout == "v1.5" else 1024)


def test_bf16_loads_as_bf16_without_a_copy(tmp_path):
    path = str(tmp_path / "x.safetensors")
    make_random_checkpoint(path)
    model = load_pid(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32 = load_pid(path, dtype=torch.float32)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= os.path.getsize(path)  # nothing beyond the file's tensors is allocated


def test_truncated_file(tmp_path):
    for name in ("x.safetensors", "x.pth"):
        path = tmp_path / name
        make_random_checkpoint(str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_pid(str(path))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net.y_pos_embedding": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_pid(str(path))


def test_plain_object_pth_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save(collections.OrderedDict(a=1), path)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_pid(str(path))


@pytest.mark.parametrize(
    "keys,what",
    [
        ({"double_blocks.0.img_attn.qkv.weight": [4, 4], "img_in.weight": [4, 4]}, "FLUX diffusion model"),
        ({"decoder.conv_in.weight": [4, 4, 3, 3], "encoder.conv_in.weight": [4, 3, 3, 3]}, "VAE"),
        ({"model.layers.0.self_attn.q_proj.weight": [4, 4]}, "Gemma"),
        ({"encoder.block.0.layer.0.SelfAttention.q.weight": [4, 4]}, "T5"),
    ],
)
def test_non_pid_models_are_named(tmp_path, keys, what):
    path = str(tmp_path / "other.safetensors")
    save_checkpoint({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(CheckpointError, match=f"not a PiD checkpoint.*{what}"):
        load_pid(path)


def test_one_missing_key(tmp_path):
    config = narrow_config()
    sd = random_state_dict(config_shapes(config))
    del sd["patch_blocks.1.mlp_x.w2.weight"]
    path = save_checkpoint(sd, str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), first: patch_blocks.1.mlp_x.w2.weight") as err:
        load_pid(path)
    assert "missing.pth" in str(err.value)


def test_unexpected_key_and_wrong_shape(tmp_path):
    config = narrow_config()
    sd = random_state_dict(config_shapes(config))
    sd["extra.weight"] = torch.zeros(2)
    sd["final_layer.linear.bias"] = torch.zeros(4)
    path = save_checkpoint(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_pid(path)
    assert "unexpected key(s), first: extra.weight" in str(err.value)
    assert "final_layer.linear.bias (4,) != (3,)" in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pid(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(str(tmp_path))


@pytest.mark.parametrize("saved_as,named", [("x.safetensors", "x.pth"), ("x.safetensors", "x.bin"),
                                           ("x.safetensors", "model"), ("x.pth", "x.safetensors")])
def test_checkpoints_are_read_by_content(tmp_path, saved_as, named):
    written = str(tmp_path / saved_as)
    config = make_random_checkpoint(written)
    os.rename(written, tmp_path / named)
    assert load_pid(str(tmp_path / named)).config == config


def _state_dict(**changes):
    sd = random_state_dict(config_shapes(narrow_config()))
    sd.update(changes)
    return sd


def test_non_finite_weights_are_refused(tmp_path):
    weight = _state_dict()["final_layer.linear.weight"].clone()
    weight.view(-1)[7] = float("nan")
    path = save_checkpoint(_state_dict(**{"final_layer.linear.weight": weight}), str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite weights.*final_layer.linear.weight.*damaged"):
        load_pid(path)


def test_integer_weights_are_refused(tmp_path):
    sd = {k: (v * 100).to(torch.int8) for k, v in _state_dict().items()}
    path = save_checkpoint(sd, str(tmp_path / "pid_flux1_512_to_2048_4step_int8.safetensors"))
    with pytest.raises(CheckpointError, match="int8 weights.*floating-point.*pid_flux1_512_to_2048_4step_bf16.safetensors"):
        load_pid(path)


def test_fp16_overflow_of_the_weights_is_named(tmp_path):
    big = _state_dict()["final_layer.linear.bias"].float() + 1e6  # finite in fp32, beyond float16
    path = save_checkpoint({k: v.float() for k, v in _state_dict(**{"final_layer.linear.bias": big}).items()},
                           str(tmp_path / "big.safetensors"))
    assert load_pid(path, dtype=torch.bfloat16) is not None
    with pytest.raises(CheckpointError, match="exceed float16's range.*bf16 or fp32"):
        load_pid(path, dtype="fp16")


def test_load_arguments_are_checked(tmp_path):
    path = str(tmp_path / "x.safetensors")
    make_random_checkpoint(path)
    assert load_pid(path, dtype="fp32").config is not None
    with pytest.raises(ArgumentError, match="dtype must be"):
        load_pid(path, dtype=torch.int8)
    with pytest.raises(ArgumentError, match="dtype must be"):
        load_pid(path, dtype="half-ish")
    with pytest.raises(ArgumentError, match="checkpoint's path"):
        load_pid(None)
    with pytest.raises(DeviceError, match="gpu0"):
        load_pid(path, device="gpu0")
