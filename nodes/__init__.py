"""ComfyUI nodes of the PiD decoder pack: one small file per node, ComfyUI glue only.

They translate ComfyUI objects (LATENT, CONDITIONING, MODEL, VAE, IMAGE) into calls of the engine
(../pid_core, imported relatively as part of this pack) and use ComfyUI's own machinery for memory,
progress and cancel. common.py holds what the nodes share, comfy_models.py what ComfyUI's model classes
mean for PiD. Loaded by the pack's entry point (../__init__.py), inside ComfyUI only.
"""
