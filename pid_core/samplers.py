"""Which sampler a decode runs, and every fact about the two samplers in one table (docs/DESIGN.md §7).

The 4-step students and the undistilled v1.5 teachers are the same network sampled two ways: the
student loop (sampling.py) and the teacher's guided DPM-Solver++ (teacher.py). Their defaults and
limits (steps, guidance, shift), their schedules and the canvases their loops keep live in `SAMPLERS`;
`resolve_sampler` turns a checkpoint and the user's settings into the `SamplerPlan` a decode runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .checks import whole_number
from .errors import ArgumentError
from .sampling import STUDENT_MAX_STEPS, student_schedule
from .teacher import check_shift, teacher_schedule, teacher_shift
from .variants import KINDS, STUDENT, TEACHER, kind_from_filename
from .wording import term


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: how it is run unless the user says otherwise (the reference's settings) and its limits."""

    kind: str  # variants.STUDENT or variants.TEACHER: the checkpoints it is made for
    default_steps: int
    max_steps: int
    default_cfg: float  # classifier-free guidance scale; 1.0 = none
    takes_guidance: bool  # cfg and a negative text apply
    draws_renoise: bool  # fresh noise between steps (the student); the teacher is an ODE solver
    state_canvases: int  # canvas-size fp32 images its loop keeps (the tile plan's memory model)
    schedule: Callable[[int, Optional[float]], torch.Tensor]  # (steps, shift) -> the times visited, ending at 0
    default_shift: Optional[Callable[[int, int], float]] = None  # (H, W) -> the schedule's shift for the output


SAMPLERS = {
    # The student loop keeps the state x and, while tiles run, the band of fused v (at most a canvas);
    # while re-noising, x0 and the fresh noise: two canvases.
    STUDENT: SamplerSpec(STUDENT, default_steps=4, max_steps=STUDENT_MAX_STEPS, default_cfg=1.0, takes_guidance=False,
                         draws_renoise=True, state_canvases=2, schedule=lambda steps, shift: student_schedule(steps)),
    # DPM-Solver++ keeps x, this step's x0 and the previous one: three canvases.
    TEACHER: SamplerSpec(TEACHER, default_steps=25, max_steps=100, default_cfg=5.0, takes_guidance=True,
                         draws_renoise=False, state_canvases=3, schedule=teacher_schedule, default_shift=teacher_shift),
}
# Steps at or below which an undistilled checkpoint without guidance is clearly under-sampled.
TEACHER_FEW_STEPS = 4


@dataclass(frozen=True)
class SamplerPlan:
    """How a decode samples, resolved: the sampler, its steps, guidance, shift and the times it visits."""

    kind: str  # variants.STUDENT or variants.TEACHER
    kind_source: str  # why: chosen, or what the checkpoint's name says
    steps: int
    cfg: float  # classifier-free guidance scale; 1.0 = none (always for the student)
    times: torch.Tensor  # float32 [steps + 1], from the first time down to 0
    shift: Optional[float] = None  # the teacher's flow-schedule shift (from the output size)

    @property
    def spec(self) -> SamplerSpec:
        return SAMPLERS[self.kind]

    @property
    def guided(self) -> bool:
        """Two network branches per step (conditional and unconditional text)."""
        return self.spec.takes_guidance and self.cfg != 1.0

    def describe(self) -> str:
        if self.kind == STUDENT:
            return f"student, {self.steps} steps"
        guidance = f"cfg {self.cfg:g}" if self.guided else "no guidance"
        return f"teacher (DPM-Solver++), {self.steps} steps, {guidance}, shift {self.shift:.3g}"


def checkpoint_kind(model) -> tuple[str, str]:
    """(STUDENT or TEACHER, why) for a loaded model: its variant, else the file name's cue, else a
    student (the weights cannot tell)."""
    if model.variant is not None:
        return model.variant.kind, f"the checkpoint is {model.variant.name}"
    path = model.checkpoint.path if getattr(model, "checkpoint", None) is not None else None
    if kind_from_filename(path) == TEACHER:
        return TEACHER, "the file name says undistilled"
    return STUDENT, "the file name does not say undistilled"


def _number(value, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ArgumentError(f"{name} must be a finite number of 0 or more (or not given, for the default); "
                            f"got {value!r}.")
    return float(value)


def resolve_sampler(
    model,
    output_hw: tuple[int, int],
    *,
    sampler: Optional[str] = "auto",
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    shift: Optional[float] = None,
) -> tuple[SamplerPlan, list[str]]:
    """The sampler of a decode and warnings about mismatched settings.

    sampler: "auto" (the checkpoint's kind), "student" or "teacher". steps: None or 0 for the kind's
    default. cfg: None for the kind's default; students take no guidance. shift: the teacher's schedule
    shift, None for the reference's value for the output size."""
    if sampler is not None and not isinstance(sampler, str):
        raise ArgumentError(f"sampler must be auto, {STUDENT} or {TEACHER}, got {sampler!r}.")
    name = (sampler or "auto").strip().lower()
    checkpoint, why = checkpoint_kind(model)
    if name == "auto":
        kind, source = checkpoint, why
    elif name in KINDS:
        kind, source = name, "chosen"
    else:
        raise ArgumentError(f"Unknown sampler {sampler!r}: choose auto, {STUDENT} or {TEACHER}.")
    spec = SAMPLERS[kind]
    if steps is not None and not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool)):
        steps = whole_number(steps, term.steps, 0, spec.max_steps, "0 gives the sampler's default.")  # 2.7 refused
    steps = int(steps) if steps else spec.default_steps
    if not 1 <= steps <= spec.max_steps:
        more = (f" Use {spec.default_steps} for the released quality; many guided steps are for the undistilled "
                f"checkpoints ({term.sampler_teacher})." if kind == STUDENT else f" The reference uses {spec.default_steps}.")
        raise ArgumentError(f"The {kind} sampler runs 1 to {spec.max_steps} steps; got {steps}.{more}")
    cfg_given = _number(cfg, term.cfg)
    shift_given = None if shift is None else check_shift(shift)
    cfg = spec.default_cfg if cfg_given is None else cfg_given
    label = model.variant.name if model.variant is not None else "this checkpoint"
    teacher = SAMPLERS[TEACHER]
    warnings = []
    if not spec.takes_guidance:
        if cfg != 1.0:
            warnings.append(f"{label} is sampled as a 4-step student, which takes no guidance: cfg {cfg:g} is "
                            "ignored. Guidance is for the undistilled checkpoints.")
        cfg = 1.0
        if checkpoint == TEACHER:
            warnings.append(f"{label} is an undistilled checkpoint ({why}), decoded here with the 4-step student "
                            "sampler and no guidance: expect a poor image. Use sampler auto or teacher "
                            f"({teacher.default_steps} steps, cfg {teacher.default_cfg:g}).")
    elif checkpoint == STUDENT:
        warnings.append(f"{label} is a 4-step student ({why}), decoded here with the teacher's DPM-Solver++ over "
                        f"{steps} steps" + (f" with cfg {cfg:g}" if cfg != 1.0 else "") + ": students are "
                        "distilled for 4 steps without guidance, so this costs more and does not improve them. "
                        "Use sampler auto, or load an undistilled checkpoint.")
    elif steps <= TEACHER_FEW_STEPS and cfg == 1.0:
        warnings.append(f"{label} is undistilled: {steps} steps without guidance under-sample it. Use about "
                        f"{teacher.default_steps} steps with cfg {teacher.default_cfg:g}, or the 4-step student "
                        "checkpoint for speed.")
    shift = None if spec.default_shift is None else (shift_given if shift_given is not None
                                                     else spec.default_shift(*output_hw))
    return SamplerPlan(kind, source, steps, cfg, spec.schedule(steps, shift), shift), warnings
