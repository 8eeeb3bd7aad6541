import pytest
import torch

from pid_core import sampling
from pid_core.sampling import initial_noise, sample, student_schedule, velocity_to_x0


def test_released_schedule_and_subsampling():
    assert student_schedule(4).tolist() == pytest.approx([0.999, 0.866, 0.634, 0.342, 0.0])
    assert student_schedule(2).tolist() == pytest.approx([0.999, 0.634, 0.0])
    assert student_schedule(3).tolist() == pytest.approx([0.999, 0.866, 0.342, 0.0])  # round(0, 1.33, 2.67, 4)
    assert student_schedule(1).tolist() == [1.0, 0.0]  # the single step runs at t = 1.0
    with pytest.raises(ValueError):
        student_schedule(5)


def test_x0_update_is_float64():
    x = torch.tensor([[1.0]]).float()
    v = torch.tensor([[1e-8 + 1.0]])
    t = torch.tensor([0.999])
    expected = (x.double() - t.double() * v.double()).float()
    assert torch.equal(velocity_to_x0(x, v, t), expected)


def test_loop_renoises_with_fresh_noise_and_reports_each_step():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    seen_t, seen_x = [], []

    def velocity(x, t):  # a perfect model of `target`
        seen_t.append(t.clone())
        seen_x.append(x.clone())
        tt = t.view(-1, 1, 1, 1)
        eps = (x - (1 - tt) * target) / tt
        return eps - target

    noise = torch.randn(2, 3, 8, 8)
    renoise = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    steps = []
    out = sample(velocity, noise, student_schedule(4), renoise=renoise, callback=lambda i, n, x0: steps.append((i, n)))
    assert torch.allclose(out, target, atol=1e-5)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [t[0].item() for t in seen_t] == pytest.approx([0.999, 0.866, 0.634, 0.342])
    # The second input is (1 - 0.866) x0 + 0.866 eps1: built from the first fresh draw.
    assert torch.allclose(seen_x[1], (1 - 0.866) * target + 0.866 * renoise[0], atol=1e-5)


def test_generator_draws_in_reference_order():
    noise, gen = initial_noise((1, 3, 4, 4), seed=7)
    ref = torch.Generator().manual_seed(7)
    assert torch.equal(noise, torch.randn(1, 3, 4, 4, generator=ref))
    calls = []
    sample(lambda x, t: calls.append(x) or torch.zeros_like(x), noise, student_schedule(2), generator=gen)
    eps1 = torch.randn(1, 3, 4, 4, generator=ref)
    assert torch.allclose(calls[1], 0.366 * noise + 0.634 * eps1, atol=1e-6)


def test_callback_exception_cancels():
    class Cancelled(Exception):
        pass

    def cancel(i, n, x0):
        raise Cancelled

    with pytest.raises(Cancelled):
        sample(lambda x, t: torch.zeros_like(x), torch.randn(1, 3, 4, 4), student_schedule(4), callback=cancel)


def test_chunked_x0_update_equals_whole(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 41, generator=g)
    v = torch.randn(2, 3, 37, 41, generator=g).to(torch.bfloat16)
    t = torch.tensor([0.999, 0.342])
    whole = velocity_to_x0(x, v, t)
    monkeypatch.setattr(sampling, "X0_SLICE_ELEMENTS", 500)
    sliced = velocity_to_x0(x, v, t)
    assert torch.equal(whole, sliced) and sliced.dtype == x.dtype
