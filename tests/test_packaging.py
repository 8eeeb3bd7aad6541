"""The pack as the Comfy Registry and ComfyUI-Manager take it: the archive `comfy node pack` builds (same
file rules, tests/comfy_registry_rules.py), pyproject.toml as `comfy node validate` and the Registry's
specification read it, and the licence."""

import ast
import hashlib
import pathlib
import re
import shutil
import zipfile

import pytest

import comfy_registry_rules as rules

ROOT = pathlib.Path(__file__).resolve().parents[1]
# sha256 of the Apache License 2.0 text (apache.org's LICENSE-2.0.txt, the file Debian ships as
# /usr/share/common-licenses/Apache-2.0), surrounding blank lines stripped
APACHE_2_SHA256 = "283ea6cc2997a1a70da0049e09adf9317bb60ca1b51279b65196b83a69e1996b"
# what a user reads or runs: the README's pictures (docs/*.png, linked from it) travel with it
USER_FILES = ["__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE", "docs/DESIGN.md",
              *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.png"))]
USER_FOLDERS = ("nodes/", "pid_core/", "workflows/")
# the ComfyUI CI tests (.ci/run, tests/comfyui/setup_comfyui.sh): the one version requires-comfyui names
CI_COMFYUI_ARCHIVE = re.compile(r"comfyui-v(\d+\.\d+\.\d+)\.tar\.gz")


@pytest.fixture(scope="module")
def packed():
    return rules.packed_files(ROOT)


def test_archive_holds_what_a_user_needs(packed):
    source = rules.git_tracked_files(ROOT) or packed
    for name in USER_FILES:
        assert name in packed, f"{name} is missing from the Registry archive"
    for folder in USER_FOLDERS:
        wanted = {f for f in source if f.startswith(folder) and "__pycache__/" not in f}
        assert wanted, f"no {folder} files found"
        assert wanted <= set(packed), f"left out of the archive: {sorted(wanted - set(packed))}"
    assert "pid_core/chi_prompt.txt" in packed  # a data file the engine reads, not only modules


def test_archive_leaves_out_tests_ci_and_local_files(packed):
    assert packed
    assert not [f for f in packed if f.startswith(("tests/", ".ci/"))]
    assert not [f for f in packed if any(part.startswith(".") for part in f.split("/"))]  # .git*, .venv, caches
    assert not [f for f in packed if "__pycache__" in f or f.endswith(".pyc")]
    assert set(packed) <= set(USER_FILES) | {f for f in packed if f.startswith(USER_FOLDERS)}


def test_archive_is_the_same_when_packed_outside_git(packed, tmp_path):
    """Outside a checkout comfy-cli packs every file but `.git/`: .comfyignore alone keeps environments,
    caches and outputs out."""
    tree = tmp_path / "pack"
    for name in rules.git_tracked_files(ROOT) or packed:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tree / name)
    shutil.copyfile(ROOT / ".comfyignore", tree / ".comfyignore")
    junk = [".git/HEAD", ".venv/bin/python", ".comfyui/ComfyUI/main.py", "pid_core/__pycache__/plan.cpython-311.pyc",
            "nodes/loader.pyc", ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.1/x", "out/pid_selftest.png",
            "node.zip", "comfyui_pid_decoder.egg-info/PKG-INFO", "tests/__pycache__/x.pyc", ".ci/log"]
    for name in junk:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    assert sorted(rules.packed_files(tree, use_git=False)) == sorted(packed)


def test_archive_imports_nothing_it_leaves_out(packed, tmp_path):
    """Every import of the pack's own code (relative, or of a top-level folder of the repository) finds its
    module inside the archive, so a left-out file cannot break the installed pack."""
    archive = tmp_path / "node.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:  # as comfy-cli writes it
        for name in packed:
            z.write(ROOT / name, name)
    with zipfile.ZipFile(archive) as z:
        members = set(z.namelist())
    assert members == set(packed)
    top_folders = {p.name for p in ROOT.iterdir() if p.is_dir()}

    def exists(dotted: str) -> bool:
        path = dotted.replace(".", "/")
        return f"{path}.py" in members or f"{path}/__init__.py" in members

    for name in [m for m in members if m.endswith(".py")]:
        package = name.split("/")[:-1]  # a module's package; the root __init__.py's is the pack itself
        for node in ast.walk(ast.parse((ROOT / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                candidates = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
                assert any(c and exists(c) for c in candidates), f"{name}: relative import of {base or node.names[0].name!r}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    if module.split(".")[0] in top_folders:
                        assert exists(module), f"{name}: import of {module!r}, which the archive leaves out"


def test_pyproject_passes_comfy_node_validate():
    assert rules.validate_problems(rules.pyproject(ROOT)) == []
    # its security check (ruff S102, S307, E702 on the whole folder; ruff skips .venv and the
    # pyproject's extend-exclude .comfyui, which git does not track either)
    found = [p for f in rules.git_tracked_files(ROOT) or rules.packed_files(ROOT) if f.endswith(".py")
             for p in rules.security_problems(ROOT / f)]
    assert found == []


def test_the_rules_find_what_they_look_for(tmp_path):
    """The reimplemented rules are not vacuous: each one fires on a case comfy-cli flags or skips."""
    bad = {"project": {"version": "", "license": 2, "dependencies": ["comfyui-frontend-package>=1.2"],
                       "classifiers": ["Operating System :: Plan9", "Environment :: GPU :: Voodoo"]},
           "tool": {"comfy": {"requires-comfyui": ">=0.33"}}}
    assert len(rules.validate_problems(bad)) == 6
    script = tmp_path / "s.py"
    script.write_text("import os; x = 1\nexec('y = 2')\nz = eval('3')\nw = 4;\n")
    assert len(rules.security_problems(script)) == 3
    ignored = {p: rules.pattern_regex(p) for p in ["/tests/", "__pycache__/", "*.pyc", "/node.zip"]}
    assert ignored["/tests/"].fullmatch("tests/test_plan.py") and not ignored["/tests/"].fullmatch("nodes/tests/a.py")
    assert ignored["__pycache__/"].fullmatch("a/b/__pycache__/c.pyc") and not ignored["__pycache__/"].fullmatch("__pycache__")
    assert ignored["*.pyc"].fullmatch("a/b.pyc") and not ignored["*.pyc"].fullmatch("a/b.pyc.txt")
    assert ignored["/node.zip"].fullmatch("node.zip") and not ignored["/node.zip"].fullmatch("a/node.zip")
    with pytest.raises(rules.Unsupported):
        rules.pattern_regex("!keep.py")


def test_pyproject_meets_the_registry_specification():
    """docs.comfy.org/registry/specifications: the node id, a three-part version, a repository, a publisher."""
    data = rules.pyproject(ROOT)
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy.get("includes", []) == []


def test_requires_comfyui_is_what_ci_tests():
    tested = set(CI_COMFYUI_ARCHIVE.findall((ROOT / ".ci" / "run").read_text()))
    tested |= set(CI_COMFYUI_ARCHIVE.findall((ROOT / "tests" / "comfyui" / "setup_comfyui.sh").read_text()))
    assert len(tested) == 1, f"CI names several ComfyUI versions: {tested}"
    assert rules.pyproject(ROOT)["tool"]["comfy"]["requires-comfyui"] == f">={tested.pop()}"


def test_requirements_txt_is_the_pyproject_dependencies():
    """The Manager installs requirements.txt; the Registry reads [project] dependencies: the same list."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    listed = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    assert listed == rules.pyproject(ROOT)["project"]["dependencies"]


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert hashlib.sha256(text.strip().encode()).hexdigest() == APACHE_2_SHA256
    assert rules.pyproject(ROOT)["project"]["license"] == {"text": "Apache-2.0"}
