"""ComfyUI entry point of the PiD decoder pack (V3 node API).

ComfyUI imports this folder as a package and awaits `comfy_entrypoint()`. Nothing heavy happens at
import: no ComfyUI or torch import, no model build, no download. The nodes live in nodes/, the engine
in pid_core/ (pure torch, no ComfyUI); this file only wires them up. No NODE_CLASS_MAPPINGS here: a
module that defines it is loaded with the classic API instead.
"""

import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _register_pid_core():
    """Make this pack's engine importable as the top-level package `pid_core` (how the nodes and the
    command line import it), without putting the whole pack folder on sys.path."""
    own = os.path.join(_HERE, "pid_core")
    existing = sys.modules.get("pid_core")
    if existing is not None:
        where = os.path.dirname(os.path.abspath(getattr(existing, "__file__", "") or ""))
        if os.path.normcase(where) != os.path.normcase(own):
            logging.warning("PiD decoder: another 'pid_core' package is already loaded from %s; this pack "
                            "uses it instead of its own (%s).", where, own)
        return
    spec = importlib.util.spec_from_file_location("pid_core", os.path.join(own, "__init__.py"),
                                                  submodule_search_locations=[own])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pid_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("pid_core", None)
        raise


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    _register_pid_core()
    from .nodes.decode import PiDDecode
    from .nodes.early_stop import KSamplerEarlyStop
    from .nodes.encode_degrade import PiDEncodeDegrade
    from .nodes.loader import PiDLoader

    class PiDDecoderExtension(ComfyExtension):
        async def get_node_list(self):
            return [KSamplerEarlyStop, PiDLoader, PiDDecode, PiDEncodeDegrade]

    return PiDDecoderExtension()
