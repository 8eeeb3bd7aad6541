"""The pack as ComfyUI sees it: a light root package, node ids of its own, the engine imported relatively."""

import ast
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _constants(path: pathlib.Path) -> dict:
    """Module-level NAME = "literal" assignments of a file, read without importing it."""
    tree = ast.parse(path.read_text())
    return {s.targets[0].id: s.value.value for s in tree.body
            if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name) and isinstance(s.value, ast.Constant)}


def test_node_ids_are_distinct_and_not_core():
    common = _constants(ROOT / "nodes" / "common.py")
    ids = [v for k, v in common.items() if k.startswith("NODE_ID_")]
    assert len(ids) == len(set(ids)) >= 4
    assert "PiDConditioning" not in ids
    assert all(i.startswith("PixelDiffusionDecoder") for i in ids)


def test_pack_root_imports_without_comfyui(monkeypatch):
    """ComfyUI imports the folder as a package; outside ComfyUI that import must work and stay light."""
    name = "pid_pack_root_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert callable(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")


def test_pack_files_import_nothing_heavy_at_top_level():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    init = ast.parse((ROOT / "nodes" / "__init__.py").read_text())
    assert not [n for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_nodes_import_the_engine_relatively():
    """The nodes reach pid_core as part of this pack (`from ..pid_core`), so the pack never puts pid_core
    on sys.path or into sys.modules, and another pack's pid_core cannot shadow it."""
    for path in (ROOT / "nodes").glob("*.py"):
        tree = ast.parse(path.read_text())
        absolute = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
                    and (n.module or "").split(".")[0] == "pid_core"]
        absolute += [a for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                     if a.name.split(".")[0] == "pid_core"]
        assert not absolute, f"{path.name} imports pid_core absolutely"


def test_engine_never_imports_comfyui():
    comfy_modules = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "nodes", "latent_preview", "server"}
    for path in (ROOT / "pid_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not names & comfy_modules, f"{path.relative_to(ROOT)} imports {names & comfy_modules}"


# The module-level entry points that run a command (python -m pid_core, python -m pid_core.conformance, ...)
LAUNCHERS = {"__main__.py", "conformance.py", "bench.py"}


def test_the_library_never_imports_a_command():
    """pid_core's library modules (everything outside pid_core/commands and the launchers) import no command."""
    for path in (ROOT / "pid_core").rglob("*.py"):
        relative = path.relative_to(ROOT / "pid_core")
        if relative.parts[0] == "commands" or (len(relative.parts) == 1 and relative.name in LAUNCHERS):
            continue
        package = ["pid_core", *relative.parts[:-1]]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # `from ..commands import x` seen from package: pid_core.commands
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                imported |= {target} | {f"{target}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        commands = sorted(name for name in imported if name.startswith("pid_core.commands"))
        assert not commands, f"pid_core/{relative} imports {commands}"
    launchers = [(ROOT / "pid_core" / name).read_text() for name in sorted(LAUNCHERS)]
    assert all('if __name__ == "__main__":' in text or "sys.exit(main())" in text for text in launchers)
