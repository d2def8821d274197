"""`cm-diffusers convert-openai`: OpenAI's original consistency-model checkpoints -> diffusers safetensors folders."""

from ..convert_openai import KINDS, OPENAI_CHECKPOINTS, UNET_CONFIGS


def register(subparsers):
    parser = subparsers.add_parser(
        "convert-openai",
        help="Convert an OpenAI consistency_models checkpoint (cd_*.pt, ct_*.pt, edm_*_ema.pt) to a diffusers folder.",
        description="Consistency models (cd_*, ct_*) become ConsistencyPipeline folders with a model card; EDM "
        "teachers (edm_*_ema.pt) become teacher folders for distillation. Known files: "
        f"{', '.join(OPENAI_CHECKPOINTS)}.",
    )
    parser.add_argument("--checkpoint", required=True, help="The OpenAI .pt file (read with weights_only=True).")
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument(
        "--config",
        default="auto",
        choices=["auto"] + sorted(UNET_CONFIGS),
        help="UNet layout: imagenet64, lsun256, or auto (read from the checkpoint's keys and shapes).",
    )
    parser.add_argument("--kind", choices=KINDS, help="cd, ct or edm; by default read from the file name.")
    parser.add_argument("--sample_size", type=int, help="Image size, for layouts other than OpenAI's released ones.")
    parser.add_argument("--attention_head_dim", type=int, default=64, help="OpenAI's --num_head_channels (64).")
    parser.add_argument(
        "--num_train_timesteps",
        type=int,
        help="Training grid size N (default OpenAI's: 40 for CD, 201 for ImageNet-64 CT, 151 for LSUN-256 CT).",
    )
    parser.add_argument("--no_card", action="store_true", help="Do not write a model card.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..convert_openai import convert_openai_checkpoint

    output = convert_openai_checkpoint(
        args.checkpoint,
        args.output,
        config=args.config,
        kind=args.kind,
        sample_size=args.sample_size,
        attention_head_dim=args.attention_head_dim,
        num_train_timesteps=args.num_train_timesteps,
        write_card=not args.no_card,
    )
    print(f"Wrote {output}")
    return 0
