"""The checkpoint registry: agrees with the resolved upstream configs, names, sizes, steps."""

import json
import math
from pathlib import Path

import pytest
from conftest import KEY_FILES as KEY_DIR

from pid_core.errors import CheckpointError, LatentError, SizeError
from pid_core.latent_formats import LATENT_FORMATS
from pid_core.variants import (
    latent_geometry,
    BACKBONES,
    DEPRECATED_VARIANTS,
    RECOMMENDED_STOP,
    STUDENT,
    TEACHER,
    UNDISTILLED_VARIANTS,
    VARIANTS,
    check_output_size,
    get_variant,
    kind_from_filename,
    recommended_stop_step,
    resolve_variant,
    unreleased_structure,
    variant_from_filename,
    variants_for_backbone,
    variants_from_filename,
    variants_matching,
)

KEYS_DIR = KEY_DIR


def _read_keys_header(path: Path) -> dict:
    """The '# experiment', '# net kwargs' and '# num tensors / total params' lines of a keys file."""
    head = {}
    for line in path.read_text().splitlines()[:5]:
        if line.startswith("# experiment:"):
            head["experiment"] = line.split(":", 1)[1].strip()
        elif line.startswith("# net kwargs:"):
            head["kwargs"] = json.loads(line.split(":", 1)[1])
        elif line.startswith("# num tensors:"):
            tensors, params = line[len("# num tensors:"):].split("total params:")
            head["num_tensors"] = int(tensors)
            head["num_params"] = int(params.replace(",", ""))
    return head


KEY_FILES = sorted(KEYS_DIR.glob("*.txt")) if KEYS_DIR.is_dir() else []
needs_keys = pytest.mark.skipif(not KEY_FILES, reason="the key lists of the released checkpoints are not available")


@needs_keys
def test_every_keys_experiment_is_a_current_variant_and_back():
    experiments = {_read_keys_header(p)["experiment"] for p in KEY_FILES}
    assert experiments == {v.experiment for v in VARIANTS.values()}


@needs_keys
@pytest.mark.parametrize("path", KEY_FILES, ids=lambda p: p.stem)
def test_variant_matches_resolved_net_kwargs(path):
    head = _read_keys_header(path)
    kw = head["kwargs"]
    v = get_variant(head["experiment"])
    assert v.experiment == head["experiment"] == path.stem
    assert v.latent_channels == kw["lq_latent_channels"]
    assert v.unpatchify == kw["lq_latent_unpatchify_factor"]
    assert v.adapter_in_channels == kw["lq_latent_channels"] // kw["lq_latent_unpatchify_factor"] ** 2
    assert v.latent_down_factor == kw["latent_spatial_down_factor"]
    assert v.sr_scale == kw["sr_scale"]
    assert v.rope_ref_px == kw["rope_ref_h"] == kw["rope_ref_w"]
    assert v.adapter_hidden == kw["lq_hidden_dim"]
    v15 = kw["lq_gate_type"] == "sigma_aware_per_token"
    assert v.layout == ("v1.5" if v15 else "v1")
    assert kw["pit_lq_inject"] is v15 and kw["lq_aux_rgb_head"] is v15
    assert kw["lq_conv_padding_mode"] == ("replicate" if v15 else "zeros")
    assert v.num_tensors == head["num_tensors"]
    assert v.num_params == head["num_params"]


def test_registry_names_and_the_released_set():
    assert list(VARIANTS) == [
        "flux-2k", "flux-2kto4k-v1.5", "flux2-2k", "flux2-2kto4k-v1.5", "sd3-2k", "sd3-2kto4k",
        "sdxl-2kto4k", "qwenimage-2kto4k-v1.5", "dinov2-2k", "siglip-2k",
    ]
    assert all(not v.deprecated for v in VARIANTS.values())
    assert all(v.deprecated for v in DEPRECATED_VARIANTS.values())
    assert not set(VARIANTS) & set(DEPRECATED_VARIANTS)


@pytest.mark.parametrize("v", [*VARIANTS.values(), *DEPRECATED_VARIANTS.values()], ids=lambda v: v.name)
def test_variant_is_consistent_with_its_latent_format_and_layout(v):
    fmt = LATENT_FORMATS[v.latent_format]
    assert fmt.pid_channels == v.latent_channels
    assert fmt.down_factor == v.latent_down_factor
    assert v.adapter_in_channels * v.unpatchify**2 == v.latent_channels
    # the layout fixes hidden width, RoPE reference and tensor count
    assert (v.adapter_hidden, v.rope_ref_px, v.num_tensors) == (
        (1024, 2048, 467) if v.layout == "v1.5" else (512, 1024, 456)
    )
    assert ("v1pt5" in v.experiment) == (v.layout == "v1.5")
    assert v.official_file.repo == "nvidia/PiD"
    folder = "checkpoints_deprecated" if v.deprecated else "checkpoints"
    assert v.official_file.path == f"{folder}/{v.experiment}/model_ema_bf16.pth"
    assert "NSCLv1" in v.license and "non-commercial" in v.license
    assert v.backbones and all(b in BACKBONES for b in v.backbones)


def test_repackaged_files():
    got = {n: v.repackaged_file.path if v.repackaged_file else None for n, v in VARIANTS.items()}
    stem = "diffusion_models/pid_{}_4step_bf16.safetensors"
    assert got == {
        "flux-2k": stem.format("flux1_512_to_2048"),
        "flux-2kto4k-v1.5": stem.format("flux1_1024_to_4096"),
        "flux2-2k": stem.format("flux2_512_to_2048"),
        "flux2-2kto4k-v1.5": stem.format("flux2_1024_to_4096"),
        "sd3-2k": stem.format("sd3_512_to_2048"),
        "sd3-2kto4k": stem.format("sd3_1024_to_4096"),
        "sdxl-2kto4k": stem.format("sdxl_1024_to_4096"),
        "qwenimage-2kto4k-v1.5": stem.format("qwenimage_1024_to_4096"),
        "dinov2-2k": None,
        "siglip-2k": None,
    }
    assert all(v.repackaged_file.repo == "Comfy-Org/PixelDiT" for v in VARIANTS.values() if v.repackaged_file)
    assert VARIANTS["flux-2k"].repackaged_file.url == (
        "https://huggingface.co/Comfy-Org/PixelDiT/resolve/main/"
        "diffusion_models/pid_flux1_512_to_2048_4step_bf16.safetensors"
    )


def test_output_scale_per_variant():
    # a 512 px LDM image becomes 2048 px; SigLIP's 256 px image becomes 2048 px.
    assert {n: latent_geometry(v.layout, v.adapter_in_channels).scale for n, v in VARIANTS.items()} == {
        "flux-2k": 32, "flux-2kto4k-v1.5": 32, "flux2-2k": 64, "flux2-2kto4k-v1.5": 64, "sd3-2k": 32,
        "sd3-2kto4k": 32, "sdxl-2kto4k": 32, "qwenimage-2kto4k-v1.5": 32, "dinov2-2k": 64,
        "siglip-2k": 128,
    }
    assert VARIANTS["siglip-2k"].sr_scale == 8
    assert all(v.sr_scale == 4 for n, v in VARIANTS.items() if n != "siglip-2k")


# ---------------------------------------------------------------- backbones and steps


def test_backbones_and_aliases():
    assert set(BACKBONES) == {
        "flux", "zimage", "zimage-turbo", "flux2", "flux2-klein-4b", "flux2-klein-9b", "sd3", "sdxl",
        "qwenimage", "qwenimage-2512", "dinov2", "siglip",
    }
    served = {b for v in VARIANTS.values() for b in v.backbones}
    assert served == set(BACKBONES)


@pytest.mark.parametrize(
    "backbone, names",
    [
        ("flux", ["flux-2k", "flux-2kto4k-v1.5"]),
        ("zimage-turbo", ["flux-2k", "flux-2kto4k-v1.5"]),
        ("flux2-klein-9b", ["flux2-2k", "flux2-2kto4k-v1.5"]),
        ("sd3", ["sd3-2k", "sd3-2kto4k"]),
        ("SDXL", ["sdxl-2kto4k"]),
        ("qwenimage-2512", ["qwenimage-2kto4k-v1.5"]),
        ("siglip", ["siglip-2k"]),
    ],
)
def test_variants_for_backbone(backbone, names):
    assert [v.name for v in variants_for_backbone(backbone)] == names


def test_variants_for_backbone_with_deprecated():
    names = [v.name for v in variants_for_backbone("flux2", include_deprecated=True)]
    assert names[0] == "flux2-2k"
    assert set(names) == {"flux2-2k", "flux2-2kto4k-v1.5", "flux2-2kto4k-v1", "flux2-2kto4k-v1-2606"}


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(LatentError, match="Unknown backbone 'flux3'.*zimage-turbo.*qwenimage-2512"):
        variants_for_backbone("flux3")
    with pytest.raises(LatentError, match="Choose one of"):
        recommended_stop_step("wan")


def test_recommended_stop_steps():
    # Reference README: the stop step and the run length; None = decode the final x0.
    assert recommended_stop_step("flux") == (24, 28)
    assert recommended_stop_step("sd3") == (24, 28)
    assert recommended_stop_step("sdxl") == (26, 30)
    assert recommended_stop_step("flux2") == (46, 50)
    assert recommended_stop_step("zimage") == (46, 50)
    assert recommended_stop_step("qwenimage") == (44, 50)
    assert recommended_stop_step("qwenimage-2512") == (44, 50)
    for distilled in ("zimage-turbo", "flux2-klein-4b", "flux2-klein-9b"):
        assert recommended_stop_step(distilled) is None
    assert set(RECOMMENDED_STOP) == set(BACKBONES)


# ---------------------------------------------------------------- structure and names


@pytest.mark.parametrize(
    "layout, cin, names",
    [
        ("v1", 16, ["flux-2k", "sd3-2k", "sd3-2kto4k"]),
        ("v1", 4, ["sdxl-2kto4k"]),
        ("v1", 128, ["flux2-2k"]),
        ("v1.5", 32, ["flux2-2kto4k-v1.5"]),
        ("v1.5", 16, ["flux-2kto4k-v1.5", "qwenimage-2kto4k-v1.5"]),
        ("v1", 768, ["dinov2-2k"]),
        ("v1", 1152, ["siglip-2k"]),
        ("v1.5", 128, []),
        ("v1", 32, []),
    ],
)
def test_variants_matching(layout, cin, names):
    assert [v.name for v in variants_matching(layout, cin)] == names


def test_variants_matching_with_deprecated():
    names = [v.name for v in variants_matching("v1", 16, include_deprecated=True)]
    assert names == ["flux-2k", "sd3-2k", "sd3-2kto4k", "flux-2kto4k-v1", "qwenimage-2kto4k-v1"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("flux-2k", "flux-2k"),
        ("  SDXL-2KTO4K ", "sdxl-2kto4k"),
        ("PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step", "qwenimage-2kto4k-v1.5"),
        ("pid_res2k_sr8x_official_siglip_distill_4step", "siglip-2k"),
        ("pid_sd3_1024_to_4096_4step_bf16", "sd3-2kto4k"),
        ("pid_flux2_512_to_2048_4step_mxfp8", "flux2-2k"),
        ("flux-2kto4k-v1", "flux-2kto4k-v1"),
    ],
)
def test_get_variant(name, expected):
    assert get_variant(name).name == expected


def test_get_variant_unknown_lists_the_choices():
    with pytest.raises(CheckpointError, match=r"Unknown PiD checkpoint 'flux-8k'.*flux-2k, .*siglip-2k"):
        get_variant("flux-8k")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/models/pid/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth", "flux-2k"),
        (r"C:\models\PiD_res2kto4k_sr4x_official_sdxl_distill_4step\model_ema_bf16.pth", "sdxl-2kto4k"),
        ("checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step/model_ema_bf16.pth",
         "flux2-2kto4k-v1.5"),
        ("pid_res2k_sr4x_official_dinov2_distill_4step.safetensors", "dinov2-2k"),
        ("models/diffusion_models/pid_flux1_512_to_2048_4step_bf16.safetensors", "flux-2k"),
        ("PID_SD3_512_TO_2048_4STEP_BF16.SAFETENSORS", "sd3-2k"),
        ("nvidia_pid/pid_flux2_512_to_2048_4step_mxfp8.safetensors", "flux2-2k"),
        ("pid_qwenimage_1024_to_4096_4step_bf16.safetensors", "qwenimage-2kto4k-v1.5"),
        ("pid_sdxl_1024_to_4096_4step_fp8_scaled.safetensors", "sdxl-2kto4k"),
        ("pid_flux2_1024_to_4096_4step_2606_bf16.safetensors", "flux2-2kto4k-v1.5"),
        # deprecated experiments; the longer _2606 name wins over its prefix
        ("checkpoints_deprecated/PiD_res2kto4k_sr4x_official_flux2_distill_4step/model_ema_bf16.pth",
         "flux2-2kto4k-v1"),
        ("PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606/model_ema_bf16.pth", "flux2-2kto4k-v1-2606"),
        # the undistilled teachers
        ("checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled/model_ema_bf16.pth",
         "flux-2kto4k-v1.5-undistilled"),
        ("PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled/model_ema_bf16.pth", "flux2-2kto4k-v1.5-undistilled"),
        ("PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled.pth", "qwenimage-2kto4k-v1.5-undistilled"),
    ],
)
def test_variant_from_filename(path, expected):
    assert variant_from_filename(path).name == expected


@pytest.mark.parametrize(
    "path",
    [
        "model_ema_bf16.pth",
        "flux1-dev.safetensors",
        "pixeldit_1300m_1024px_bf16.safetensors",
        "pid_flux1_undistilled.pth",  # says undistilled, names no experiment: the structure decides
        "pid_flux1_2048_to_8192_4step_bf16.safetensors",
    ],
)
def test_variant_from_filename_says_nothing(path):
    assert variant_from_filename(path) is None
    assert variants_from_filename(path) == []


def test_repackaged_4k_names_are_ambiguous_until_the_weights_speak():
    # Comfy-Org's 1024_to_4096 files may hold the v1.5 student or the v1 one it replaced.
    names = [v.name for v in variants_from_filename("pid_flux1_1024_to_4096_4step_bf16.safetensors")]
    assert names == ["flux-2kto4k-v1.5", "flux-2kto4k-v1"]
    name = "pid_flux1_1024_to_4096_4step_bf16.safetensors"
    assert resolve_variant(name, layout="v1.5", adapter_in_channels=16).name == "flux-2kto4k-v1.5"
    assert resolve_variant(name, layout="v1", adapter_in_channels=16).name == "flux-2kto4k-v1"
    name = "pid_flux2_1024_to_4096_4step_2606_bf16.safetensors"
    assert resolve_variant(name, layout="v1", adapter_in_channels=128).name == "flux2-2kto4k-v1-2606"
    assert resolve_variant(name, layout="v1.5", adapter_in_channels=32).name == "flux2-2kto4k-v1.5"


def test_resolve_variant_without_a_telling_name():
    assert resolve_variant(None, layout="v1", adapter_in_channels=4).name == "sdxl-2kto4k"
    assert resolve_variant("my.safetensors", layout="v1.5", adapter_in_channels=32).name == "flux2-2kto4k-v1.5"
    assert resolve_variant("my.safetensors", layout="v1", adapter_in_channels=16) is None
    assert resolve_variant("my.safetensors", layout="v1.5", adapter_in_channels=16) is None
    name = "x/PiD_res2k_sr4x_official_sd3_distill_4step/model_ema_bf16.pth"
    assert resolve_variant(name, layout="v1", adapter_in_channels=16).name == "sd3-2k"


def test_resolve_variant_errors():
    with pytest.raises(CheckpointError, match=r"says sdxl-2kto4k, but its weights have the v1 layout with 16 .*flux-2k"):
        resolve_variant("pid_sdxl_1024_to_4096_4step_bf16.safetensors", layout="v1", adapter_in_channels=16)
    with pytest.raises(CheckpointError, match="No released PiD checkpoint has the v1.5 layout with 4 latent"):
        resolve_variant("x.pth", layout="v1.5", adapter_in_channels=4)


def test_unreleased_structures_are_named_with_what_differs():
    """One sentence says why a checkpoint is none of the released PiDs (messages about its text and its
    latent format start with it): its layout and latent channels, its text width, its text length."""
    from pid_core.commands.random_checkpoints import narrow_config, released_config

    assert unreleased_structure("a.pth", released_config("v1.5", 16)) is None
    assert unreleased_structure("a.pth", released_config("v1", 4)) is None
    text768 = released_config("v1", 16, text_dim=768)
    assert unreleased_structure("custom.safetensors", text768) == (
        "custom.safetensors is not a released PiD checkpoint: its text layer takes 768-wide text, where every "
        "released PiD takes Gemma-2-2b-it's hidden states, 2304 wide")
    short = unreleased_structure("x.pth", narrow_config(text_dim=2304, text_tokens=16))
    assert short.startswith("x.pth is not a released PiD checkpoint") and "at most 16 text tokens" in short
    assert "300" in short
    odd = unreleased_structure("x.pth", narrow_config(layout="v1.5", latent_channels=4))
    assert "v1.5 layout with 4 latent input channels" in odd


# ---------------------------------------------------------------- output sizes


# Training buckets of the released students: the 2K ones at about 2048^2 area in 1:1, 4:3, 3:4, 16:9
# and 9:16; the 2K-to-4K ones at square levels 2048..3840 in steps of 256.
TRAINED_2K = ((2048, 2048), (2304, 1728), (1728, 2304), (2688, 1536), (1536, 2688))
TRAINED_2KTO4K = tuple((s, s) for s in range(2048, 3840 + 1, 256))


@pytest.mark.parametrize("v", list(VARIANTS.values()), ids=lambda v: v.name)
def test_trained_sizes_raise_no_warning(v):
    for w, h in (TRAINED_2K if v.trained_px == (2048, 2048) else TRAINED_2KTO4K):
        assert check_output_size(v, h, w) is None
        assert v.trained_px[0] * 0.97 <= math.sqrt(w * h) <= v.trained_px[1]


def test_trained_ranges():
    assert VARIANTS["sd3-2kto4k"].trained_px == (2048, 3840)
    assert VARIANTS["flux-2k"].trained_px == (2048, 2048)


def test_4k_output_with_a_2k_checkpoint_points_to_the_4k_one():
    msg = check_output_size(VARIANTS["flux-2k"], 2160, 3840)
    assert "3840x2160" in msg and "flux-2kto4k-v1.5" in msg and "2K-to-4K" in msg and "tiled" in msg
    msg = check_output_size(VARIANTS["dinov2-2k"], 4096, 4096)
    assert "tiled" in msg and "2K-to-4K" not in msg


def test_too_large_for_a_4k_checkpoint_suggests_tiling():
    assert check_output_size(VARIANTS["sdxl-2kto4k"], 4096, 4096) is None
    msg = check_output_size(VARIANTS["sdxl-2kto4k"], 8192, 8192)
    assert "tiled decoding" in msg


def test_far_below_the_trained_size_says_so():
    msg = check_output_size(VARIANTS["flux-2kto4k-v1.5"], 1024, 1024)
    assert "far below" in msg and "flux-2k" in msg
    msg = check_output_size(VARIANTS["sdxl-2kto4k"], 1024, 1024)
    assert "far below" in msg and "larger latent" in msg
    assert "far below" in check_output_size(VARIANTS["sd3-2k"], 1024, 1024)
    assert check_output_size(VARIANTS["sd3-2k"], 1536, 1536) is None


def test_extreme_aspect_ratio_warns():
    assert check_output_size(VARIANTS["flux-2k"], 1536, 2688) is None
    msg = check_output_size(VARIANTS["flux-2k"], 1280, 3328)
    assert "aspect ratio 2.60:1" in msg


def test_output_size_must_be_positive():
    with pytest.raises(SizeError, match="0x2048"):
        check_output_size(VARIANTS["flux-2k"], 2048, 0)


# ---------------------------------------------------------------- the undistilled teachers


def test_undistilled_teachers_are_the_v15_students_networks():
    assert list(UNDISTILLED_VARIANTS) == [
        "flux-2kto4k-v1.5-undistilled", "flux2-2kto4k-v1.5-undistilled", "qwenimage-2kto4k-v1.5-undistilled",
    ]
    for name, teacher in UNDISTILLED_VARIANTS.items():
        student = VARIANTS[name.replace("-undistilled", "")]
        assert teacher.kind == TEACHER and student.kind == STUDENT
        assert teacher.experiment == student.experiment.replace("_distill_4step", "_undistilled")
        assert teacher.official_file.path == f"checkpoints/{teacher.experiment}/model_ema_bf16.pth"
        assert teacher.repackaged_file is None  # official files only
        same = ("layout", "latent_format", "latent_channels", "adapter_in_channels", "adapter_hidden",
                "latent_down_factor", "unpatchify", "sr_scale", "rope_ref_px", "num_tensors", "num_params",
                "trained_px", "backbones")
        assert {f: getattr(teacher, f) for f in same} == {f: getattr(student, f) for f in same}
        assert get_variant(name) is teacher and get_variant(teacher.experiment) is teacher


def test_the_name_decides_student_or_teacher():
    """The weights are the same network: only the name (or the user) tells a teacher from a student."""
    official = "checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled/model_ema_bf16.pth"
    assert resolve_variant(official, layout="v1.5", adapter_in_channels=32).kind == TEACHER
    assert resolve_variant("my_flux2_undistilled.pth", layout="v1.5", adapter_in_channels=32).name == (
        "flux2-2kto4k-v1.5-undistilled")
    # a name that says nothing stays the student it always was
    assert resolve_variant("my.safetensors", layout="v1.5", adapter_in_channels=32).name == "flux2-2kto4k-v1.5"
    assert resolve_variant("my_undistilled.pth", layout="v1.5", adapter_in_channels=16) is None  # flux or qwen
    assert kind_from_filename(official) == TEACHER
    assert kind_from_filename("pid_flux_undistilled.safetensors") == TEACHER
    assert kind_from_filename("pid_flux1_1024_to_4096_4step_bf16.safetensors") == STUDENT
    assert kind_from_filename("model_ema_bf16.pth") is None
    with pytest.raises(CheckpointError, match="misnamed"):
        resolve_variant(official, layout="v1", adapter_in_channels=16)


def test_teachers_stay_out_of_the_students_suggestions():
    assert all(v.kind == STUDENT for v in variants_for_backbone("flux", include_deprecated=True))
    assert all(v.kind == STUDENT for v in variants_matching("v1.5", 16))
    warning = check_output_size(UNDISTILLED_VARIANTS["flux-2kto4k-v1.5-undistilled"], 8192, 8192)
    assert "tiled decoding" in warning and "flux-2kto4k-v1.5" not in warning.replace("flux-2kto4k-v1.5-undistilled", "")
