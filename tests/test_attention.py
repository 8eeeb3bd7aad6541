"""The attention kernel choice (network/attention.py): the documented rule, the timing probe, fixed
choices; the CPU keeps PyTorch's own dispatch."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from pid_core.network import attention
from pid_core.network.attention import backend_order, choose, probe, set_policy
from pid_core.commands.random_checkpoints import narrow_config, random_model

from small_decode import SMALL, small_inputs

CUDNN, FLASH, EFFICIENT, MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@pytest.fixture(autouse=True)
def rule_policy():
    previous = set_policy("rule")
    yield
    set_policy(previous)


def _qkv(n=40, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g, dtype=dtype) for _ in range(3)]


def test_rule_by_device_and_dtype():
    assert backend_order("cuda", torch.bfloat16, (9, 0)) == [CUDNN, FLASH, EFFICIENT, MATH]  # Hopper
    assert backend_order("cuda", torch.float16, (10, 0)) == [CUDNN, FLASH, EFFICIENT, MATH]  # Blackwell
    assert backend_order("cuda", torch.bfloat16, (8, 0)) == [FLASH, EFFICIENT, CUDNN, MATH]  # Ampere
    assert backend_order("cuda", torch.bfloat16, (8, 9)) == [FLASH, EFFICIENT, CUDNN, MATH]  # Ada
    assert backend_order("cuda", torch.float16, (7, 5)) == [EFFICIENT, MATH]  # Turing
    assert backend_order("cuda", torch.float32, (9, 0)) is None  # fp32: PyTorch's own order
    assert backend_order("cpu", torch.float32) is None and backend_order("cpu", torch.bfloat16) is None


def test_cpu_keeps_pytorchs_dispatch():
    q, k, v = _qkv()
    assert choose(q, k, v) is None
    assert torch.equal(attention.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fixed_policies_restrict_the_backend():
    q, k, v = _qkv()
    assert choose(q, k, v, policy="math") == [MATH] and choose(q, k, v, policy="default") is None
    set_policy("math")
    assert (attention.sdpa(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    set_policy("cudnn")  # no cuDNN kernel on the CPU: proves the restriction is applied
    with pytest.raises(RuntimeError):
        attention.sdpa(q, k, v)
    with pytest.raises(ValueError, match="attention policy"):
        set_policy("fastest")


def test_probe_orders_by_measured_time_and_skips_what_cannot_run():
    q, k, v = _qkv()
    seconds = {MATH: 2.0, FLASH: 1.0}
    current = {}

    def timer(fn):  # the backend sdpa_kernel enabled, read from the call it times
        fn()
        return seconds[current["backend"]]

    original = attention.sdpa_kernel

    def spying(backends, **kw):
        current["backend"] = backends[0]
        return original(backends, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(attention, "sdpa_kernel", spying)
        assert probe(q, k, v, [MATH, CUDNN, FLASH], timer=timer) == [FLASH, MATH]  # cuDNN cannot run on the CPU
        seconds[MATH] = 0.5
        assert probe(q, k, v, [MATH, FLASH], timer=timer) == [MATH, FLASH]


def test_probe_runs_once_per_shape(monkeypatch):
    probed = []
    monkeypatch.setattr(attention, "backend_order", lambda *a: [MATH, FLASH])  # as if on a GPU
    monkeypatch.setattr(attention, "probe", lambda q, k, v, order, timer=None: probed.append(q.shape) or order[::-1])
    set_policy("probe")
    a, b = _qkv(40), _qkv(24)
    assert choose(*a) == [FLASH, MATH]
    choose(*a)
    choose(*b)
    assert probed == [a[0].shape, b[0].shape]
    set_policy("rule")
    assert choose(*a) == [MATH, FLASH]  # the rule again; set_policy forgets what was probed
    assert attention._probed == {}


def test_network_with_math_attention_agrees():
    """The kernels are exact attention: the network's output differs by float rounding only."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    text, latent, sigma = small_inputs(cfg, 64, 96)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, torch.tensor([0.6]), text, latent, sigma)
        set_policy("math")
        out = model(x, torch.tensor([0.6]), text, latent, sigma)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_kernel_that_fails_is_dropped_for_that_shape(monkeypatch):
    """A backend that accepts a shape and then raises: the rest of the order runs, from then on."""
    monkeypatch.setattr(attention, "choose", lambda q, k, v: [CUDNN, FLASH, MATH])
    original, tried = attention.sdpa_kernel, []

    def failing_cudnn(backends, **kw):  # as a cuDNN build that fails at run time would
        tried.append(backends[0])
        if backends[0] == CUDNN:
            raise RuntimeError("cuDNN Frontend error")
        return original(backends, **kw)

    monkeypatch.setattr(attention, "sdpa_kernel", failing_cudnn)
    q, k, v = _qkv()
    out = attention.sdpa(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    attention.sdpa(q, k, v)
    assert tried == [CUDNN, FLASH, FLASH]  # dropped for this shape after its failure
    assert attention._failed == {("cpu", torch.float32, tuple(q.shape), tuple(k.shape)): {CUDNN}}
