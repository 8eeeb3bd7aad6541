"""The engine computes what the reference computes, on every shared case."""

import pytest

from pid_core import conformance
from conftest import reference_case_dirs


@pytest.mark.parametrize("case", reference_case_dirs() or [None], ids=lambda p: p.name if p else "none")
def test_reference_case(case):
    if case is None:
        pytest.skip("no shared reference cases beside the checkout")
    lines = []
    assert conformance.run_case(str(case), bf16=True, log=lines.append), "\n".join(lines)


def test_command_line_summary(shared_cases, capsys):
    code = conformance.main([str(c) for c in shared_cases])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"{len(shared_cases)} passed, 0 failed"
    assert code == 0


def test_command_line_fails_on_a_broken_case(tmp_path, shared_cases, capsys):
    import json, shutil

    broken = tmp_path / "broken"
    shutil.copytree(shared_cases[0], broken)
    case = json.loads((broken / "case.json").read_text())
    case["tolerance"]["forward_max_abs"] = -1.0  # nothing can pass
    (broken / "case.json").write_text(json.dumps(case))
    assert conformance.main([str(broken)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0 passed, 1 failed"
