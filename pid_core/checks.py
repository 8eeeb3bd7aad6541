"""Checks of what a user passes, shared by the command line, the Python API and the nodes
(docs/DESIGN.md §13): devices that exist, whole numbers in range, values that are finite.

Each check raises a PidError whose one-line message names the problem and the fix, before anything
is loaded or run.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ArgumentError, DeviceError
from .wording import term

SEED_MAX = 2**64 - 1  # torch generators (and ComfyUI's seed widgets) take 0 .. 2^64 - 1
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def require_device(device) -> torch.device:
    """A torch.device that exists here: a bad name or a missing GPU is named, with what is available."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise DeviceError(f"Unknown device {device!r}. Use cpu, cuda (or cuda:N) or mps.") from None
    if dev.type not in DEVICE_TYPES:
        raise DeviceError(f"PiD runs on cpu, cuda, mps or xpu, not on {str(dev)!r}.")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise DeviceError(f"The device {str(dev)!r} does not exist: the CPU takes no index. Use cpu.")
        return dev
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}[dev.type]
    available = backend is not None and backend.is_available()
    if not available:
        why = ""
        if dev.type == "cuda" and torch.version.cuda is None:
            why = " (this PyTorch is built without CUDA: install a CUDA build of torch)"
        raise DeviceError(
            f"The device {str(dev)!r} is not available on this machine{why}. Use {term.device_cpu}, or a device "
            f"this machine has ({', '.join(available_devices())})."
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise DeviceError(
            f"The device {str(dev)!r} does not exist: this machine has {count} {dev.type.upper()} device(s) "
            f"({', '.join(f'{dev.type}:{i}' for i in range(count))})."
        )
    return dev


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def whole_number(value, name: str, low: int, high: int, hint: str = "") -> int:
    """An int from an int-like value (2.0 is fine; 2.7, True and "2" are not), within [low, high]."""
    def refuse(shown):
        return ArgumentError(f"{name} must be a whole number from {low} to {high}, got {shown}.{hint and ' ' + hint}")

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise refuse(f"a tensor of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise refuse(repr(value))
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and value == int(value)):
        raise refuse(repr(value))
    number = int(value)
    if not low <= number <= high:
        raise refuse(number)
    return number


def check_seed(seed) -> int:
    return whole_number(seed, term.seed, 0, SEED_MAX)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite (one reduction, one sync)."""
    return bool(_finite(tensor))


def nonfinite_names(tensors: dict) -> list:
    """The names of the tensors holding NaN or infinite values: one reduction per tensor and a single
    sync per device for all of them."""
    flags = {}
    for name, tensor in tensors.items():
        flags.setdefault(tensor.device, []).append((name, _finite(tensor)))
    bad = []
    for items in flags.values():
        finite = torch.stack([f for _, f in items]).tolist()
        bad += [name for (name, _), ok in zip(items, finite) if not ok]
    return bad


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on the tensor's device. The smallest and largest element are finite exactly
    when every element is (NaN propagates through min and max): one pass in the tensor's own dtype, no
    tensor-size temporary, several times faster than a sum (this check reads every weight at load)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    if tensor.device.type == "mps":  # (min/max support on MPS varies by dtype and version)
        return torch.isfinite(tensor).all()
    if tensor.dtype.itemsize == 1:  # float8 (quantized weights): no min/max kernel on every device
        tensor = tensor.to(torch.float16)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)
