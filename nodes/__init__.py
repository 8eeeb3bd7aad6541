"""ComfyUI nodes of the PiD decoder pack: one small file per node, ComfyUI glue only.

This package imports nothing from ComfyUI itself, so `nodes._common` (the node logic that needs no
ComfyUI) can be tested anywhere; the node modules import ComfyUI and are loaded by the pack's entry
point (../__init__.py).
"""
