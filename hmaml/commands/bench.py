"""Benchmarks that print figures; each prints one JSON object as the last line of stdout."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from hmaml.allocator import keep_freed_memory
from hmaml.errors import one_line_errors

#: command -> (module with ``main(argv)``, what it measures); modules are imported on use, since
#: each pulls in its own heavy dependencies (torch, webdataset).
COMMANDS = {
    "adapt": ("hmaml.bench.adapt", "adaptation and training speed of the methods"),
    "loader": ("hmaml.bench.loader", "episodes per second of the episodic data stream"),
    "train": ("hmaml.bench.train", "training tasks/s (fp32, bf16, compiled) against a plain "
                                   "Conv4, and the 600-task evaluation process"),
    "serve": ("hmaml.bench.serve", "what one few-shot request costs a run served as an MLflow "
                                   "model (in process and through mlflow models serve)"),
    "gpu": ("hmaml.bench.gpu", "the GPU check: bf16 numerics, NCCL DDP, speed, a short "
                               "training run"),
}


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hmaml bench", usage=f"hmaml bench {{{','.join(COMMANDS)}}} [options]",
        description=__doc__,
        epilog="commands:\n" + "\n".join(f"  {name:8s}{what}"
                                         for name, (_, what) in COMMANDS.items())
        + "\n\nhmaml bench COMMAND --help lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="see below")
    argv = sys.argv[1:] if argv is None else argv
    # only the first word is ours: the rest, --help included, belongs to the command
    command = parser.parse_args(argv[:1]).command
    keep_freed_memory()  # benchmarks time what training runs: hmaml.allocator
    import_module(COMMANDS[command][0]).main(argv[1:])

