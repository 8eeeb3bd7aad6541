"""Which exact attention kernel runs: SDPA's backends by a documented rule, or by a short timing probe
(docs/DESIGN.md §3.6).

Every attention of the network is unmasked, exact softmax attention over [B, heads, N, d] (d = 64 in
the patch blocks, 72 in the pixel blocks). PyTorch's SDPA has several exact kernels: flash
(FlashAttention-2), cuDNN, memory-efficient and math; they agree within bf16 rounding, so the choice
is speed only. PyTorch's own order puts flash first and cuDNN last; on Hopper and newer GPUs cuDNN's
attention (its fused kernels for those architectures) is the faster one, on Ampere and Ada flash is.

  the rule (`backend_order`)  CUDA, bf16/fp16: sm90+ cuDNN, flash, efficient, math; sm80-89 flash,
                              efficient, cuDNN, math; older efficient, math. A backend that cannot run
                              a shape is skipped for the next (SDPA's priority order).
                              Anything else (the CPU, fp32 on CUDA): PyTorch's own dispatch, unchanged:
                              on the CPU its fused flash-style kernel, which never builds the
                              [N, N] score matrix (forcing math would, and would change the results).
  the probe (`set_policy("probe")`, env PID_ATTENTION=probe)
                              on CUDA, the first call of each (device, dtype, shape) times every
                              candidate backend on the call's own q, k, v (one warm-up, three timed
                              runs each) and keeps the fastest; within a compiled graph the rule applies.
  a fixed backend             set_policy("flash" | "cudnn" | "efficient" | "math"), or "default" for
                              PyTorch's own order everywhere.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

POLICIES = ("rule", "probe", "default", "flash", "cudnn", "efficient", "math")
FIXED = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
HALF = (torch.bfloat16, torch.float16)
PROBE_RUNS = 3

_policy = os.environ.get("PID_ATTENTION", "rule").strip().lower() or "rule"
_probed: dict = {}  # (device, dtype, q/k/v shapes) -> the backend order the probe chose
_capabilities: dict = {}  # str(device) -> CUDA compute capability, read outside compiled code (note_device)
_failed: dict = {}  # (device, dtype, q/k shapes) -> backends that raised for them
# SDPA tries a list in the given order only with set_priority (torch 2.6+); older torch gets its own order.
_ORDERED = "set_priority" in inspect.signature(sdpa_kernel).parameters


def backend_order(device_type: str, dtype: torch.dtype, capability: Optional[tuple[int, int]] = None
                  ) -> Optional[list]:
    """SDPA backends in the order to try them for this device and dtype; None: PyTorch's own dispatch."""
    if device_type != "cuda" or dtype not in HALF:
        return None
    major, minor = capability or (0, 0)
    if major >= 9:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if major == 8:
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def set_policy(policy: str) -> str:
    """Choose how attention kernels are picked (one of POLICIES); returns the previous policy."""
    global _policy
    policy = policy.strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"attention policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    previous, _policy = _policy, policy
    _probed.clear()
    _failed.clear()
    return previous


def get_policy() -> str:
    return _policy


def note_device(device: torch.device) -> None:
    """Read a CUDA device's compute capability once, from eager code (PidNet.forward), so that compiled
    blocks find it in a dict instead of calling into CUDA while they are traced."""
    if device.type == "cuda" and str(device) not in _capabilities:
        _capabilities[str(device)] = tuple(torch.cuda.get_device_capability(device))


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    if str(device) not in _capabilities and not torch.compiler.is_compiling():
        note_device(device)
    return _capabilities.get(str(device))


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, policy: Optional[str] = None,
           timer: Optional[Callable] = None) -> Optional[list]:
    """The backend order for this call under the policy (None: PyTorch's own dispatch)."""
    policy = policy or _policy
    if policy == "default":
        return None
    if policy in FIXED:
        return [FIXED[policy]]
    order = backend_order(q.device.type, v.dtype, _capability(q.device))
    if policy == "probe" and order is not None and not torch.compiler.is_compiling():
        key = (str(q.device), v.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape))
        if key not in _probed:
            _probed[key] = probe(q, k, v, order, timer=timer)
        return _probed[key]
    return order


def probe(q, k, v, candidates: Sequence, *, timer: Optional[Callable] = None, runs: int = PROBE_RUNS) -> list:
    """Time each candidate backend on these inputs (a warm-up, then `runs` timed calls) and return the
    candidates fastest first; a backend that cannot run them is left out. timer(fn) -> seconds of one
    call (default: wall time with device synchronisation)."""
    timer = timer or _wall_time
    times = []
    for backend in candidates:
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            call()
            seconds = sorted(timer(call) for _ in range(runs))[runs // 2]
        except RuntimeError:  # no kernel of this backend for these inputs
            continue
        times.append((seconds, len(times), backend))
    return [backend for _, _, backend in sorted(times)] or list(candidates)


def _wall_time(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention with the chosen backend order ([B, heads, N, d], unmasked)."""
    order = choose(q, k, v)
    if order is None or (len(order) > 1 and not _ORDERED):
        return F.scaled_dot_product_attention(q, k, v)
    key = (str(q.device), v.dtype, tuple(q.shape), tuple(k.shape))
    order = [b for b in order if b not in _failed.get(key, ())] or order
    try:
        with sdpa_kernel(order, set_priority=True) if len(order) > 1 else sdpa_kernel(order):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError:
        # A kernel that accepted the shape and then failed (a library version's bug): try the rest of
        # the order for this shape from now on. A fixed choice, or compiled code, fails as it is.
        if len(order) == 1 or torch.compiler.is_compiling():
            raise
        _failed.setdefault(key, set()).add(order[0])
        return sdpa(q, k, v)
