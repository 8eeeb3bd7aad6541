"""PiD Encode-Degrade: IMAGE -> VAE latent, forward-noised to sigma, for PiD Decode (4x upscale).

The reference's `from_clean` path: encode with the backbone's VAE (the encoder mean), then noise in
PiD's input space, (1 - s) z + s eps for flow formats and sqrt(1 - s^2) z + s eps for SDXL
(pid_core.latents.noise_latent). The LATENT holds raw VAE space like any LATENT, with pid_sigma and
pid_latent_format; an SDXL latent is stored in the Euler frame (what an SDXL sampler's state is),
which PiD Decode maps back to the same VP-frame latent exactly.
"""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..pid_core.latent_formats import LATENT_FORMATS, formats_for_vae, get_latent_format
from ..pid_core.latents import noise_latent, vp_to_euler
from .common import CATEGORY, LATENT_FORMAT_NAMES, NODE_ID_ENCODE_DEGRADE, NodeInputError, user_errors, write_pid_metadata


def resolve_vae_format(choice: str, vae) -> str:
    """The latent format of the VAE's latents: the choice, else the one its shape allows (a 3-D VAE gives
    5-D latents); several of the same shape (16-channel 2-D) ask the user."""
    if choice != "auto":
        return choice
    channels, video = int(getattr(vae, "latent_channels", 0)), int(getattr(vae, "latent_dim", 2)) == 3
    fits = formats_for_vae(channels, video, LATENT_FORMAT_NAMES)
    if len(fits) == 1:
        return fits[0].name
    if fits:
        which = " or ".join(f"'{f.name}' ({f.label})" for f in fits)
        raise NodeInputError(f"This {channels}-channel VAE can be that of {which}, which PiD normalizes "
                             f"differently: set latent_format to {' or '.join(repr(f.name) for f in fits)}.")
    known = ", ".join(LATENT_FORMATS[name].label for name in LATENT_FORMAT_NAMES)
    raise NodeInputError(f"A {channels}-channel VAE is not one PiD decodes ({known}). Connect the VAE of a "
                         "supported model, or set latent_format by hand.")


def check_image_size_for_vae(image, vae) -> None:
    """An image smaller than one latent cell of the VAE has no latent (the VAE's convolutions fail on it)."""
    factor = getattr(vae, "spacial_compression_encode", lambda: None)()
    height, width = image.shape[1:3]
    if isinstance(factor, int) and min(height, width) < factor:
        raise NodeInputError(
            f"The image is {width}x{height} px, smaller than one latent cell of this VAE ({factor}x{factor} px), so it "
            f"has no latent. Give an image of at least {factor}x{factor} px (PiD Decode then makes it 4x larger).")


class PiDEncodeDegrade(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID_ENCODE_DEGRADE,
            display_name="PiD Encode-Degrade",
            category=CATEGORY,
            search_aliases=["pid encode", "pid upscale image", "degrade latent", "noise latent"],
            description=(
                "Encodes an image with the backbone's VAE and adds noise at level sigma, so PiD Decode can "
                "upscale it 4x and re-create detail (the reference's from_clean path). sigma 0 keeps the latent clean."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The image to encode (cropped to the VAE's multiple)."),
                io.Vae.Input("vae", tooltip="The VAE of the model family PiD was made for (FLUX.1/Z-Image, FLUX.2, SD3, "
                                            "SDXL, Qwen-Image)."),
                io.Float.Input("sigma", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise level to add (PiD's degrade sigma): 0 clean; higher lets PiD re-create "
                                       "more detail. The v1.5 models were trained on 0..0.8."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The seed of the added noise, drawn on the CPU (as KSampler's): seeds that "
                                     "differ by a multiple of 2^32 give the same noise (torch keeps a seed's low 32 "
                                     "bits there)."),
                io.Combo.Input("latent_format", options=["auto", *LATENT_FORMAT_NAMES], default="auto",
                               tooltip="The VAE's model family. auto works for SDXL, FLUX.2 and Qwen-Image VAEs; a "
                                       "16-channel VAE needs 'flux' (FLUX.1, Z-Image) or 'sd3'."),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT",
                                      tooltip="The noised latent with pid_sigma and pid_latent_format: connect to PiD Decode.")],
        )

    @classmethod
    def execute(cls, image, vae, sigma, seed, latent_format) -> io.NodeOutput:
        fmt = resolve_vae_format(latent_format, vae)
        check_image_size_for_vae(image, vae)
        with user_errors():
            lf = get_latent_format(fmt)
            raw = vae.encode(image[:, :, :, :3])
            z = lf.to_pid(raw.float())
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
            z = noise_latent(z, float(sigma), noise.to(z.device), latent_format=fmt)
            stored_sigma = float(sigma)
            if lf.frame == "euler":
                z, stored_sigma = vp_to_euler(z, stored_sigma)
            samples = lf.from_pid(z)
            if raw.ndim == 5:
                samples = samples.unsqueeze(2)
        samples = samples.to(dtype=raw.dtype, device=raw.device)
        return io.NodeOutput(write_pid_metadata({}, samples, sigma=stored_sigma, latent_format=fmt))
