"""Regional compilation (compile.py): the repeated blocks compiled once and reused, switched on and off
per decode, any image size without a recompile."""

import shutil

import pytest
import torch

from pid_core import compile as compiling
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.compile import compile_mode, compiled_blocks, is_compiled, use_compiled_blocks
from pid_core.errors import ArgumentError
from pid_core.tiling import TileOptions
from pid_core.velocity import network_velocity

from small_decode import SMALL, small_inputs, small_plan


def test_compile_option():
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default" and compile_mode("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ArgumentError) as error:
        compile_mode("fastest")
    assert str(error.value).startswith("compile= takes True, False or a torch.compile mode (default, ")


def test_blocks_are_wrapped_once_and_switched(monkeypatch):
    made = []

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            return fn(*a, **k)
        made.append(kw)
        return compiled

    monkeypatch.setattr(compiling.torch, "compile", fake_compile)
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    blocks = compiled_blocks(model)
    assert len(blocks) == cfg.patch_depth + cfg.pixel_depth
    use_compiled_blocks(model, True)
    assert len(made) == len(blocks) and all(kw == dict(mode="default", dynamic=True) for kw in made)
    assert is_compiled(model)
    use_compiled_blocks(model, False)
    assert not is_compiled(model)
    use_compiled_blocks(model, True)  # the same wrappers again: nothing compiled anew
    assert len(made) == len(blocks) and is_compiled(model)
    use_compiled_blocks(model, "reduce-overhead")
    assert len(made) == 2 * len(blocks) and made[-1]["mode"] == "reduce-overhead"
    use_compiled_blocks(model, False)
    theirs = lambda *a, **k: None  # noqa: E731  compiled by the caller: left alone
    blocks[0]._compiled_call_impl = theirs
    use_compiled_blocks(model, True)
    assert blocks[0]._compiled_call_impl is theirs


def test_decode_switches_the_blocks(monkeypatch):
    """network_velocity(compile=...) compiles the blocks for its decode and an eager decode runs them eagerly."""
    monkeypatch.setattr(compiling.torch, "compile", lambda fn, **kw: fn)
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    plan = small_plan(model, 64, 96, TileOptions(mode="off"))
    network_velocity(model, plan, compile=True)
    assert is_compiled(model)
    network_velocity(model, plan)
    assert not is_compiled(model)


@pytest.mark.slow
def test_second_size_does_not_recompile_the_blocks():
    """Traced by dynamo (backend "eager": no code generation, the guards and graphs are the real ones):
    one graph per kind of block, reused by every block and by a second and third image size."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)

    def run(H, W, option):
        text, latent, sigma = small_inputs(cfg, H, W)
        x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(3))
        use_compiled_blocks(model, option, backend="eager")
        with torch.no_grad():
            return model(x, torch.tensor([0.6]), text, latent, sigma)

    compiled = run(64, 96, True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3  # a patch block, the last patch block (no text stream out), a pixel block
    assert torch.equal(compiled, run(64, 96, False))
    run(96, 128, True)
    run(128, 64, True)
    assert counters["stats"]["unique_graphs"] == graphs
    use_compiled_blocks(model, False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_match_eager():
    """Inductor's code for the blocks against eager, on the whole canvas (unchunked pixel blocks)."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    plan = small_plan(model, H, W, TileOptions(mode="off", pixel_chunk_tokens=None))
    x = torch.randn(1, 3, H, W)
    eager = network_velocity(model, plan)(x, torch.tensor([0.9]))
    compiled = network_velocity(model, plan, compile=True)(x, torch.tensor([0.9]))
    use_compiled_blocks(model, False)
    assert (eager - compiled).abs().max() <= 1e-5 * eager.abs().max()
