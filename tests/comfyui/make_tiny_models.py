"""Write tiny random models that ComfyUI's stock loaders accept (run with ComfyUI's Python).

    python make_tiny_models.py COMFYUI_PATH FLUX_OUT VAE_OUT SDXL_UNET_OUT SDXL_VAE_OUT GEMMA_OUT

* FLUX.1 [dev]-style diffusion model for UNETLoader: hidden 128 (one 128-wide head: ComfyUI fixes
  axes_dim at [16, 56, 56]), 1 double + 1 single block, text width 2304 (so the same synthetic
  Gemma-shaped conditioning feeds it and PiD), guidance embedding, no pooled vector.
* FLUX.1-style 16-channel autoencoder for VAELoader. ComfyUI builds the encoder at the stock width
  (ch 128) and reads only the decoder width (here 32, the least GroupNorm(32) allows) from `decoder.conv_in.weight`, so the decoder is narrow.
* SDXL-family UNet for UNETLoader, an EPS model: ComfyUI matches SDXL-family configs by exact fields
  (model_channels 320, context 2048, ADM input 2816, transformer depths per input block), so the
  smallest one it accepts is the KOALA-700M layout ([0, 2, 5]; its config class derives from SDXL,
  latent format SDXL). Here it is one level wide (channel_mult [1], 3 input blocks), no middle block and
  no transformers on the way up: 50 M parameters instead of 700 M, stored in fp16.
* SDXL-style 4-channel autoencoder (with quant_conv / post_quant_conv, as the SDXL VAE), narrow decoder.
* A narrow Gemma-2 (hidden 64, 3 layers: core's lumina2 CLIP needs more than 2; Gemma's head width 256)
  in the layout of ComfyUI's Gemma file: Hugging Face key names and the SentencePiece tokenizer as a
  uint8 "spiece_model" tensor. The tokenizer is trained here on the CHI prompt and a few captions, with
  Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and byte fallback, so any text tokenizes. Core's
  CLIPLoader fixes Gemma's full size, so a test node loads it through core's loader with the sizes
  overridden (support_nodes: PiDTestTinyGemmaCLIP).

Shapes come from ComfyUI's own modules (built on the meta device); values are random but tame
(norm scales 1, biases 0, weights ~ N(0, 1/fan_in)), so every path stays finite.
"""

import math
import sys


def random_like(shapes, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".scale") or (name.endswith(".weight") and len(shape) == 1):
            t = torch.ones(shape)
        elif name.endswith(".bias") or len(shape) == 0:
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        out[name] = t.contiguous()
    return out


def autoencoder_shapes(z_channels, *, quant_convs=False):
    """Encoder at the stock width, decoder 32 wide; quant_conv/post_quant_conv as in SD/SDXL VAEs."""
    import torch

    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = dict(double_z=True, z_channels=z_channels, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        encoder = Encoder(**ddconfig)
        decoder = Decoder(**dict(ddconfig, ch=32))
    shapes = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    shapes.update({f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()})
    if quant_convs:
        shapes.update({"quant_conv.weight": (2 * z_channels, 2 * z_channels, 1, 1), "quant_conv.bias": (2 * z_channels,),
                       "post_quant_conv.weight": (z_channels, z_channels, 1, 1), "post_quant_conv.bias": (z_channels,)})
    return shapes


def sdxl_family_unet():
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    depth = [0, 2, 5]  # KOALA-700M's transformer depth per input block
    with torch.device("meta"):
        return UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[len(depth)],
            channel_mult=[1], num_classes="sequential", adm_in_channels=2816, num_head_channels=64,
            use_spatial_transformer=True, transformer_depth=depth, transformer_depth_output=[0] * (len(depth) + 1),
            transformer_depth_middle=-2, context_dim=2048, use_linear_in_transformer=True, legacy=False,
            operations=comfy.ops.disable_weight_init,
        )


TINY_GEMMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1)


def make_tiny_gemma(out):
    import io
    import pathlib

    import sentencepiece
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    repo = pathlib.Path(__file__).resolve().parents[2]
    chi = (repo / "pid_core" / "chi_prompt.txt").read_bytes().decode("utf-8")
    lines = chi.splitlines() + [
        "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, low res",
        "Aerial photograph of a winding mountain road through an autumn forest, a red fox in the snow",
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    )
    proto = model.getvalue()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()
    config = Gemma2Config(vocab_size=vocab, head_dim=256, query_pre_attn_scalar=256, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2, **TINY_GEMMA)
    torch.manual_seed(0)
    gemma = Gemma2Model(config).eval()
    sd = {}
    g = torch.Generator().manual_seed(1)
    for name, value in gemma.state_dict().items():
        if "norm" in name:  # Gemma applies norms as (1 + w): make w matter
            value = 0.1 * torch.randn(value.shape, generator=g)
        sd[f"model.{name}"] = value.float().contiguous()
    sd["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    save_file(sd, out)


def main(comfy_path, flux_out, vae_out, sdxl_unet_out, sdxl_vae_out, gemma_out):
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    import comfy.ldm.flux.model
    import comfy.ops

    with torch.device("meta"):
        flux = comfy.ldm.flux.model.Flux(
            image_model="flux", operations=comfy.ops.disable_weight_init,
            in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=2304, hidden_size=128,
            mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
            theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
        )
    shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    save_file(random_like(shapes, 0), flux_out)
    save_file({k: v.to(torch.float16) for k, v in random_like(autoencoder_shapes(16), 1).items()}, vae_out)

    shapes = {k: tuple(v.shape) for k, v in sdxl_family_unet().state_dict().items()}
    save_file({k: v.to(torch.float16) for k, v in random_like(shapes, 2).items()}, sdxl_unet_out)
    save_file({k: v.to(torch.float16) for k, v in random_like(autoencoder_shapes(4, quant_convs=True), 3).items()},
              sdxl_vae_out)
    make_tiny_gemma(gemma_out)


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:7])
