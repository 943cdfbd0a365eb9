"""Pack a few-shot dataset into WebDataset shards, verify a pack, or download raw archives.

    python launch/pack.py glyphs --out shards/glyphs
    python launch/pack.py download omniglot --to data/omniglot
    python launch/pack.py omniglot-nolatin --src data/omniglot --out shards/omniglot_nolatin
    python launch/pack.py verify shards/omniglot_nolatin --full
"""

from __future__ import annotations

import argparse

from hmaml.data.download import REGISTRY, download
from hmaml.data.pack import DEFAULT_SHARD_BYTES, pack_dataset, verify_pack
from hmaml.data.sources import DATASETS
from hmaml.errors import HmamlError, one_line_errors

_HELP = {
    "folder": "a folder of class folders (your own data)",
    "omniglot": "Omniglot, images_background + images_evaluation (zips or folders)",
    "omniglot-nolatin": "Omniglot without the Latin alphabet, one train split (1597 classes)",
    "emnist": "EMNIST as HyperMAML uses it (emnist.zip): even ids val, odd ids test",
    "cub": "CUB-200-2011 (CUB_200_2011.tgz or its unpacked folder)",
    "mini-imagenet": "mini-ImageNet images + Ravi & Larochelle csv splits",
    "glyphs": "synthetic Omniglot-like characters (no download)",
}


def _class_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected train,val,test counts, got {text!r}") from exc


def _add_dataset_options(parser: argparse.ArgumentParser, dataset: str) -> None:
    if dataset != "glyphs":
        parser.add_argument("--src", required=True, help="the raw data (see the README)")
    parser.add_argument("--out", required=True, help="pack folder, e.g. shards/<name>")
    parser.add_argument("--force", action="store_true", help="replace a different pack at --out")
    parser.add_argument("--workers", type=int, default=None,
                        help="image decoding processes (default: min(2, CPUs))")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                        help="target shard size in MiB (default: %(default)s)")
    parser.add_argument("--min-images", type=int, default=2,
                        help="refuse classes with fewer images (default: %(default)s)")
    parser.add_argument("--drop-small", action="store_true",
                        help="drop (and list) classes below --min-images instead of refusing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if dataset == "folder":
        parser.add_argument("--split-file", help="lines 'split<TAB or comma>class'")
        parser.add_argument("--split-rule", help="e.g. ratio:0.6,0.2,0.2 over sorted classes")
        parser.add_argument("--seed", type=int, help="shuffle seed of --split-rule (default 0)")
        parser.add_argument("--size", type=int, help="image side in pixels (default 84)")
        parser.add_argument("--channels", type=int, choices=(1, 3),
                            help="1 grey (characters pipeline) or 3 RGB (natural pipeline)")
    if dataset in ("folder", "cub", "mini-imagenet"):
        parser.add_argument("--store-size", type=int,
                            help="side the RGB images are stored at, >= the input size (default "
                                 "1.5 x the input size: 126 px for 84), so training crops come "
                                 "from real pixels")
    elif dataset == "omniglot":
        parser.add_argument("--split", choices=("background", "vinyals"),
                            help="background: train=background set, test=evaluation set "
                                 "(default); vinyals: train/val/test lists of --split-dir")
        parser.add_argument("--rotations", action="store_true",
                            help="add 90/180/270-degree rotations as new classes (background)")
        parser.add_argument("--split-dir", help="folder with Vinyals train/val/test.txt")
    elif dataset == "mini-imagenet":
        parser.add_argument("--split-dir", help="folder with train/val/test.csv (default: --src)")
    elif dataset == "glyphs":
        parser.add_argument("--classes", type=_class_counts,
                            help="train,val,test class counts (default 1000,200,200)")
        parser.add_argument("--per-class", type=int, help="images per class (default 20)")
        parser.add_argument("--seed", type=int, help="generator seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmaml pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for dataset in DATASETS:
        _add_dataset_options(sub.add_parser(dataset, help=_HELP[dataset]), dataset)
    verify = sub.add_parser("verify", help="check a pack's shards against its manifest")
    verify.add_argument("pack_dir")
    verify.add_argument("--split", help="only this split")
    verify.add_argument("--full", action="store_true", help="compare sha256, not only sizes")
    fetch = sub.add_parser("download", help="fetch public raw archives (with checksums)")
    fetch.add_argument("name", choices=sorted(REGISTRY))
    fetch.add_argument("--to", required=True, help="folder to download into")
    fetch.add_argument("--base-url", help="mirror replacing scheme and host of every URL "
                                          "(default: $HMAML_DOWNLOAD_BASE)")
    fetch.add_argument("--no-extract", action="store_true", help="keep archives packed")
    fetch.add_argument("--expect", action="append", default=[], metavar="FILE=ALGO:HEX",
                       help="override a file's checksum, e.g. emnist.zip=sha256:<hex>")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


_GENERIC = {"command", "src", "out", "force", "workers", "shard_mb", "min_images", "drop_small",
            "quiet"}


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        manifest = verify_pack(args.pack_dir, args.split, full=args.full)
        shards = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"{args.pack_dir}: {shards} shards OK ({'sha256' if args.full else 'sizes'})")
    elif args.command == "download":
        expect = dict(item.split("=", 1) for item in args.expect if "=" in item)
        if len(expect) != len(args.expect):
            raise HmamlError(f"--expect {args.expect!r}: use FILE=ALGO:HEX")
        for path in download(args.name, args.to, base_url=args.base_url, checksums=expect,
                             extract=False if args.no_extract else None,
                             progress=not args.quiet):
            print(path)
    else:
        options = {k: v for k, v in vars(args).items() if k not in _GENERIC}
        manifest = pack_dataset(args.command, getattr(args, "src", None), args.out,
                                force=args.force, workers=args.workers,
                                shard_bytes=max(1, round(args.shard_mb * 2**20)),
                                min_images=args.min_images, drop_small=args.drop_small,
                                progress=not args.quiet, **options)
        for split, info in manifest["splits"].items():
            images = sum(c["count"] for c in info["classes"])
            size = sum(s["bytes"] for s in info["shards"]) / 2**20
            print(f"{args.out}: {split}: {len(info['classes'])} classes, {images} images, "
                  f"{len(info['shards'])} shards, {size:.1f} MiB")
    return 0

