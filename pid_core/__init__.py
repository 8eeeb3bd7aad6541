"""pid_core: a pure-torch engine for the PiD pixel-diffusion decoder (nv-tlabs/PiD).

Data flows one way: latent -> PiD input space (latents) -> network + student sampler -> pixels.
Nothing here imports ComfyUI.
"""
