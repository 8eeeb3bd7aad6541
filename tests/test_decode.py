"""decode(): from a user's latent (any backbone, clean or stopped early) to RGB in [0, 1]."""

import pytest
import torch

from pid_core.checkpoint import load_pid
from pid_core.decode import decode
from pid_core.errors import LatentError, PidError, TextEmbeddingError
from pid_core.latent_formats import LATENT_FORMATS
from pid_core.sampling import sample, student_schedule
from pid_core.commands.random_checkpoints import make_random_checkpoint

# (file name that names the variant, layout, checkpoint latent channels, latent the user has, format)
BACKBONES = {
    "flux": ("pid_flux1_512_to_2048_4step_bf16.safetensors", "v1", 16, (1, 16, 3, 4)),
    "sd3": ("PiD_res2k_sr4x_official_sd3_distill_4step/model_ema_bf16.pth", "v1", 16, (1, 16, 3, 4)),
    "sdxl": ("pid_sdxl_1024_to_4096_4step_bf16.safetensors", "v1", 4, (1, 4, 3, 4)),
    "flux2": ("PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step/model_ema_bf16.pth", "v1.5", 128, (1, 128, 2, 3)),
    "qwenimage": ("PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step/model_ema_bf16.pth", "v1.5", 16, (1, 16, 1, 3, 4)),
    "dinov2": ("PiD_res2k_sr4x_official_dinov2_distill_4step/model_ema_bf16.pth", "v1", 768, (1, 768, 2, 2)),
    "siglip": ("PiD_res2k_sr8x_official_siglip_distill_4step/model_ema_bf16.pth", "v1", 1152, (1, 1152, 1, 2)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    made = {}
    for backbone, (name, layout, channels, _) in BACKBONES.items():
        path = root / name
        make_random_checkpoint(str(path), layout=layout, latent_channels=channels, text_dim=64, text_tokens=16)
        made[backbone] = str(path)
    return made


def _text(batch=1, tokens=16, dim=64, seed=0):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_decodes_to_the_right_size(checkpoints, backbone):
    model = load_pid(checkpoints[backbone], dtype=torch.float32)
    shape = BACKBONES[backbone][3]
    latent = torch.randn(shape)
    image = decode(model, latent, text=_text(), steps=2, seed=1)
    scale = model.config.scale
    assert model.variant is not None and model.variant.latent_format == backbone
    assert image.shape == (1, 3, shape[-2] * scale, shape[-1] * scale)
    assert image.min() >= 0 and image.max() <= 1


def test_raw_flux2_latent_with_bn_statistics(checkpoints):
    from pid_core.latent_formats import Flux2BNStats

    model = load_pid(checkpoints["flux2"], dtype=torch.float32)
    raw = torch.randn(1, 32, 4, 6)
    stats = Flux2BNStats(torch.randn(128) * 0.1, torch.rand(128) + 0.5)
    image = decode(model, raw, text=_text(), latent_format="flux2_raw", bn_stats=stats, steps=1)
    assert image.shape == (1, 3, 2 * 64, 3 * 64)
    with pytest.raises(PidError, match="(?i)statistic|bn"):
        decode(model, raw, text=_text(), latent_format="flux2_raw", steps=1)


def test_matches_the_plain_sampler_with_explicit_noise(checkpoints):
    """decode = prepare latent (bf16-rounded) + the student sampler + (x+1)/2, nothing else."""
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent, text = torch.randn(2, 16, 3, 4), _text(2)
    sigma = torch.tensor([0.0, 0.4])
    noise = torch.randn(2, 3, 96, 128)
    renoise = [torch.randn(2, 3, 96, 128) for _ in range(3)]
    image = decode(model, latent, text=text, sigma=sigma, noise=noise, renoise=renoise)
    z = ((latent - 0.1159) * 0.3611).to(torch.bfloat16).float()
    with torch.no_grad():
        ref = sample(lambda x, t: model(x, t, text, z, sigma), noise, student_schedule(4), renoise=renoise)
    assert torch.equal(image, (ref + 1) / 2)


def test_seed_is_deterministic_and_matters(checkpoints):
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 2)
    a = decode(model, latent, text=_text(), seed=3, steps=2)
    b = decode(model, latent, text=_text(), seed=3, steps=2)
    c = decode(model, latent, text=_text(), seed=4, steps=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_on_the_cpu_seeds_repeat_every_2_to_the_32(checkpoints):
    """What the seed's help and tooltips say: torch's CPU generator (mt19937) keeps the seed's low 32 bits,
    so seeds s, s + 2^32 and s + 2^63 decode the same image on the CPU (on CUDA, Philox takes all 64 bits).
    Seeds are not remapped: that would change the CPU images of every seed from 2^32 on."""
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 2)
    a = decode(model, latent, text=_text(), seed=5, steps=2)
    for seed in (5 + 2**32, 5 + 2**63, 2**64 - 2**32 + 5):
        assert torch.equal(decode(model, latent, text=_text(), seed=seed, steps=2), a), seed
    assert not torch.equal(decode(model, latent, text=_text(), seed=6 + 2**32, steps=2), a)


def test_early_stopped_and_leftover_latents_agree(checkpoints):
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    fmt = LATENT_FORMATS["flux"]
    x_t = torch.randn(1, 16, 2, 3)
    sigma = 0.3
    true_state = fmt.from_pid(x_t)  # what KSampler Early Stop stores
    leftover = fmt.from_pid(x_t / (1 - sigma))  # what a stock KSamplerAdvanced leftover latent holds
    a = decode(model, true_state, text=_text(), sigma=sigma, steps=1)
    b = decode(model, leftover, text=_text(), sigma=sigma, leftover_noise=True, steps=1)
    assert (a - b).abs().max() < 1e-5


def test_batches_and_text_broadcast(checkpoints):
    model = load_pid(checkpoints["sdxl"], dtype=torch.float32)
    latent = torch.randn(3, 4, 2, 2)
    image = decode(model, latent, text=_text(1), sigma=torch.tensor([0.0, 1.0, 5.0]), steps=1)
    assert image.shape[0] == 3
    with pytest.raises(TextEmbeddingError, match="2 text embeddings for 3 latents"):
        decode(model, latent, text=_text(2), steps=1)


def test_clear_errors(checkpoints):
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    with pytest.raises(LatentError, match="SDXL"):
        decode(model, torch.randn(1, 4, 2, 2), text=_text(), steps=1)
    with pytest.raises(TextEmbeddingError, match="width 4096"):
        decode(model, torch.randn(1, 16, 2, 2), text=torch.randn(1, 16, 4096), steps=1)
    with pytest.raises(PidError, match="1 to 4 steps"):
        decode(model, torch.randn(1, 16, 2, 2), text=_text(), steps=8)
    with pytest.raises(LatentError, match="(?i)unknown latent format"):
        decode(model, torch.randn(1, 16, 2, 2), text=_text(), latent_format="wan", steps=1)
    with pytest.raises(TextEmbeddingError, match="text encoder"):
        decode(model, torch.randn(1, 16, 2, 2), text="a cat", steps=1)


def test_backbone_names_select_the_format(checkpoints):
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 2)
    a = decode(model, latent, text=_text(), latent_format="zimage", steps=1)
    b = decode(model, latent, text=_text(), latent_format="flux", steps=1)
    assert torch.equal(a, b)


def test_size_warning_for_untrained_sizes(checkpoints, caplog):
    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    with caplog.at_level("WARNING", logger="pid_core"):
        decode(model, torch.randn(1, 16, 2, 2), text=_text(), steps=1)
    assert any("trained" in r.message for r in caplog.records)


def test_tiling_single_tile_equals_untiled_and_small_tiles_cover(checkpoints):
    from pid_core.tiling import TileOptions

    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent, text = torch.randn(1, 16, 12, 20), _text()
    whole = decode(model, latent, text=text, seed=5, steps=2)
    one_tile = decode(model, latent, text=text, seed=5, steps=2, tiling=TileOptions(mode="manual", tile_px=1024))
    assert (whole - one_tile).abs().max() < 1e-5
    seen = []
    tiled = decode(model, latent, text=text, seed=5, steps=2, tiling=TileOptions(mode="manual", tile_px=256, overlap_px=64),
                   tile_callback=lambda done, total: seen.append((done, total)))
    assert tiled.shape == whole.shape == (1, 3, 384, 640)
    assert seen and seen[-1][0] == seen[-1][1] > 1
    # The state kept on the CPU (for small cards) is the same decode; explicit noise is left untouched.
    noise = torch.randn(1, 3, 384, 640)
    kept = noise.clone()
    options = TileOptions(mode="manual", tile_px=256, overlap_px=64)
    on = decode(model, latent, text=text, noise=noise, steps=2, tiling=options)
    off = decode(model, latent, text=text, noise=noise, steps=2,
                 tiling=TileOptions(mode="manual", tile_px=256, overlap_px=64, canvas_on_device=False))
    assert torch.equal(on, off) and torch.equal(noise, kept)


# ---------------------------------------------------------------- undistilled checkpoints


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled" / "model_ema_bf16.pth"
    make_random_checkpoint(str(path), layout="v1.5", latent_channels=16, text_dim=64, text_tokens=16)
    return str(path)


class _Encoder:
    """Stands in for GemmaTextEncoder: a fixed embedding per prompt."""

    def __init__(self):
        self.prompts = []

    def encode(self, prompts):
        self.prompts += list(prompts)
        return torch.stack([_text(seed=len(p))[0] for p in prompts])


def test_teacher_decodes_with_dpm_solver_and_guidance(teacher_checkpoint):
    from pid_core.teacher import dpm_solver_pp, teacher_schedule, teacher_shift
    from pid_core.text import NEGATIVE_PROMPT

    model = load_pid(teacher_checkpoint, dtype=torch.float32)
    assert model.variant.name == "flux-2kto4k-v1.5-undistilled"
    latent = torch.randn(1, 16, 2, 3)
    encoder = _Encoder()
    steps_seen = []
    image = decode(model, latent, text="a fox", text_encoder=encoder, steps=3, seed=2,
                   callback=lambda i, n, x0: steps_seen.append((i, n)))
    assert encoder.prompts == ["a fox", NEGATIVE_PROMPT]  # the reference's negative prompt by default
    assert steps_seen == [(1, 3), (2, 3), (3, 3)] and image.shape == (1, 3, 64, 96)
    # the same as the solver driven by hand with the guided x0 (two forwards, uncond first)
    from pid_core.sampling import initial_noise
    from pid_core.teacher import data_prediction

    z = (LATENT_FORMATS["flux"].to_pid(latent)).to(torch.bfloat16).float()
    text, negative, sigma = encoder.encode(["a fox"]), encoder.encode([NEGATIVE_PROMPT]), torch.zeros(1)
    noise, _ = initial_noise((1, 3, 64, 96), seed=2)

    def denoise(x, t):
        with torch.no_grad():
            return data_prediction(x, t, model(x, t, text, z, sigma), model(x, t, negative, z, sigma), 5.0)

    by_hand = dpm_solver_pp(denoise, noise, teacher_schedule(3, teacher_shift(64, 96)))
    assert (image - (by_hand + 1) / 2).abs().max() < 1e-4


def test_teacher_settings_and_errors(teacher_checkpoint, checkpoints):
    model = load_pid(teacher_checkpoint, dtype=torch.float32)
    latent = torch.randn(1, 16, 2, 2)
    with pytest.raises(TextEmbeddingError, match="needs a negative text"):
        decode(model, latent, text=_text(), steps=2)  # an embedding, no encoder: no negative to make
    a = decode(model, latent, text=_text(), steps=2, negative=_text(seed=5))
    b = decode(model, latent, text=_text(), steps=2, cfg=1.0)  # no guidance: no negative needed
    assert not torch.equal(a, b)
    student = decode(model, latent, text=_text(), sampler="student", steps=2)  # the override (with a warning)
    assert student.shape == a.shape
    with pytest.raises(PidError, match="draws no re-noise"):
        decode(model, latent, text=_text(), steps=2, cfg=1.0, renoise=[torch.zeros(1, 3, 64, 64)])
    # a student checkpoint with the teacher's sampler runs too (and warns)
    flux = load_pid(checkpoints["flux"], dtype=torch.float32)
    out = decode(flux, torch.randn(1, 16, 2, 2), text=_text(), sampler="teacher", steps=2, cfg=1.0)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# a colour reference (docs/DESIGN.md §15)

def test_a_colour_reference_is_matched_after_the_decode_and_reported(checkpoints):
    from pid_core.colour import colour_error

    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(5))
    plain = decode(model, latent, text=_text(), seed=2, steps=2)
    # a reference: the decode's own colours, smaller and cast towards red
    reference = torch.nn.functional.avg_pool2d(plain, 4)
    reference = (reference * torch.tensor([1.0, 0.8, 0.7]).view(1, 3, 1, 1) + 0.05).clamp(0, 1)
    reports = []
    from pid_core.decode import run_plan
    from pid_core.plan import plan_decode

    plan = plan_decode(model, latent, _text(), steps=2, color_reference=reference)
    assert plan.colour.strength == 1.0 and plan.summary()["colour"] == "matched to a 32x24 reference, strength 1"
    matched = run_plan(model, plan, seed=2, on_colour=lambda before, after: reports.append((before, after)))
    (before, after), = reports
    assert torch.equal(before.delta_e, colour_error(plain, reference).delta_e)
    assert (after.delta_e < before.delta_e / 3).all() and (after.delta_e < 1.0).all()
    assert torch.equal(colour_error(matched, reference).delta_e, after.delta_e)
    # strength 0 leaves the decode's bits; no reference changes nothing
    assert torch.equal(decode(model, latent, text=_text(), seed=2, steps=2, color_reference=reference,
                              color_match=0.0), plain)


def test_a_colour_reference_that_does_not_fit_is_refused(checkpoints):
    from pid_core.errors import ArgumentError, ColourReferenceError

    model = load_pid(checkpoints["flux"], dtype=torch.float32)
    latent = torch.randn(1, 16, 3, 4)  # 128 x 96 output
    with pytest.raises(ColourReferenceError, match=r"is 64x64 .* decoded image is 128x96"):
        decode(model, latent, text=_text(), steps=1, color_reference=torch.rand(1, 3, 64, 64))
    with pytest.raises(ColourReferenceError, match="NaN or infinite"):
        decode(model, latent, text=_text(), steps=1, color_reference=torch.full((1, 3, 24, 32), float("nan")))
    with pytest.raises(ColourReferenceError, match="1 colour channel"):
        decode(model, latent, text=_text(), steps=1, color_reference=torch.rand(1, 1, 24, 32))
    with pytest.raises(ColourReferenceError, match="holds 2 images but the decode makes 1"):
        decode(model, latent, text=_text(), steps=1, color_reference=torch.rand(2, 3, 24, 32))
    with pytest.raises(ArgumentError, match="color_match must be a number from 0 to 1"):
        decode(model, latent, text=_text(), steps=1, color_reference=torch.rand(1, 3, 24, 32), color_match=1.5)
    with pytest.raises(ArgumentError, match="no color_reference was given"):
        decode(model, latent, text=_text(), steps=1, color_match=0.5)
