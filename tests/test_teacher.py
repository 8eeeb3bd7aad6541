"""The undistilled checkpoints' sampler: shifted flow times, guidance, DPM-Solver++ (multistep, second
order, lower order at the end), in the reference's float32 arithmetic."""

import json
import math

import pytest
import torch

from conftest import SHARED
from pid_core import teacher
from pid_core.teacher import (
    branches_may_share_forward,
    data_prediction,
    dpm_solver_pp,
    solver_update_,
    teacher_schedule,
    teacher_shift,
    update_coefficients,
)

TEACHER_CASE = SHARED / "fixtures" / "teacher" / "t_v15_cfg5_8steps"


def test_shift_grows_with_the_output():
    assert teacher_shift(2048, 2048) == pytest.approx(6.0)
    assert teacher_shift(4096, 4096) == pytest.approx(6 * math.sqrt(2))
    assert teacher_shift(128, 192) == pytest.approx(1.6600228795504823)  # the shared case's value


def test_schedule_from_near_one_to_zero():
    times = teacher_schedule(25, 6.0)
    assert times.dtype == torch.float32 and len(times) == 26
    assert times[-1].item() == 0.0 and bool((times[1:] < times[:-1]).all())
    s = 0.999
    assert times[0].item() == pytest.approx(6 * s / (1 + 5 * s), rel=1e-6)  # shift(0.999), not 1
    assert teacher_schedule(1, 6.0).tolist() == pytest.approx([6 * s / (1 + 5 * s), 0.0])
    # shift 1 is the plain uniform spacing of 1 - linspace(1, 0.001)
    assert teacher_schedule(4, 1.0).tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])
    with pytest.raises(ValueError):
        teacher_schedule(0, 6.0)
    assert len(teacher_schedule(150, 6.0)) == 151  # the limit of 100 steps is the sampler table's, not the math's


@pytest.mark.skipif(not (TEACHER_CASE / "case.json").exists(), reason="the shared teacher case is not available")
def test_schedule_is_the_reference_network_times():
    case = json.loads((TEACHER_CASE / "case.json").read_text())
    s = case["sampler"]
    times = teacher_schedule(s["steps"], s["shift"])
    expected = [entry[0] for entry in case["network_times"][::2]]  # uncond then cond: every time twice
    assert (times[:-1] * 1000).tolist() == expected  # float32, bit for bit


def test_data_prediction_and_guidance():
    g = torch.Generator().manual_seed(0)
    x, v_c, v_u = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.9, 0.5])
    tt = t.view(-1, 1, 1, 1)
    # no guidance: x0 = x - t v (up to the reference's rounding)
    torch.testing.assert_close(data_prediction(x, t, v_c), x - tt * v_c, rtol=1e-5, atol=1e-5)
    # guidance in v: v_u + cfg (v_c - v_u); cfg 1 is the conditional branch alone, 0 the unconditional one
    guided = data_prediction(x, t, v_c, v_u, 5.0)
    torch.testing.assert_close(guided, x - tt * (v_u + 5.0 * (v_c - v_u)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(data_prediction(x, t, v_c, v_u, 0.0), data_prediction(x, t, v_u), rtol=0, atol=1e-5)
    # the reference's formula, operation for operation
    n_c, n_u = (1 - tt) * v_c + x, (1 - tt) * v_u + x
    assert torch.equal(guided, (x - tt * (n_u + 5.0 * (n_c - n_u))) / (1 - tt))


def test_branches_share_a_forward_away_from_one():
    assert branches_may_share_forward(torch.tensor([0.92, 0.5]))
    assert not branches_may_share_forward(torch.tensor([0.9994]))
    assert not branches_may_share_forward(torch.tensor([0.5, teacher.REFERENCE_ORDER_FROM_T]))


def test_first_order_steps_follow_the_flow_of_a_fixed_x0():
    """With x0 fixed, every DPM-Solver++ update lands on the straight flow path x_t = x0 + (t / t0)(x - x0)."""
    g = torch.Generator().manual_seed(1)
    target, noise = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    times = teacher_schedule(6, 3.0)
    seen = []

    def denoise(x, t):
        seen.append(x.clone())
        return target.clone()

    out = dpm_solver_pp(denoise, noise, times, clamp=False)
    assert torch.equal(out, target)  # the last step returns the last x0
    for x, t in zip(seen, times):
        expected = target + (t / times[0]) * (noise - target)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def reference_transcription(model_x0, x, times):
    """DPM-Solver++ (multistep, order 2, lower order final) transcribed directly from its definition:
    a history of data predictions, lambda = log(alpha / sigma), alpha = 1 - t, sigma = t."""
    lam = lambda t: torch.log(1 - t) - torch.log(t)  # noqa: E731
    steps = len(times) - 1
    history = [(times[0], model_x0(x, times[0]))]
    for step in range(1, steps + 1):
        t = times[step]
        order = 1 if step == 1 or step == steps else 2
        (t0, m0) = history[-1]
        h = lam(t) - lam(t0)
        phi = torch.exp(torch.log(1 - t)) * torch.expm1(-h)
        x_new = (t / t0) * x - phi * m0
        if order == 2:
            t1, m1 = history[-2]
            r = (lam(t0) - lam(t1)) / h
            x_new = x_new - 0.5 * phi * ((1.0 / r) * (m0 - m1))
        x = x_new
        if step < steps:
            history.append((t, model_x0(x, t)))
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 25])
def test_matches_a_direct_transcription(steps):
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(3, 3, generator=g) * 0.3

    def model_x0(x, t):  # a smooth, nonlinear, time-dependent denoiser
        t = torch.as_tensor(t).reshape(-1)[0]
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 - t) + 0.1 * t

    times = teacher_schedule(steps, 2.5)
    ours = dpm_solver_pp(lambda x, t: model_x0(x, t), noise, times, clamp=False)
    ref = reference_transcription(model_x0, noise.clone(), times)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_two_steps_are_two_first_order_steps():
    coefficients = []
    real = teacher.update_coefficients

    def spy(t_prev, t_cur, t_next):
        coefficients.append(t_prev)
        return real(t_prev, t_cur, t_next)

    teacher.update_coefficients = spy
    try:
        dpm_solver_pp(lambda x, t: x * 0.5, torch.ones(1, 3, 2, 2), teacher_schedule(2, 6.0))
        assert coefficients == [None, None]
        coefficients.clear()
        dpm_solver_pp(lambda x, t: x * 0.5, torch.ones(1, 3, 2, 2), teacher_schedule(4, 6.0))
        assert [c is None for c in coefficients] == [True, False, False, True]
    finally:
        teacher.update_coefficients = real


def test_final_step_coefficients_return_x0():
    a, b, d = update_coefficients(None, torch.tensor(0.3), torch.tensor(0.0))
    assert (a.item(), b.item(), d) == (0.0, -1.0, None)


def test_update_in_row_slices_is_bit_identical(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, m0, m1 = (torch.randn(1, 3, 40, 24, generator=g) for _ in range(3))
    a, b, d = update_coefficients(torch.tensor(0.8), torch.tensor(0.6), torch.tensor(0.4))
    whole = solver_update_(x.clone(), m0, m1, a, b, d)
    monkeypatch.setattr(teacher, "UPDATE_SLICE_ELEMENTS", 100)  # a few rows per slice
    sliced = solver_update_(x.clone(), m0, m1, a, b, d)
    assert torch.equal(whole, sliced)
    assert torch.equal(whole, a * x - b * m0 - (0.5 * b) * (d * (m0 - m1)))


def test_progress_callback_and_cancel():
    calls = []
    dpm_solver_pp(lambda x, t: x * 0.0, torch.randn(1, 3, 4, 4), teacher_schedule(3, 6.0),
                  callback=lambda i, n, x0: calls.append((i, n, tuple(x0.shape))))
    assert calls == [(1, 3, (1, 3, 4, 4)), (2, 3, (1, 3, 4, 4)), (3, 3, (1, 3, 4, 4))]

    class Cancelled(Exception):
        pass

    def cancel(i, n, x0):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        dpm_solver_pp(lambda x, t: x * 0.0, torch.randn(1, 3, 4, 4), teacher_schedule(5, 6.0), callback=cancel)


def test_noise_is_left_alone_unless_handed_over():
    noise = torch.randn(1, 3, 4, 4)
    kept = noise.clone()
    dpm_solver_pp(lambda x, t: x * 0.5, noise, teacher_schedule(3, 6.0))
    assert torch.equal(noise, kept)
