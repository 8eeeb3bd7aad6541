"""The released PiD checkpoints, as data.

One `Variant` per released checkpoint: the 4-step students and the undistilled v1.5 teachers (the
same network, sampled with many guided steps). What latent it takes, how its network is shaped, what
sizes it was trained for, how it is sampled by default and where its file lives. Everything else in
the pack asks this table instead of hard-coding a backbone; nothing here loads a file or imports
ComfyUI (docs/DESIGN.md §11).

Names: a short id ("flux-2k"), the official experiment name (the folder on the Hub), and the Comfy-Org
repackaged file stem ("pid_flux1_512_to_2048_4step_bf16").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath

from .errors import CheckpointError, LatentError, SizeError
from .latent_formats import LATENT_FORMATS
from .text import released_text_difference

LICENSE_NOTE = (
    "PiD weights: NVIDIA Source Code License (NSCLv1), non-commercial research and evaluation use "
    "only. They are not shipped with this pack; download them yourself, on your own decision."
)

OFFICIAL_REPO = "nvidia/PiD"
REPACKAGED_REPO = "Comfy-Org/PixelDiT"


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub model repository."""

    repo: str
    path: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.path}"

    @property
    def filename(self) -> str:
        return PurePath(self.path).name


# The two kinds of checkpoint. The weights cannot tell them apart (same network, same keys): the file
# name decides, and the user can override it.
STUDENT = "student"  # distilled: the 4-step student sampler, no guidance
TEACHER = "teacher"  # undistilled: DPM-Solver++ over many steps with classifier-free guidance
KINDS = (STUDENT, TEACHER)


# How each kind is sampled by default, and its limits: samplers.SAMPLERS.


@dataclass(frozen=True)
class Variant:
    name: str  # short id used by the nodes and the command line
    label: str  # human name for menus and messages
    experiment: str  # official experiment name (the folder on the Hub)
    backbones: tuple[str, ...]  # the LDMs whose latents it decodes (names and aliases)
    layout: str  # "v1" (hidden 512, per-dim gate) or "v1.5" (hidden 1024, per-token gate, PiT gate)
    latent_format: str  # the latent_formats.LATENT_FORMATS row it takes: its channels and VAE factor
    adapter_hidden: int  # lq_hidden_dim
    unpatchify: int  # lq_latent_unpatchify_factor (2 only for FLUX.2 v1.5)
    sr_scale: int  # output pixels per VAE-decoded pixel
    rope_ref_px: int  # rope_ref_h = rope_ref_w
    num_tensors: int  # tensors in the state dict
    num_params: int  # parameters
    trained_px: tuple[int, int]  # min and max of sqrt(W*H) of the training outputs
    official_file: HubFile
    repackaged_file: HubFile | None  # Comfy-Org bf16 safetensors, where one exists
    repackaged_stems: tuple[str, ...] = ()  # Comfy-Org stems (no precision suffix) that may hold it
    deprecated: bool = False  # moved to checkpoints_deprecated/ upstream
    kind: str = STUDENT  # STUDENT or TEACHER
    license: str = field(default=LICENSE_NOTE, repr=False)

    @property
    def latent_channels(self) -> int:
        """Channels of the PiD-space latent it takes (lq_latent_channels)."""
        return LATENT_FORMATS[self.latent_format].pid_channels

    @property
    def latent_down_factor(self) -> int:
        """Image pixels per cell of the latent it takes: the VAE's factor (latent_spatial_down_factor)."""
        return LATENT_FORMATS[self.latent_format].down_factor

    @property
    def adapter_in_channels(self) -> int:
        """Input channels of the adapter's first conv, after un-packing."""
        return self.latent_channels // self.unpatchify**2


# Widest trained aspect ratio: 2688 x 1536 (1.75, about 16:9).
MAX_TRAINED_ASPECT = 2688 / 1536


def _official(experiment: str, deprecated: bool = False) -> HubFile:
    folder = "checkpoints_deprecated" if deprecated else "checkpoints"
    return HubFile(OFFICIAL_REPO, f"{folder}/{experiment}/model_ema_bf16.pth")


def _repackaged(stem: str) -> HubFile:
    return HubFile(REPACKAGED_REPO, f"diffusion_models/{stem}_bf16.safetensors")


_FLUX_BACKBONES = ("flux", "zimage", "zimage-turbo")
_FLUX2_BACKBONES = ("flux2", "flux2-klein-4b", "flux2-klein-9b")
_QWEN_BACKBONES = ("qwenimage", "qwenimage-2512")


def _v1(name, label, experiment, backbones, latent_format, *, sr=4, params,
        size="2k", repackaged=None, deprecated=False) -> Variant:
    """A v1-layout student (preset pid_sr4x: hidden 512, zeros padding, RoPE ref 1024)."""
    stems = (repackaged,) if isinstance(repackaged, str) else tuple(repackaged or ())
    return Variant(
        name=name, label=label, experiment=experiment, backbones=backbones, layout="v1",
        latent_format=latent_format, adapter_hidden=512, unpatchify=1, sr_scale=sr, rope_ref_px=1024,
        num_tensors=456, num_params=params,
        trained_px=(2048, 2048) if size == "2k" else (2048, 3840),
        official_file=_official(experiment, deprecated),
        repackaged_file=_repackaged(stems[0]) if stems and not deprecated else None,
        repackaged_stems=stems, deprecated=deprecated,
    )


def _v15(name, label, experiment, backbones, latent_format, *, unpatchify=1,
         params, repackaged=(), kind=STUDENT) -> Variant:
    """A v1.5-layout checkpoint (preset pid_sr4x_v1pt5: hidden 1024, replicate padding, RoPE ref 2048)."""
    stems = (repackaged,) if isinstance(repackaged, str) else tuple(repackaged)
    return Variant(
        name=name, label=label, experiment=experiment, backbones=backbones, layout="v1.5",
        latent_format=latent_format, adapter_hidden=1024, unpatchify=unpatchify, sr_scale=4, rope_ref_px=2048, num_tensors=467, num_params=params,
        trained_px=(2048, 3840),
        official_file=_official(experiment), repackaged_file=_repackaged(stems[0]) if stems else None,
        repackaged_stems=stems, kind=kind,
    )


# The released students (the upstream checkpoint registry), with their parameter counts.
_CURRENT = (
    _v1("flux-2k", "FLUX.1 / Z-Image 2K", "PiD_res2k_sr4x_official_flux_distill_4step",
        _FLUX_BACKBONES, "flux", params=1_362_348_170,
        repackaged="pid_flux1_512_to_2048_4step"),
    _v15("flux-2kto4k-v1.5", "FLUX.1 / Z-Image 2K-to-4K (v1.5)",
         "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
         _FLUX_BACKBONES, "flux", params=1_401_300_163,
         repackaged="pid_flux1_1024_to_4096_4step"),
    _v1("flux2-2k", "FLUX.2 / Klein 2K", "PiD_res2k_sr4x_official_flux2_distill_4step",
        _FLUX2_BACKBONES, "flux2", params=1_362_864_266,
        repackaged="pid_flux2_512_to_2048_4step"),
    # The only variant that un-packs its input: 128 packed channels -> 32 at twice the size.
    _v15("flux2-2kto4k-v1.5", "FLUX.2 / Klein 2K-to-4K (v1.5)",
         "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
         _FLUX2_BACKBONES, "flux2", unpatchify=2, params=1_401_447_619,
         # Comfy-Org's bf16 FLUX.2 4K file carries a _2606 tag; v1 or v1.5, the weights tell.
         repackaged=("pid_flux2_1024_to_4096_4step", "pid_flux2_1024_to_4096_4step_2606")),
    _v1("sd3-2k", "SD3 2K", "PiD_res2k_sr4x_official_sd3_distill_4step",
        ("sd3",), "sd3", params=1_362_348_170, repackaged="pid_sd3_512_to_2048_4step"),
    _v1("sd3-2kto4k", "SD3 2K-to-4K", "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
        ("sd3",), "sd3", params=1_362_348_170, size="2kto4k",
        repackaged="pid_sd3_1024_to_4096_4step"),
    _v1("sdxl-2kto4k", "SDXL 2K-to-4K", "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
        ("sdxl",), "sdxl", params=1_362_292_874, size="2kto4k",
        repackaged="pid_sdxl_1024_to_4096_4step"),
    _v15("qwenimage-2kto4k-v1.5", "Qwen-Image 2K-to-4K (v1.5)",
         "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
         _QWEN_BACKBONES, "qwenimage", params=1_401_300_163,
         repackaged="pid_qwenimage_1024_to_4096_4step"),
    _v1("dinov2-2k", "DINOv2-RAE 2K", "PiD_res2k_sr4x_official_dinov2_distill_4step",
        ("dinov2",), "dinov2", params=1_365_813_386),
    # SigLIP is the one 8x model: a 256 px image (16x16 tokens) becomes 2048 px.
    _v1("siglip-2k", "SigLIP-2 Scale-RAE 2K (8x)", "PiD_res2k_sr8x_official_siglip_distill_4step",
        ("siglip",), "siglip", sr=8, params=1_367_582_858),
)

# The undistilled v1.5 teachers the students were distilled from: the same networks (keys, shapes,
# geometry), released as official files only. Sampled with DPM-Solver++ and guidance (teacher.py).
_UNDISTILLED = (
    _v15("flux-2kto4k-v1.5-undistilled", "FLUX.1 / Z-Image 2K-to-4K (v1.5, undistilled)",
         "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled",
         _FLUX_BACKBONES, "flux", params=1_401_300_163, kind=TEACHER),
    _v15("flux2-2kto4k-v1.5-undistilled", "FLUX.2 / Klein 2K-to-4K (v1.5, undistilled)",
         "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled",
         _FLUX2_BACKBONES, "flux2", unpatchify=2, params=1_401_447_619, kind=TEACHER),
    _v15("qwenimage-2kto4k-v1.5-undistilled", "Qwen-Image 2K-to-4K (v1.5, undistilled)",
         "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled",
         _QWEN_BACKBONES, "qwenimage", params=1_401_300_163, kind=TEACHER),
)

# The first 2K-to-4K students of FLUX.1, FLUX.2 and Qwen-Image, replaced by v1.5 and moved to
# checkpoints_deprecated/. Upstream no longer configures them; the v1 layout with the
# 2kto4k settings is presumed. Kept so that such a file (and the Comfy-Org 1024_to_4096 files made
# before v1.5, which the structure tells apart) is recognised instead of misread.
_DEPRECATED = (
    _v1("flux-2kto4k-v1", "FLUX.1 / Z-Image 2K-to-4K (v1, deprecated)",
        "PiD_res2kto4k_sr4x_official_flux_distill_4step", _FLUX_BACKBONES, "flux",
        params=1_362_348_170, size="2kto4k", repackaged="pid_flux1_1024_to_4096_4step",
        deprecated=True),
    _v1("flux2-2kto4k-v1", "FLUX.2 / Klein 2K-to-4K (v1, deprecated)",
        "PiD_res2kto4k_sr4x_official_flux2_distill_4step", _FLUX2_BACKBONES, "flux2",
        params=1_362_864_266, size="2kto4k", repackaged="pid_flux2_1024_to_4096_4step",
        deprecated=True),
    _v1("flux2-2kto4k-v1-2606", "FLUX.2 / Klein 2K-to-4K (v1 2606 re-release, deprecated)",
        "PiD_res2kto4k_sr4x_official_flux2_distill_4step_2606", _FLUX2_BACKBONES, "flux2",
        params=1_362_864_266, size="2kto4k", repackaged="pid_flux2_1024_to_4096_4step_2606",
        deprecated=True),
    _v1("qwenimage-2kto4k-v1", "Qwen-Image 2K-to-4K (v1, deprecated)",
        "PiD_res2kto4k_sr4x_official_qwenimage_distill_4step", _QWEN_BACKBONES, "qwenimage",
        params=1_362_348_170, size="2kto4k", repackaged="pid_qwenimage_1024_to_4096_4step",
        deprecated=True),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in _CURRENT}  # the current students
UNDISTILLED_VARIANTS: dict[str, Variant] = {v.name: v for v in _UNDISTILLED}
DEPRECATED_VARIANTS: dict[str, Variant] = {v.name: v for v in _DEPRECATED}
_ALL: tuple[Variant, ...] = _CURRENT + _UNDISTILLED + _DEPRECATED

# Every backbone name, aliases included, in menu order, with a human name.
BACKBONE_LABELS: dict[str, str] = {
    "flux": "FLUX.1",
    "zimage": "Z-Image",
    "zimage-turbo": "Z-Image-Turbo",
    "flux2": "FLUX.2",
    "flux2-klein-4b": "FLUX.2 [klein] 4B",
    "flux2-klein-9b": "FLUX.2 [klein] 9B",
    "sd3": "SD3",
    "sdxl": "SDXL",
    "qwenimage": "Qwen-Image",
    "qwenimage-2512": "Qwen-Image-2512",
    "dinov2": "DINOv2-RAE",
    "siglip": "SigLIP-2 Scale-RAE",
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_LABELS)

# Where to stop the LDM before handing its latent to PiD: (stop step, total steps), from the
# reference README. None: decode the final x0 - the few-step
# distilled models (turbo, klein), and the RAE models, for which the README gives no stop point.
RECOMMENDED_STOP: dict[str, tuple[int, int] | None] = {
    "flux": (24, 28),
    "zimage": (46, 50),
    "zimage-turbo": None,
    "flux2": (46, 50),
    "flux2-klein-4b": None,
    "flux2-klein-9b": None,
    "sd3": (24, 28),
    "sdxl": (26, 30),
    "qwenimage": (44, 50),
    "qwenimage-2512": (44, 50),
    "dinov2": None,
    "siglip": None,
}


def _key(text: str) -> str:
    return text.strip().lower()


def _choices() -> str:
    return ", ".join([*VARIANTS, *UNDISTILLED_VARIANTS])


def get_variant(name: str) -> Variant:
    """The variant for a short id, an experiment name or a repackaged file stem (any case)."""
    key = _key(str(name))
    for v in _ALL:
        if key in (v.name, _key(v.experiment)):
            return v
    found = variant_from_filename(key)
    if found is not None:
        return found
    raise CheckpointError(
        f"Unknown PiD checkpoint {name!r}. Choose one of: {_choices()} "
        "(or give an official experiment name such as PiD_res2k_sr4x_official_flux_distill_4step, "
        "or a Comfy-Org file name such as pid_flux1_512_to_2048_4step_bf16)."
    )


# Comfy-Org names: pid_<family>_<512_to_2048|1024_to_4096>_4step[_2606]_<bf16|mxfp8|...>.safetensors.
# The stem without the precision suffix is what names the checkpoint.
_REPACKAGED_STEM = re.compile(
    r"pid_(?:flux1|flux2|sd3|sdxl|qwenimage)_(?:512_to_2048|1024_to_4096)_4step(?:_2606)?"
)


def variants_from_filename(path: str | PurePath) -> list[Variant]:
    """Every variant a file name can stand for, current ones first; [] when the name says nothing.

    An official experiment name anywhere in the path (folder or file) names one variant. A Comfy-Org
    `1024_to_4096` name can hold the v1.5 student or the deprecated v1 one it replaced: only the
    weights tell (see `resolve_variant`).
    """
    text = str(path).replace("\\", "/").lower()
    # Longest first: ..._flux2_distill_4step is a prefix of ..._flux2_distill_4step_2606.
    for v in sorted(_ALL, key=lambda v: -len(v.experiment)):
        if _key(v.experiment) in text:
            return [v]
    match = _REPACKAGED_STEM.search(PurePath(text).name)
    if match is None:
        return []
    stem = match.group(0)
    return [v for v in _ALL if stem in v.repackaged_stems]


# A file named after no experiment can still say what it is: "undistilled" in its name (a renamed
# teacher, e.g. pid_flux1_undistilled.pth) picks the teachers among the variants of its structure.
_UNDISTILLED_CUE = "undistilled"


def says_undistilled(path: str | PurePath | None) -> bool:
    return path is not None and _UNDISTILLED_CUE in str(path).lower()


def kind_from_filename(path: str | PurePath | None) -> str | None:
    """STUDENT or TEACHER as a file name tells (its variant, else the "undistilled" cue); None when
    the name says nothing."""
    if path is None:
        return None
    found = variants_from_filename(path)
    if found:
        return found[0].kind
    return TEACHER if says_undistilled(path) else None


def variant_from_filename(path: str | PurePath) -> Variant | None:
    """The variant a file name points to (the current one where a name is ambiguous), or None."""
    found = variants_from_filename(path)
    return found[0] if found else None


def variants_matching(
    layout: str, adapter_in_channels: int, *, include_deprecated: bool = False
) -> list[Variant]:
    """The variants a checkpoint with this detected structure can be (layout + first-conv channels): the
    current students, and with include_deprecated every released file (teachers and deprecated too)."""
    pool = _ALL if include_deprecated else _CURRENT
    return [v for v in pool if v.layout == layout and v.adapter_in_channels == adapter_in_channels]


def resolve_variant(
    path: str | PurePath | None, *, layout: str, adapter_in_channels: int
) -> Variant | None:
    """The variant of a loaded checkpoint, from its structure and its file name together.

    The structure (read from the weights) is the truth; the name only picks among the variants that
    share a structure (flux vs sd3 vs qwen, 2k vs 2kto4k, student vs undistilled teacher: a name that
    names no experiment is a student unless it says "undistilled"). Returns None when the two together
    still leave a choice; raises when the name contradicts the weights.
    """
    fits = variants_matching(layout, adapter_in_channels, include_deprecated=True)
    if not fits:
        raise CheckpointError(
            f"No released PiD checkpoint has the {layout} layout with {adapter_in_channels} latent "
            "input channels, so this file is not one of the released PiD students "
            f"({_choices()}). Load an official model_ema_bf16.pth or a Comfy-Org pid_*.safetensors."
        )
    named = variants_from_filename(path) if path else []
    if named:
        both = [v for v in named if v in fits]
        if both:
            return both[0]
        raise CheckpointError(
            f"The file name {PurePath(str(path)).name!r} says {named[0].name}, but its weights have "
            f"the {layout} layout with {adapter_in_channels} latent input channels, which fits "
            f"{', '.join(v.name for v in fits)}. The file is misnamed: rename it after what it holds, "
            "or download the checkpoint again."
        )
    kind = TEACHER if says_undistilled(path) else STUDENT
    fits = [v for v in fits if v.kind == kind]
    return fits[0] if len(fits) == 1 else None


def unreleased_structure(name: str, config) -> str | None:
    """The sentence saying why a checkpoint of this structure (a PidConfig) is none of the released PiDs,
    or None when what it takes (latent channels, text) is what a released one takes. Messages about a
    checkpoint's text or latent format start with it, so they state no fact of the released checkpoints
    that this one does not share."""
    differences = []
    if not variants_matching(config.layout, config.adapter_in_channels, include_deprecated=True):
        differences.append(f"it has the {config.layout} layout with {config.adapter_in_channels} latent input "
                           "channels, which no released PiD has")
    text = released_text_difference(config.text_dim, config.text_max_tokens)
    if text:
        differences.append(f"its text layer takes {text}")
    if not differences:
        return None
    return f"{name} is not a released PiD checkpoint: {'; and '.join(differences)}"


@dataclass(frozen=True)
class LatentGeometry:
    """How a checkpoint's latent maps onto its output: facts the weights cannot tell."""

    down_factor: int  # image pixels per cell of the latent the user gives (the VAE's factor)
    unpatchify: int  # the adapter un-packs f x f channel groups into space first (FLUX.2 v1.5: 2)
    sr_scale: int  # output pixels per VAE-decoded pixel

    @property
    def scale(self) -> int:
        """Output pixels per latent cell."""
        return self.down_factor * self.sr_scale


# A structure no release has (custom or test checkpoints): an 8x VAE, 4x super-resolution.
DEFAULT_GEOMETRY = LatentGeometry(down_factor=8, unpatchify=1, sr_scale=4)


def latent_geometry(layout: str, adapter_in_channels: int) -> LatentGeometry:
    """The geometry of every released checkpoint with this structure (they all agree), else the default."""
    found = {LatentGeometry(v.latent_down_factor, v.unpatchify, v.sr_scale)
             for v in variants_matching(layout, adapter_in_channels, include_deprecated=True)}
    return found.pop() if len(found) == 1 else DEFAULT_GEOMETRY


def adapter_in_channels_for(layout: str, latent_channels: int) -> int:
    """The adapter's input channels for a latent of this many channels (FLUX.2 v1.5 un-packs 128 to 32)."""
    return next((v.adapter_in_channels for v in _ALL if v.layout == layout and v.latent_channels == latent_channels),
                latent_channels)


def _backbone(backbone: str) -> str:
    key = _key(str(backbone))
    if key not in BACKBONE_LABELS:
        raise LatentError(f"Unknown backbone {backbone!r}. Choose one of: {', '.join(BACKBONES)}.")
    return key


def variants_for_backbone(backbone: str, *, include_deprecated: bool = False) -> list[Variant]:
    """The students that decode this backbone's latents, 2K first."""
    key = _backbone(backbone)
    pool = _CURRENT + _DEPRECATED if include_deprecated else _CURRENT
    return sorted((v for v in pool if key in v.backbones), key=lambda v: v.trained_px[1])


def recommended_stop_step(backbone: str) -> tuple[int, int] | None:
    """(stop step, total steps) at which to hand the LDM latent to PiD; None: use the final x0."""
    return RECOMMENDED_STOP[_backbone(backbone)]


# How far outside the trained range an output may go before we warn (a judgement call, not upstream);
# tiling "auto" decodes up to the same margins in one pass.
TOO_LARGE = 1.15  # sqrt(W*H) above max * this
TOO_SMALL = 0.75  # sqrt(W*H) below min * this
TOO_WIDE = 1.2  # aspect above the widest trained one * this


def check_output_size(variant: Variant, height: int, width: int) -> str | None:
    """A warning when height x width is outside what the checkpoint was trained for, else None.

    PiD accepts any size (docs/DESIGN.md §8), so this never refuses: it says what to use instead.
    """
    if height <= 0 or width <= 0:
        raise SizeError(
            f"Output size {width}x{height} is not a positive size; give width and height > 0."
        )
    side = math.sqrt(height * width)
    low, high = variant.trained_px
    trained = f"~{low}x{low}" if low == high else f"{low}..{high} px a side"
    size = f"{width}x{height}"
    same_family = [v for v in variants_for_backbone(variant.backbones[0]) if v is not variant and v.kind == variant.kind]
    warnings = []
    if side > high * TOO_LARGE:
        bigger = [v.name for v in same_family if v.trained_px[1] > high]
        fix = (f"use the 2K-to-4K checkpoint ({', '.join(bigger)}) or tiled decoding" if bigger
               else "use tiled decoding")
        warnings.append(
            f"{size} is larger than the {trained} that {variant.name} was trained for; {fix}."
        )
    elif side < low * TOO_SMALL:
        smaller = [v.name for v in same_family if v.trained_px[1] < high]
        fix = (f"the 2K checkpoint ({', '.join(smaller)}) fits small outputs better, or start from a "
               "larger latent" if smaller else "start from a larger latent")
        warnings.append(
            f"{size} is far below the {trained} that {variant.name} was trained for, so expect "
            f"softer detail; {fix}."
        )
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_TRAINED_ASPECT * TOO_WIDE:
        warnings.append(
            f"The aspect ratio {aspect:.2f}:1 of {size} is wider than the 16:9 that PiD was trained on; "
            "expect stretched structure; crop to 16:9 or narrower, or use tiled decoding."
        )
    return " ".join(warnings) or None
