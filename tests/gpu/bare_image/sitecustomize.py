"""The GPU machine's bare Python, simulated in a full ComfyUI environment (the kit's CPU dry run).

Python imports this file at start-up when its folder is on PYTHONPATH. It hides every package of the
environment's site-packages that is not named in the lists of PID_GPU_IMAGE_PACKAGES (os.pathsep-
separated files): run.sh --dry-run names the GPU image's packages (gpu_image_packages.txt), what the kit
carries (wheels.txt: the environment's own copies stand in for the carried cp312 wheels, which another
Python cannot import) and same_in_image.txt. So ComfyUI, the pack and the tests can only use what the
GPU machine will have, and an import of anything else fails as it would there: ModuleNotFoundError.
"""

import importlib.machinery
import importlib.metadata
import os
import re
import site
import sys


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set:
    """The package names of the files in PID_GPU_IMAGE_PACKAGES (os.pathsep-separated; one name a line,
    `name==version` allowed, # comments)."""
    names = set()
    for path in filter(None, os.environ.get("PID_GPU_IMAGE_PACKAGES", "").split(os.pathsep)):
        with open(path) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line:
                    names.add(_normal(re.split(r"[=<>!~\[; ]", line)[0]))
    return names


class _BareImageFinder:
    """Refuses top-level modules that only site-packages distributions outside the image provide."""

    def __init__(self, allowed: set, site_dirs: list):
        self.allowed = allowed
        self.site_dirs = [os.path.realpath(d) + os.sep for d in site_dirs]
        self.owners = None  # top-level module -> distributions, read on first use

    def find_spec(self, name, path=None, target=None):
        if path is not None or name in sys.builtin_module_names:
            return None  # submodules follow their package; builtins are Python's
        spec = importlib.machinery.PathFinder.find_spec(name)
        origin = (spec.origin if spec is not None and spec.origin not in (None, "namespace") else
                  next(iter(spec.submodule_search_locations), None) if spec is not None and
                  spec.submodule_search_locations else None)
        if origin is None or not any(os.path.realpath(origin).startswith(d) for d in self.site_dirs):
            return None
        if self.owners is None:
            self.owners = importlib.metadata.packages_distributions()
        owners = {_normal(d) for d in self.owners.get(name, ())}
        if owners and not owners & self.allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: {', '.join(sorted(owners))} is not in the "
                                      "GPU image, and the kit does not carry it)", name=name)
        return None


if os.environ.get("PID_GPU_IMAGE_PACKAGES"):
    sys.meta_path.insert(0, _BareImageFinder(_allowed(), site.getsitepackages()))
