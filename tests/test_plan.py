"""The decode plan: each fact resolved once, the same way for the command line, the API and the nodes."""

import pytest
import torch

from pid_core.errors import LatentError, TextEmbeddingError
from pid_core.latents import LatentMeta
from pid_core.plan import match_text_batch, plan_decode, resolve_latent_format, resolve_sigma
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.tiling import TileOptions


@pytest.fixture(scope="module")
def model():
    return random_model(narrow_config(layout="v1", latent_channels=16, text_dim=32, text_tokens=12))


def _text(batch=1):
    return torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(0))


def test_sigma_explicit_then_the_latents_own_then_clean():
    meta = LatentMeta(sigma=3.5, latent_format="sdxl", source="the LATENT")
    assert resolve_sigma(None, meta) == (3.5, "pid_sigma of the LATENT")
    assert resolve_sigma(-1.0, meta)[0] == -1.0  # given (and then refused): only None means "not given"
    assert resolve_sigma(0.1, meta)[0] == 0.1
    assert resolve_sigma(0.0, meta)[0] == 0.0  # 0 means clean, not auto
    assert resolve_sigma(None, LatentMeta()) == (0.0, "none given: taken as clean")
    per_sample = torch.tensor([0.1, 0.2])
    assert resolve_sigma(per_sample, meta)[0] is per_sample


def test_format_explicit_then_the_latents_own_then_detected(model):
    samples = torch.randn(1, 16, 2, 2)
    meta = LatentMeta(latent_format="sd3")
    assert resolve_latent_format("auto", meta, model, samples) == "sd3"
    assert resolve_latent_format("flux", meta, model, samples) == "flux"
    assert resolve_latent_format("zimage", LatentMeta(), model, samples) == "flux"  # a backbone name
    assert resolve_latent_format(None, LatentMeta(latent_format="SDXL"), model, torch.randn(1, 4, 2, 2)) == "sdxl"
    with pytest.raises(LatentError, match="16-channel"):  # no variant, no meta: the user must say
        resolve_latent_format("auto", LatentMeta(), model, samples)
    with pytest.raises(LatentError, match="(?i)unknown latent format 'wan'"):
        resolve_latent_format("wan", LatentMeta(), model, samples)


def test_text_batch():
    assert match_text_batch(_text(1), 3).shape[0] == 3
    assert match_text_batch(_text(3), 3).shape[0] == 3
    with pytest.raises(TextEmbeddingError, match="2 text embeddings for 3 latents"):
        match_text_batch(_text(2), 3)


def test_plan_holds_every_resolved_fact(model):
    samples = torch.randn(2, 16, 3, 4)
    plan = plan_decode(model, samples, _text(1), meta=LatentMeta(sigma=0.3, latent_format="flux"))
    assert plan.latent_format == "flux" and plan.sigma.tolist() == pytest.approx([0.3, 0.3])
    assert plan.sigma_source == "pid_sigma of the latent"
    assert plan.output_hw == (96, 128) and plan.batch == 2 and plan.text.shape == (2, 7, 32)
    # the latent in PiD space, rounded to bf16 like the reference's hand-over
    z = ((samples - 0.1159) * 0.3611).to(torch.bfloat16).float()
    assert torch.equal(plan.latent, z)
    assert not plan.tiles.tiled


@pytest.mark.parametrize("stored", [1.5, float("nan"), torch.tensor([[0.1]]), torch.tensor([0.1, 0.2]), "high"])
def test_a_bad_sigma_from_the_latent_says_so(model, stored):
    with pytest.raises(LatentError, match="pid_sigma of latent.safetensors; pass sigma= to override it"):
        plan_decode(model, torch.randn(1, 16, 2, 2), _text(),
                    meta=LatentMeta(sigma=stored, latent_format="flux", source="latent.safetensors"))


def test_nan_and_lists_are_given_sigmas():
    assert resolve_sigma([0.1, 0.2], LatentMeta(sigma=0.5))[1] == "given"
    nan = float("nan")
    assert resolve_sigma(nan, LatentMeta(sigma=0.5))[1] == "given"  # then refused as a value, never ignored


def test_a_chosen_format_that_contradicts_the_checkpoint_warns(tmp_path, caplog):
    from pid_core.checkpoint import load_pid
    from pid_core.commands.random_checkpoints import make_random_checkpoint

    path = str(tmp_path / "pid_flux1_512_to_2048_4step_bf16.safetensors")
    make_random_checkpoint(path, text_dim=32, text_tokens=12)
    flux = load_pid(path, dtype=torch.float32)
    samples = torch.randn(1, 16, 2, 2)
    assert not plan_decode(flux, samples, _text(), latent_format="flux").warnings[:-1]
    plan = plan_decode(flux, samples, _text(), latent_format="sd3")
    assert "'sd3' (SD3) was given, but the checkpoint is flux-2k" in plan.warnings[0]
    assert "'sd3' (SD3) was given" in caplog.text
    stored = plan_decode(flux, samples, _text(), meta=LatentMeta(latent_format="qwenimage", source="the LATENT"))
    assert "stored with the LATENT" in stored.warnings[0]
    assert not any("was given" in w for w in plan_decode(flux, samples, _text(), latent_format="zimage").warnings)


def test_api_arguments_are_checked(model):
    from pid_core.errors import ArgumentError, DeviceError

    samples = torch.randn(1, 16, 2, 2)
    with pytest.raises(ArgumentError, match="tiling must be None or a TileOptions"):
        plan_decode(model, samples, _text(), latent_format="flux", tiling="auto")
    with pytest.raises(DeviceError, match="gpu0"):
        plan_decode(model, samples, _text(), latent_format="flux", device="gpu0")
    with pytest.raises(ArgumentError, match="loaded with checkpoint.load_pid"):
        plan_decode("model.safetensors", samples, _text())
    with pytest.raises(LatentError, match="must be a torch tensor"):
        plan_decode(model, samples.numpy(), _text(), latent_format="flux")
    with pytest.raises(ArgumentError, match="overlap_px"):
        TileOptions(overlap_px=-5)
    with pytest.raises(ArgumentError, match="sampler must be auto, student or teacher, got 3"):
        plan_decode(model, samples, _text(), latent_format="flux", sampler=3)
    with pytest.raises(LatentError, match="latent_format must be a name"):
        plan_decode(model, samples, _text(), meta=LatentMeta(latent_format=3))
    for shift in (float("nan"), -1.0, 0.0, 1e30, "6", True):  # 0 and below, or far above: infinite x0 from step 1
        with pytest.raises(ArgumentError, match="shift must be a number above 0 and at most 100"):
            plan_decode(model, samples, _text(), latent_format="flux", sampler="teacher", cfg=1.0, shift=shift)
    assert plan_decode(model, samples, _text(), latent_format="flux", sampler="teacher", cfg=1.0,
                       shift=3).sampler.shift == 3.0


def test_one_untiled_path(model):
    """No tiling options (the API's and the command line's --tile off) is PiD Decode's tiling off: the
    same chunked plan, so the same memory."""
    samples = torch.randn(1, 16, 16, 16)
    default = plan_decode(model, samples, _text(), latent_format="flux").tiles
    off = plan_decode(model, samples, _text(), latent_format="flux", tiling=TileOptions(mode="off")).tiles
    assert default == off and default.pixel_chunk_tokens


def test_memory_follows_the_plan(model):
    """What PiD Decode asks ComfyUI to free: the plan's working memory (forward + the sampler's state)."""

    def memory(batch, side, options):
        samples = torch.randn(batch, 16, side // 32, side // 32)
        return plan_decode(model, samples, _text(), latent_format="flux", tiling=options).memory_bytes

    auto = TileOptions()
    small = memory(1, 512, auto)
    assert memory(1, 1024, auto) > small
    assert memory(2, 512, auto) > small
    # tiles bound the network's part: a small manual tile asks for less than one pass at 4K
    whole = memory(1, 4096, TileOptions(mode="off"))
    tiled = memory(1, 4096, TileOptions(mode="manual", tile_px=512, max_batch_tiles=1))
    assert tiled < whole


def test_within_a_budget_tiles_again(model):
    samples = torch.randn(1, 16, 128, 128)  # 4096 px
    plan = plan_decode(model, samples, _text(), latent_format="flux", tiling=TileOptions())
    tight = plan.within(model, plan.memory_bytes // 4)
    assert tight.memory_bytes <= plan.memory_bytes // 4 or not tight.tiles.fits_budget
    assert tight.latent is plan.latent and tight.output_hw == plan.output_hw


# ---------------------------------------------------------------- the sampler: student or teacher


def _named(model, path, variant=None):
    """The same random network under another file name (the weights cannot tell a teacher)."""
    from pid_core.checkpoint import CheckpointInfo

    clone = random_model(model.config)
    clone.variant = variant
    clone.checkpoint = CheckpointInfo(path=path, key_layout="test", file_dtype=torch.float32)
    return clone


@pytest.fixture(scope="module")
def teacher_model():
    from pid_core.variants import UNDISTILLED_VARIANTS

    cfg = narrow_config(layout="v1.5", latent_channels=16, text_dim=32, text_tokens=12)
    return _named(random_model(cfg), "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled/model_ema_bf16.pth",
                  UNDISTILLED_VARIANTS["flux-2kto4k-v1.5-undistilled"])


def test_a_guided_plan_needs_the_negative_text_only_when_guided(teacher_model):
    samples = torch.randn(2, 16, 2, 3)
    asked = []

    def negative():
        asked.append(1)
        return torch.randn(1, 7, 32)

    plan = plan_decode(teacher_model, samples, _text(), latent_format="flux", negative=negative)
    assert asked == [1] and plan.negative.shape == (2, 7, 32) and plan.sampler.guided
    assert plan.tiles.branches == 2 and plan.tiles.state_canvases == 3
    # texts of two lengths cannot share a forward: the plan says two
    shorter = plan_decode(teacher_model, samples, _text(), latent_format="flux", negative=torch.randn(1, 5, 32))
    assert shorter.tiles.branches == 1
    plain = plan_decode(teacher_model, samples, _text(), latent_format="flux", cfg=1.0, negative=negative)
    assert asked == [1] and plain.negative is None and plain.tiles.branches == 1
    with pytest.raises(TextEmbeddingError, match="needs a negative text: pass negative="):
        plan_decode(teacher_model, samples, _text(), latent_format="flux")
    with pytest.raises(TextEmbeddingError, match="The negative text: .*width 2304"):
        plan_decode(teacher_model, samples, _text(), latent_format="flux", negative=torch.randn(1, 5, 2304))
    budget = plan.within(teacher_model, plan.memory_bytes)
    assert budget.sampler == plan.sampler and budget.tiles.state_canvases == 3
