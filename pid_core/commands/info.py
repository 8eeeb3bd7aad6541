"""python -m pid_core info CHECKPOINT: what a checkpoint file is."""

from __future__ import annotations

def cmd_info(args) -> int:
    from ..checkpoint import describe, load_pid

    model = load_pid(args.checkpoint)
    cfg = model.config
    print(describe(model))
    print(f"key layout : {model.checkpoint.key_layout}")
    print(f"weights    : {str(model.checkpoint.file_dtype).replace('torch.', '')}, all finite")
    print(f"network    : {cfg.patch_depth} patch blocks x {cfg.hidden_size}, {cfg.pixel_depth} pixel blocks, text {cfg.text_max_tokens}x{cfg.text_dim}")
    if model.variant is not None:
        v = model.variant
        print(f"variant    : {v.name} ({v.label}); backbones {', '.join(v.backbones)}; latent format {v.latent_format}")
    return 0


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="show what a checkpoint file is")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_info)
