"""python -m pid_core decode: one latent file to an image (under torchrun: its tiles shared by the ranks).

    python -m pid_core decode --checkpoint F --latent L.safetensors --text-embedding E --out out.png
    python -m pid_core decode --checkpoint UNDISTILLED --latent L --prompt P --text-encoder G [--cfg 5 --steps 25]
    torchrun --nproc-per-node 8 -m pid_core decode ...     (several GPUs: distributed.py)
"""

from __future__ import annotations

import time

from .. import distributed
from .options import (ProgressBar, TextEncoderOnDemand, add_decode_options, check_decode_arguments, flux2_bn_stats,
                      load_model, negative_embedding, peak_memory_text, plan_for, write_images)


@distributed.joins_torchrun
def cmd_decode(args) -> int:
    from ..checkpoint import describe
    from ..decode import encode_text, run_plan
    from ..files import load_latent_file, load_text_embedding
    from ..images import check_image_size

    device = check_decode_arguments(args)
    ranks = distributed.current()  # several under torchrun: they share the tile batches of this image
    started = time.perf_counter()
    latent, meta = load_latent_file(args.latent)
    model = load_model(args.checkpoint, device, args.dtype)
    encoder = TextEncoderOnDemand(args.text_encoder, device)
    if args.text_embedding:
        text = load_text_embedding(args.text_embedding)
    else:  # the other ranks take rank 0's embeddings, so every rank decodes the same inputs
        text = distributed.from_main(encode_text(args.prompt, encoder()) if ranks.is_main else None)

    def negative():
        return distributed.from_main(negative_embedding(args, encoder) if ranks.is_main else None)

    budget = distributed.smallest(distributed.memory_budget(device))  # the same tiles on every rank
    plan = plan_for(model, latent, meta, text, args, budget_bytes=budget, negative=negative,
                    bn_stats=flux2_bn_stats(args))
    check_image_size(args.out, *plan.output_hw)
    if ranks.several and not plan.tiles.tiled:
        distributed.say(f"note: one pass over the whole canvas, nothing to share: each of the {ranks.world_size} "
                        f"ranks runs it (give --tile, e.g. --tile 1024, to share tiles among them)")
    loaded = time.perf_counter()
    progress = ProgressBar(plan.sampler.steps) if ranks.is_main else None
    colour = {}
    image = run_plan(model, plan, seed=args.seed, compile=args.compile, callback=progress,
                     tile_callback=progress.tile if progress else None, batch_runner=distributed.tile_runner(),
                     on_colour=lambda before, after: colour.update(before=before, after=after))
    finished = time.perf_counter()
    if not ranks.is_main:
        return 0  # every rank holds the same image; rank 0 writes it
    outputs = write_images(image, args.out)
    said = plan.summary()
    if ranks.several:
        said["tiling"] += f"; tile batches shared by {ranks.world_size} ranks"
    said["output"] += f" -> {', '.join(outputs)}"
    print(f"checkpoint : {describe(model)}")
    for key in ("latent", "sampler", "tiling", "output"):
        print(f"{key:<11}: {said[key]}")
    if colour:
        print(f"colour     : {said['colour']}: {colour['before'].describe()} before, {colour['after'].describe()} "
              "after")
    print(f"time       : load {loaded - started:.1f}s, decode {finished - loaded:.1f}s ({plan.sampler.steps} steps, "
          f"{device.type})")
    print(f"peak memory: {peak_memory_text(device)}")
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("decode", help="decode a latent file to an image (under torchrun: its tiles shared by the ranks)")
    d.add_argument("--latent", required=True, help="latent: .safetensors / ComfyUI .latent / .pt / .npy")
    add_decode_options(d, text_required=True)
    d.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the network's blocks (compiled once, any size; pays off on a GPU); MODE: a "
                   "torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    d.add_argument("--out", required=True, help="output image: .png, or .jpg / .webp with Pillow (numbered name_00.png ... when the batch has several images)")
    d.set_defaults(func=cmd_decode)
