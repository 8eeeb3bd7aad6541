"""Where to stop the latent model: the recommended step scaled to the run, the sigma really reached."""

import pytest

from pid_core.early_stop import FEW_STEPS, choose_stop_step, scale_stop_step, split_sigmas
from pid_core.errors import PidError
from pid_core.variants import recommended_stop_step


@pytest.mark.parametrize("stop,total,steps,expected", [
    (24, 28, 28, 24), (24, 28, 20, 17), (24, 28, 7, 6), (24, 28, 3, 3), (26, 30, 30, 26), (46, 50, 8, 7),
    (44, 50, 50, 44), (24, 28, 1, 1), (46, 50, 4, 4),
])
def test_scale_stop_step(stop, total, steps, expected):
    assert scale_stop_step(stop, total, steps) == expected


def test_choose_stop_step_explicit_and_capped():
    assert choose_stop_step(10, 28, backbone=None, recommended=None) == 10
    assert choose_stop_step(40, 28, backbone="flux", recommended=(24, 28)) == 28


@pytest.mark.parametrize("auto", [0, -1])
def test_choose_stop_step_auto(auto):
    assert choose_stop_step(auto, 28, backbone="flux", recommended=(24, 28)) == 24
    assert choose_stop_step(auto, 20, backbone="flux", recommended=(24, 28)) == 17
    # turbo / klein: the reference decodes the final x0
    assert choose_stop_step(auto, 8, backbone="zimage-turbo", recommended=None) == 8
    assert choose_stop_step(auto, 4, backbone="flux", recommended=(24, 28), distilled=True) == 4
    # few-step runs (a turbo model that ComfyUI reports as its base model) hand PiD the final latent
    assert choose_stop_step(auto, 8, backbone="zimage", recommended=(46, 50)) == 8
    assert choose_stop_step(auto, FEW_STEPS + 1, backbone="zimage", recommended=(46, 50)) == 12


def test_choose_stop_step_errors_are_clear():
    with pytest.raises(PidError, match="stop_at_step"):
        choose_stop_step(0, 20, backbone=None, recommended=None)
    with pytest.raises(PidError, match="-5"):
        choose_stop_step(-5, 20, backbone="flux", recommended=(24, 28))
    with pytest.raises(PidError):
        choose_stop_step(3, 0, backbone="flux", recommended=(24, 28))


def test_choose_stop_step_matches_the_recommendations():
    assert choose_stop_step(0, 28, backbone="flux", recommended=recommended_stop_step("flux")) == 24
    assert choose_stop_step(0, 30, backbone="sdxl", recommended=recommended_stop_step("sdxl")) == 26
    assert choose_stop_step(0, 50, backbone="qwenimage", recommended=recommended_stop_step("qwenimage")) == 44


def test_split_sigmas():
    sigmas = [1.0, 0.8, 0.5, 0.2, 0.0]
    assert split_sigmas(sigmas, 2) == (2, 0.5)
    assert split_sigmas(sigmas, 4) == (4, 0.0)
    assert split_sigmas(sigmas, 9) == (4, 0.0)  # past the end: the finished latent
    assert split_sigmas([], 3) == (0, 0.0)  # denoise 0
    assert split_sigmas([0.7], 3) == (0, 0.0)


def test_split_sigmas_uses_the_sigmas_really_run():
    # dpm_2 (discard penultimate): 5 steps are computed as 6 and the penultimate dropped
    full = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    used = full[:-2] + full[-1:]
    assert split_sigmas(used, 3) == (3, 0.5)
    # denoise 0.5 over 4 steps: the tail of an 8-step schedule
    eight = [1 - i / 8 for i in range(9)]
    tail = eight[-5:]
    assert split_sigmas(tail, 1) == (1, pytest.approx(0.375))
