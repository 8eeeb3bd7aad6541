"""The Comfy Registry's packing and validation rules, as comfy-cli 1.23.0 applies them, so the packaging
tests need no comfy-cli (it is not a test requirement).

- `packed_files`: the files `comfy node pack` (and `comfy node publish`) put into the archive, from
  comfy_cli/file_utils.py `zip_files`: the output of `git ls-files` run in the pack's root, or, when git
  gives no answer, every file found by walking the folder except `.git/`; minus the paths matching a
  `.comfyignore` pattern (gitignore syntax, lines stripped, blank lines and `#` lines skipped).
  `.gitignore` plays no part of its own: it only keeps files out of `git ls-files`.
- `validate_problems`: what `comfy node validate` reports about pyproject.toml (comfy_cli/registry/
  config_parser.py `extract_node_configuration` and command/custom_nodes/command.py
  `validate_node_for_publishing`), each warning counted as a problem; `security_problems`: its ruff
  rules S102 (exec), S307 (eval) and E702 (statements joined by `;`).

Only the subset of these rules this pack uses is implemented; anything else (`[tool.comfy] includes`,
a dynamic version, gitignore patterns with `!`, `**`, `?`, `[...]` or `\\`) raises `Unsupported`, so a
change outside the subset fails the tests instead of being judged by rules that were never written.
"""

import ast
import os
import pathlib
import re
import subprocess
import tokenize


class Unsupported(Exception):
    """The pack uses a rule this reimplementation does not cover: extend it (from comfy-cli's source) first."""


# ---- comfy node pack -------------------------------------------------------------------------------

def ignore_patterns(root: pathlib.Path) -> list[str]:
    path = root / ".comfyignore"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A gitignore pattern as pathspec's "gitwildmatch" reads it, for the subset without `!`, `**`,
    `?`, `[...]` and `\\`: a pattern with no slash but a trailing one matches a name at any depth, one
    with a slash is anchored at the root, a trailing slash matches only what lies inside a folder,
    `*` matches within one path segment, and a match also covers everything below it."""
    if pattern.startswith("!") or any(c in pattern for c in "?[]\\") or "**" in pattern:
        raise Unsupported(f".comfyignore pattern {pattern!r}")
    dir_only = pattern.endswith("/")
    body = pattern.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        raise Unsupported(f".comfyignore pattern {pattern!r}")
    segments = "/".join(re.escape(s).replace(r"\*", "[^/]*") for s in body.split("/"))
    prefix = "" if anchored else "(?:.+/)?"
    suffix = "/.*" if dir_only else "(?:/.*)?"
    return re.compile(prefix + segments + suffix)


def git_tracked_files(root: pathlib.Path) -> list[str]:
    """`git -C root ls-files`, or [] when git is absent or answers with an error (not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def walked_files(root: pathlib.Path, ignored) -> list[str]:
    """comfy-cli's fallback outside git: walk everything but `.git/`, skipping ignored folders and files."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = pathlib.Path(folder).relative_to(root).as_posix()
        rel = (lambda name: name) if rel_folder == "." else (lambda name: f"{rel_folder}/{name}")
        if ".git" in dirs:
            dirs.remove(".git")
        dirs[:] = [d for d in dirs if not ignored(rel(d))]
        found += [rel(f) for f in files if not ignored(rel(f))]
    return found


def packed_files(root: pathlib.Path, use_git: bool = True) -> list[str]:
    """The archive's member names, in comfy-cli's order (`use_git=False`: as packed outside a checkout)."""
    regexes = [pattern_regex(p) for p in ignore_patterns(root)]

    def ignored(rel_path: str) -> bool:
        return any(r.fullmatch(rel_path) for r in regexes)

    if includes(root):
        raise Unsupported("[tool.comfy] includes (comfy-cli adds those folders' files after the git files)")
    tracked = git_tracked_files(root) if use_git else []
    if not tracked:
        return walked_files(root, ignored)
    return [f for f in tracked if not ignored(f) and (root / f).exists()]


def includes(root: pathlib.Path) -> list:
    return pyproject(root).get("tool", {}).get("comfy", {}).get("includes", [])


def pyproject(root: pathlib.Path) -> dict:
    import tomllib  # Python 3.11+; comfy-cli reads the file with tomlkit, which parses the same TOML

    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ---- comfy node validate ---------------------------------------------------------------------------

# config_parser.validate_version: each comma-separated part is [operator]major.minor.patch[-suffix]
VERSION_SPEC = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}


def validate_problems(data: dict) -> list[str]:
    """The errors and warnings `comfy node validate` prints for this pyproject.toml content."""
    problems = []
    project = data.get("project", {})
    if not isinstance(project, dict):
        return ["[project] must be a table"]
    if "version" in project.get("dynamic", []) or "version" not in project:
        raise Unsupported("a dynamic [project] version ([tool.comfy.version].path)")
    if not isinstance(project["version"], str) or not project["version"].strip():
        problems.append("project version is empty")
    comfy = data.get("tool", {}).get("comfy", {})
    specs = {"requires-comfyui": comfy.get("requires-comfyui", "")}
    for dep in project.get("dependencies", []):
        if dep.startswith("comfyui-frontend-package"):
            specs["comfyui-frontend-package"] = dep.removeprefix("comfyui-frontend-package")
    for field, spec in specs.items():
        if spec and not all(VERSION_SPEC.match(part.strip()) for part in spec.split(",")):
            problems.append(f"invalid {field} format: {spec!r}")
    classifiers = project.get("classifiers", [])
    for c in classifiers:
        if c.startswith("Operating System :: ") and not c.removeprefix("Operating System :: ").startswith(OS_PREFIXES):
            problems.append(f"invalid Operating System classifier {c!r}")
        if c.startswith("Environment ::") and c.removeprefix("Environment :: ") not in ACCELERATORS:
            problems.append(f"invalid Environment classifier {c!r}")
    license_ = project.get("license", {})
    if not isinstance(license_, str) and not (isinstance(license_, dict) and ({"file", "text"} & license_.keys())):
        problems.append('license must be "NAME", {file = "..."} or {text = "..."}')
    return problems


def security_problems(path: pathlib.Path) -> list[str]:
    """ruff S102 (a call of exec), S307 (a call of eval) and E702 (two statements on a line, joined by `;`)."""
    source = path.read_text(encoding="utf-8")
    found = [f"{path}:{n.lineno}: {n.func.id}()" for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("exec", "eval")]
    with open(path, "rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    ends = (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER)
    found += [f"{path}:{t.start[0]}: statements joined by ';'" for t, after in zip(tokens, tokens[1:])
              if t.type == tokenize.OP and t.string == ";" and after.type not in ends]
    return found
