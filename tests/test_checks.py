"""Checks of what users pass: devices, whole numbers, finite values."""

import pytest
import torch

from pid_core.checks import (
    SEED_MAX,
    all_finite,
    check_seed,
    nonfinite_names,
    require_device,
    whole_number,
)
from pid_core.errors import ArgumentError, DeviceError
from pid_core.wording import CLI


def test_devices_are_checked_and_named():
    assert require_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="Unknown device 'gpu0'"):
        require_device("gpu0")
    with pytest.raises(DeviceError, match="not on 'meta'"):
        require_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' is not available.*Use device='cpu'") as missing:
            require_device("cuda")
        assert "Use --device cpu" in missing.value.render(CLI)  # the command line's test_bad_input case too
    else:
        with pytest.raises(DeviceError, match="does not exist"):
            require_device(f"cuda:{torch.cuda.device_count()}")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(DeviceError, match="'mps' is not available"):
            require_device("mps")


@pytest.mark.parametrize("value", [2.7, True, "2", None, float("nan"), float("inf"), torch.tensor([1, 2])])
def test_whole_numbers_refuse_what_would_be_truncated(value):
    with pytest.raises(ArgumentError, match="whole number from 1 to 4"):
        whole_number(value, "steps", 1, 4)


def test_whole_numbers_accept_int_likes():
    assert whole_number(2.0, "steps", 1, 4) == 2
    assert whole_number(torch.tensor(3), "steps", 1, 4) == 3
    assert check_seed(SEED_MAX) == SEED_MAX
    for bad in (SEED_MAX + 1, -1):
        with pytest.raises(ArgumentError, match="seed"):
            check_seed(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_checks(dtype):
    x = torch.randn(64, 64).to(dtype)
    assert all_finite(x) and all_finite(torch.zeros(0, dtype=dtype))
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # finite, though its sum overflows fp32
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[3, 5] = bad
        assert not all_finite(y)
    both = x.clone()
    both[0, 0], both[0, 1] = float("inf"), float("-inf")
    assert not all_finite(both)
    assert nonfinite_names({"a": x, "b": both, "c": torch.arange(3)}) == ["b"]
    long = torch.randn(100_003).to(dtype)  # past any vector width and thread split; NaN anywhere is found
    for where in (0, 50_001, 100_002):
        y = long.clone()
        y[where] = float("nan")
        assert not all_finite(y) and not all_finite(y[::3] if where % 3 == 0 else y[1::3] if where % 3 == 1 else y[2::3])
    assert not all_finite(torch.tensor([float("nan")] * 7, dtype=dtype))  # every element NaN
