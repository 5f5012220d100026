"""Generate the toolkit's built-in data: synthetic BAPPS, the `shapes` dataset and a tiny CLIP.

Everything the demo and the tests need offline, written in the layouts the real data uses, so
every stage runs on it unchanged:

    python generate_data.py bapps <OUT> [--num_train 64 --num_val 32 --num_jnd 32 --img_size 256]
    python generate_data.py shapes <OUT> [--num_images 2000 --img_size 64 --format parquet|folder]
    python generate_data.py tiny_clip <OUT> [--hidden_size 64 --layers 2 --vision_image_size 32]
    python generate_data.py inception <OUT.pth> [--seed 0]

`bapps` writes 2afc/{train,val}/<category>/{ref,p0,p1,judge} and jnd/val/<category>/{p0,p1,same}
with distortions of known strength; `shapes` writes img2dataset-layout parquet shards (the input
of prep_cc.py) or an image folder with .txt captions; `tiny_clip` writes a random-init CLIP text
model (with --vision_image_size a whole CLIPModel) with a real CLIPTokenizer whose vocabulary
covers the shapes captions (a stand-in for openai/clip-vit-large-patch14 when there is no network);
`inception` writes random Inception-v3 weights for evaluate_ldm.py's FID/KID offline.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from modules.cli import run_main
from modules.cli import positive_int, setup_logging


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)

    bapps = sub.add_parser("bapps", help="a BAPPS-layout tree with synthetic distortions and judgements")
    bapps.add_argument("out")
    bapps.add_argument("--num_train", type=positive_int, default=64, help="triplets per train category")
    bapps.add_argument("--num_val", type=positive_int, default=32, help="triplets per val category")
    bapps.add_argument("--num_jnd", type=int, default=32, help="pairs per jnd category (0: no jnd/)")
    bapps.add_argument("--img_size", type=positive_int, default=256)
    bapps.add_argument("--seed", type=int, default=0)

    shapes = sub.add_parser("shapes", help="the captioned shapes dataset")
    shapes.add_argument("out")
    shapes.add_argument("--num_images", type=positive_int, default=2000)
    shapes.add_argument("--img_size", type=positive_int, default=64)
    shapes.add_argument("--format", choices=("parquet", "folder"), default="parquet",
                        help="img2dataset parquet shards (prep_cc.py input) or PNG + .txt folder")
    shapes.add_argument("--shard_size", type=positive_int, default=10000, help="rows per parquet shard")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--overwrite", action="store_true", help="replace shards/images already in OUT")

    clip = sub.add_parser("tiny_clip", help="a tiny random-init CLIP text model + real tokenizer")
    clip.add_argument("out")
    clip.add_argument("--hidden_size", type=positive_int, default=64)
    clip.add_argument("--layers", type=positive_int, default=2)
    clip.add_argument("--heads", type=positive_int, default=2)
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--vision_image_size", type=positive_int, default=None,
                      help="also a vision tower for this image size: a whole CLIPModel (for the CLIP score)")

    inception = sub.add_parser("inception", help="random Inception-v3 weights (offline stand-in for FID/KID)")
    inception.add_argument("out", help="a .pth file for evaluate_ldm.py --inception_weights")
    inception.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def shapes_vocabulary() -> list:
    """Every caption word of the shapes dataset (so each is one token of the tiny tokenizer)."""
    from modules.shapes import CAPTION_TEMPLATE, COLOR_NAMES, SHAPE_NAMES

    words = CAPTION_TEMPLATE.format(color="", shape="", background="").split()
    return sorted(set(words) | set(COLOR_NAMES) | set(SHAPE_NAMES))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    setup_logging(True)
    if args.what == "bapps":
        from modules.bapps import write_synthetic_bapps

        samples = write_synthetic_bapps(args.out, args.num_train, args.num_val, args.num_jnd, args.img_size, args.seed)
        print(f"wrote {len(samples)} synthetic BAPPS samples to {args.out}")
    elif args.what == "shapes":
        from modules.shapes import write_shapes_folder, write_shapes_parquet

        if args.format == "parquet":
            write_shapes_parquet(args.out, args.num_images, args.img_size, args.seed, shard_size=args.shard_size,
                                 overwrite=args.overwrite)
        else:
            write_shapes_folder(args.out, args.num_images, args.img_size, args.seed, overwrite=args.overwrite)
        print(f"wrote {args.num_images} shapes images ({args.format}) to {args.out}")
    elif args.what == "inception":
        from modules.scores import write_random_inception

        write_random_inception(args.out, args.seed)
        print(f"wrote random Inception-v3 weights (seed {args.seed}) to {args.out}: FID/KID with them compare "
              "runs scored with this file, not published numbers")
    else:
        from modules.text_encoder import build_tiny_clip

        build_tiny_clip(args.out, shapes_vocabulary(), hidden_size=args.hidden_size, layers=args.layers,
                        heads=args.heads, seed=args.seed, vision_image_size=args.vision_image_size)
        print(f"wrote a tiny CLIP {'model' if args.vision_image_size else 'text model'} and tokenizer to {args.out}")


if __name__ == "__main__":
    run_main(main)
