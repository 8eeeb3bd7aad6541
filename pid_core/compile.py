"""torch.compile for the network: each repeated block compiled once, reused by every block of its kind
(docs/DESIGN.md §3.7).

The work of a forward is its 14 patch blocks and 2 pixel blocks. Compiling the whole network makes one
graph of all of them per image shape (about a minute on a GPU, again for every new size); compiling the
blocks ("regional compilation") traces one patch block and one pixel block and reuses the code for the
others, since their modules differ only in their weights, which the compiled code takes as inputs. The
rest of a forward (embedders, the adapter's conv stack, the read-out) runs eagerly: it is a few percent
of the work, and the step cache (network/prepared.py) runs the adapter once per decode anyway.

Shapes: `dynamic=True` compiles for any token count, so a second image of another size reuses the
code (no recompile). Chunked pixel blocks loop over chunks in Python, which the compiled code unrolls
per token count: they recompile per size (the policy runs them whole wherever memory allows).

Modes: torch.compile's own. "default" (the default) compiles fastest; "reduce-overhead" adds CUDA
graphs (replays each block's kernels in one launch; pays where launches, not math, limit the speed:
small images, fast GPUs); "max-autotune" also searches matmul kernels (minutes to compile). Compiled
blocks stay with the model; a decode without compile switches them back to eager, and a later one with
the same mode finds its code again.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import ArgumentError
from .wording import term

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# dynamic=True: one compiled code for every token count (docs/DESIGN.md §3.7).
DYNAMIC = True

CompileOption = Union[bool, str, None]


def compile_mode(option: CompileOption) -> Optional[str]:
    """The torch.compile mode an option asks for: None (eager) for False or None, "default" for True,
    else the mode named (one of MODES)."""
    if option is None or option is False:
        return None
    if option is True:
        return "default"
    if isinstance(option, str) and option in MODES:
        return option
    raise ArgumentError(f"{term.compile_takes} a torch.compile mode ({', '.join(MODES)}), not {option!r}.")


def compiled_blocks(model) -> list:
    """The network's repeated blocks: the unit of compilation."""
    return [*model.patch_blocks, *model.pixel_blocks]


def use_compiled_blocks(model, option: CompileOption = True, *, dynamic: Optional[bool] = DYNAMIC, backend=None):
    """Make the model's blocks run compiled in the option's mode (compile_mode), or eagerly for False;
    returns the model. The compiled wrapper of a block is made once per mode and kept on the block,
    so switching back and forth compiles nothing again. Blocks compiled by someone else are left alone.
    backend: a torch.compile backend instead of inductor's mode (tests: "eager" traces without code
    generation)."""
    mode = compile_mode(option)
    for block in compiled_blocks(model):
        ours = block.__dict__.setdefault("_pid_compiled", {})
        current = getattr(block, "_compiled_call_impl", None)
        if current is not None and current not in ours.values():
            continue  # compiled by the caller (block.compile()): theirs to manage
        if mode is None:
            block._compiled_call_impl = None
            continue
        key = (mode, dynamic, backend)
        if key not in ours:
            how = dict(backend=backend) if backend is not None else dict(mode=mode)
            ours[key] = torch.compile(block._call_impl, dynamic=dynamic, **how)
        block._compiled_call_impl = ours[key]
    return model


def is_compiled(model) -> bool:
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in compiled_blocks(model))
