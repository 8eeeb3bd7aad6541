"""The engine computes what the reference computes, on every shared case."""

import pytest

from pid_core.commands import conformance, main
from conftest import ROOT, SHARED, reference_case_dirs


@pytest.mark.parametrize("case", reference_case_dirs() or [None], ids=lambda p: p.name if p else "none")
def test_reference_case(case):
    if case is None:
        pytest.skip("no shared reference cases beside the checkout")
    lines = []
    assert conformance.run_case(str(case), bf16=True, log=lines.append), "\n".join(lines)


def test_command_line_summary(shared_cases, capsys):
    code = main(["conformance", *[str(c) for c in shared_cases]])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"{len(shared_cases)} passed, 0 failed"
    assert code == 0


def test_the_module_launcher_runs_the_command(shared_cases):
    """`python -m pid_core.conformance` (what scripts call) is `python -m pid_core conformance`."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pid_core.conformance", str(shared_cases[0])], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"


def test_command_line_fails_on_a_broken_case(tmp_path, shared_cases, capsys):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shared_cases[0], broken)
    case = json.loads((broken / "case.json").read_text())
    case["tolerance"]["forward_max_abs"] = -1.0  # nothing can pass
    (broken / "case.json").write_text(json.dumps(case))
    assert main(["conformance", str(broken)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0 passed, 1 failed"


TEACHER_CASES = SHARED / "fixtures" / "teacher"


def teacher_case_dirs():
    return sorted(p for p in TEACHER_CASES.iterdir() if (p / "case.json").exists()) if TEACHER_CASES.is_dir() else []


@pytest.mark.parametrize("case", teacher_case_dirs() or [None], ids=lambda p: p.name if p else "none")
def test_shared_teacher_case(case):
    if case is None:
        pytest.skip("no shared teacher cases beside the checkout")
    lines = []
    assert conformance.run_case(str(case), bf16=True, log=lines.append), "\n".join(lines)
    text = "\n".join(lines)
    assert "two calls" in text and "batched" in text and "times" in text and "bf16" in text


# The kinds of teacher case the command must accept beyond the shared one (made here: tests/teacher_cases.py).
MADE_TEACHER_CASES = {
    "batch_sigma_cfg5_3steps": dict(steps=3, cfg=5.0, batch=2),
    "cfg1_2steps": dict(steps=2, cfg=1.0),
    "cfg5_1step": dict(steps=1, cfg=5.0),
    "cfg5_2steps": dict(steps=2, cfg=5.0, batch=2),
    "flux2_128ch": dict(steps=3, cfg=5.0, latent_channels=128, latent_hw=(1, 2)),
    "shift6_25steps": dict(steps=25, cfg=5.0, shift=6.0, latent_hw=(2, 2)),
}


@pytest.fixture(scope="module")
def made_teacher_cases(tmp_path_factory):
    from teacher_cases import write_teacher_case

    root = tmp_path_factory.mktemp("teacher_cases")
    return {name: write_teacher_case(root / name, seed=i, **kw) for i, (name, kw) in enumerate(MADE_TEACHER_CASES.items())}


@pytest.mark.parametrize("name", list(MADE_TEACHER_CASES))
def test_teacher_case_kinds(made_teacher_cases, name):
    lines = []
    assert conformance.run_case(str(made_teacher_cases[name]), log=lines.append), "\n".join(lines)
    compared = [line for line in lines if "tolerance" in line]
    guided = MADE_TEACHER_CASES[name]["cfg"] != 1.0
    assert len(compared) == (5 if guided else 3), "\n".join(lines)  # raw + out (per branch order) + times


def test_a_case_with_nothing_to_compare_fails(tmp_path, made_teacher_cases, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    case = tmp_path / "no_outputs"
    shutil.copytree(made_teacher_cases["cfg1_2steps"], case)
    io = load_file(str(case / "io.safetensors"))
    save_file({k: v for k, v in io.items() if not k.startswith("sample.")}, str(case / "io.safetensors"))
    assert main(["conformance", str(case)]) == 1
    out = capsys.readouterr().out
    assert "nothing compared" in out and out.strip().splitlines()[-1] == "0 passed, 1 failed"


def test_an_unknown_mode_fails(tmp_path, made_teacher_cases, capsys):
    import json
    import shutil

    case = tmp_path / "odd_mode"
    shutil.copytree(made_teacher_cases["cfg1_2steps"], case)
    spec = json.loads((case / "case.json").read_text())
    spec["mode"] = "distillation"
    (case / "case.json").write_text(json.dumps(spec))
    assert main(["conformance", str(case)]) == 1
    assert "unknown mode 'distillation'" in capsys.readouterr().out


def test_a_wrong_network_time_fails(tmp_path, made_teacher_cases):
    import json
    import shutil

    case = tmp_path / "times"
    shutil.copytree(made_teacher_cases["cfg5_2steps"], case)
    spec = json.loads((case / "case.json").read_text())
    spec["network_times"] = spec["network_times"][:-1]  # one call missing
    (case / "case.json").write_text(json.dumps(spec))
    lines = []
    assert not conformance.run_case(str(case), log=lines.append)
    assert any("3 network calls, the case has" in line or "4 network calls, the case has 3" in line for line in lines)
