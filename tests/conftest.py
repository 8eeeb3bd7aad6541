import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PID_SHARED", ROOT.parent / "shared"))
REFERENCE_CASES = SHARED / "fixtures" / "reference"
KEY_FILES = SHARED / "spec" / "keys"


def reference_case_dirs():
    if not REFERENCE_CASES.is_dir():
        return []
    return sorted(p for p in REFERENCE_CASES.iterdir() if (p / "case.json").exists())


@pytest.fixture
def shared_cases():
    cases = reference_case_dirs()
    if not cases:
        pytest.skip(f"no reference cases at {REFERENCE_CASES} (the shared/ folder beside the checkout)")
    return cases
