"""The samplers as data, and the sampler of a decode: the checkpoint decides unless chosen; steps,
guidance and shift from the table; mismatched settings warn; limits refuse."""

import pytest
import torch

from pid_core.checkpoint import CheckpointInfo
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.errors import PidError
from pid_core.samplers import SAMPLERS, resolve_sampler
from pid_core.sampling import student_schedule
from pid_core.teacher import teacher_schedule
from pid_core.variants import STUDENT, TEACHER, UNDISTILLED_VARIANTS


@pytest.fixture(scope="module")
def model():
    return random_model(narrow_config(layout="v1", latent_channels=16, text_dim=32, text_tokens=12))


def _named(model, path, variant=None):
    """The same random network under another file name (the weights cannot tell a teacher)."""
    clone = random_model(model.config)
    clone.variant = variant
    clone.checkpoint = CheckpointInfo(path=path, key_layout="test", file_dtype=torch.float32)
    return clone


@pytest.fixture(scope="module")
def teacher_model():
    cfg = narrow_config(layout="v1.5", latent_channels=16, text_dim=32, text_tokens=12)
    return _named(random_model(cfg), "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled/model_ema_bf16.pth",
                  UNDISTILLED_VARIANTS["flux-2kto4k-v1.5-undistilled"])


def test_the_table():
    student, teacher = SAMPLERS[STUDENT], SAMPLERS[TEACHER]
    assert (student.default_steps, student.max_steps, student.default_cfg, student.state_canvases) == (4, 4, 1.0, 2)
    assert (teacher.default_steps, teacher.max_steps, teacher.default_cfg, teacher.state_canvases) == (25, 100, 5.0, 3)
    assert student.draws_renoise and not teacher.draws_renoise
    assert torch.equal(student.schedule(2, None), student_schedule(2))
    assert torch.equal(teacher.schedule(25, 6.0), teacher_schedule(25, 6.0))
    assert teacher.default_shift(2048, 2048) == pytest.approx(6.0) and student.default_shift is None


def test_the_plan_carries_the_times(model, teacher_model):
    assert torch.equal(resolve_sampler(model, (64, 64), steps=3)[0].times, student_schedule(3))
    plan = resolve_sampler(teacher_model, (2048, 2048), steps=7)[0]
    assert torch.equal(plan.times, teacher_schedule(7, 6.0))


def test_sampler_follows_the_checkpoint_unless_chosen(model, teacher_model):
    student, warnings = resolve_sampler(model, (2048, 2048))
    assert (student.kind, student.steps, student.cfg, student.shift, warnings) == ("student", 4, 1.0, None, [])
    teacher, warnings = resolve_sampler(teacher_model, (2048, 2048))
    assert (teacher.kind, teacher.steps, teacher.cfg, warnings) == ("teacher", 25, 5.0, [])
    assert teacher.shift == pytest.approx(6.0) and teacher.guided
    assert "flux-2kto4k-v1.5-undistilled" in teacher.kind_source
    assert resolve_sampler(teacher_model, (4096, 4096))[0].shift == pytest.approx(8.485, abs=1e-3)
    given = resolve_sampler(teacher_model, (64, 64), steps=30, cfg=3.5, shift=2.0)[0]
    assert (given.steps, given.cfg, given.shift) == (30, 3.5, 2.0)
    assert not resolve_sampler(teacher_model, (64, 64), cfg=1.0)[0].guided
    # a renamed teacher file: the name's cue; the override wins over both
    renamed = _named(model, "/models/pid/my_flux_undistilled.pth")
    assert resolve_sampler(renamed, (64, 64))[0].kind == "teacher"
    assert resolve_sampler(renamed, (64, 64), sampler="student")[0].kind == "student"
    chosen = resolve_sampler(model, (64, 64), sampler="teacher")[0]
    assert (chosen.kind, chosen.kind_source) == ("teacher", "chosen")


def test_mismatched_settings_warn_clearly(model, teacher_model):
    _, warnings = resolve_sampler(model, (64, 64), sampler="teacher", steps=25, cfg=5.0)
    assert len(warnings) == 1 and "4-step student" in warnings[0] and "does not improve" in warnings[0]
    plan, warnings = resolve_sampler(model, (64, 64), cfg=5.0)
    assert plan.cfg == 1.0 and "cfg 5 is ignored" in warnings[0]
    _, warnings = resolve_sampler(teacher_model, (64, 64), sampler="student")
    assert "undistilled" in warnings[0] and "poor image" in warnings[0]
    _, warnings = resolve_sampler(teacher_model, (64, 64), steps=4, cfg=1.0)
    assert "under-sample" in warnings[0] and "25 steps" in warnings[0]
    assert resolve_sampler(teacher_model, (64, 64), steps=4)[1] == []  # 4 guided steps: the user's choice


def test_steps_and_cfg_are_checked_per_sampler(model, teacher_model):
    with pytest.raises(PidError, match="student sampler runs 1 to 4 steps; got 25.*undistilled"):
        resolve_sampler(model, (64, 64), steps=25)
    with pytest.raises(PidError, match="teacher sampler runs 1 to 100 steps; got 101"):
        resolve_sampler(teacher_model, (64, 64), steps=101)
    with pytest.raises(PidError, match="Unknown sampler 'fast'"):
        resolve_sampler(model, (64, 64), sampler="fast")
    auto = resolve_sampler(teacher_model, (64, 64), steps=0, cfg=None)[0]  # the nodes' "auto" (they pass None)
    assert (auto.steps, auto.cfg) == (25, 5.0)
    for bad in (-1, -0.5, float("nan"), True, "5"):
        with pytest.raises(PidError, match="cfg must be a finite number of 0 or more"):
            resolve_sampler(teacher_model, (64, 64), cfg=bad)
    with pytest.raises(PidError, match="shift must be a number above 0"):
        resolve_sampler(teacher_model, (64, 64), shift=0)


