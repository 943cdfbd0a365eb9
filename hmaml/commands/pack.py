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
from hmaml.data.sources import SPECS, DatasetSpec
from hmaml.errors import HmamlError, one_line_errors


def _add_dataset_options(parser: argparse.ArgumentParser, spec: DatasetSpec) -> None:
    """The flags every dataset's sub-command shares, then the dataset's own (from its spec)."""
    if spec.needs_src:
        parser.add_argument("--src", required=True, help="the raw data (see docs/data.md)")
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
    spec.add_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmaml pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in SPECS.values():
        _add_dataset_options(sub.add_parser(spec.name, help=spec.help), spec)
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
        shards = sum(len(s.shards) for s in manifest.splits.values())
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
        packed = pack_dataset(args.command, getattr(args, "src", None), args.out,
                              force=args.force, workers=args.workers,
                              shard_bytes=max(1, round(args.shard_mb * 2**20)),
                              min_images=args.min_images, drop_small=args.drop_small,
                              progress=not args.quiet, **options)
        for split, info in packed["splits"].items():
            images = sum(c["count"] for c in info["classes"])
            size = sum(s["bytes"] for s in info["shards"]) / 2**20
            print(f"{args.out}: {split}: {len(info['classes'])} classes, {images} images, "
                  f"{len(info['shards'])} shards, {size:.1f} MiB")
    return 0

