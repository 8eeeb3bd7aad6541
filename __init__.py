"""ComfyUI entry point of the PiD decoder pack (V3 node API).

ComfyUI imports this folder as a package and awaits `comfy_entrypoint()`. Nothing heavy happens at
import: no ComfyUI or torch import, no model build, no download. The nodes live in nodes/ and import the
engine, pid_core/ (pure torch, no ComfyUI), relatively as part of this package; this file only lists them.
No NODE_CLASS_MAPPINGS here: a module that defines it is loaded with the classic API instead.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes.decode import PiDDecode
    from .nodes.early_stop import KSamplerEarlyStop
    from .nodes.encode_degrade import PiDEncodeDegrade
    from .nodes.loader import PiDLoader
    from .nodes.text_encode import PiDTextEncode

    class PiDDecoderExtension(ComfyExtension):
        async def get_node_list(self):
            return [KSamplerEarlyStop, PiDLoader, PiDTextEncode, PiDDecode, PiDEncodeDegrade]

    return PiDDecoderExtension()
