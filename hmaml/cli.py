"""``hmaml COMMAND ...``: the one entry point of every tool (console script ``hmaml``).

Under a launcher: ``accelerate launch -m hmaml.cli train --config cub5`` (Accelerate runs a
module with ``-m``), ``torchrun -m hmaml.cli train ...``. Each command lives in
``hmaml.commands.<name>`` and is imported only when run, so ``hmaml --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from hmaml.log import configure

#: command -> what it does (module ``hmaml.commands.<command>``)
COMMANDS = {
    "train": "train, validate and test one config (resumes a run folder)",
    "evaluate": "re-test a run's best checkpoint (--override to test at other settings)",
    "pretrain": "pre-train an encoder as a classifier of the base classes (model.init_from)",
    "pack": "download raw datasets and pack them into WebDataset shards",
    "sweep": "run a sweep of configs on SLURM, locally or inline (submitit)",
    "tables": "the paper's Tables 3, 4 and 8 from trained runs",
    "bench": "benchmarks that print figures (adapt, loader, train, gpu)",
    "toy2d": "the paper's 2-D toy figure",
    "predict": "classify your own images with a trained run adapted to your support set",
    "register": "register a run's MLflow model as a new version of a registered model",
}

EXAMPLES = """examples:
  hmaml pack glyphs --out shards/glyphs
  hmaml train --config quickstart
  hmaml train --list-configs
  accelerate launch -m hmaml.cli train --config cub5 train.epochs=100
  hmaml evaluate --run runs/cub5 --repeats 5
  hmaml predict --run runs/cub5 --support my_task/ --query photos/
  hmaml register --run runs/cub5 --name cub5 --alias champion
  hmaml predict --model models:/cub5@champion --support my_task/ --query photos/
  hmaml sweep --sweep configs/sweeps/lr_width.yaml --cluster local"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hmaml [-v | -q] COMMAND [options]   (hmaml COMMAND --help: its options)",
             "", "HyperMAML, MAML and ProtoNet few-shot training, tracked in MLflow.", "",
             "commands:", *(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()),
             "", "-v / -q: more / less output (default: $HMAML_LOG_LEVEL, else INFO); progress",
             "bars are drawn only on a terminal (log files get one line per epoch).",
             "", EXAMPLES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s command on the rest; ``--help`` (or nothing) lists the commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbosity = 0
    while argv and argv[0] in ("-v", "--verbose", "-q", "--quiet"):
        verbosity = 1 if argv.pop(0) in ("-v", "--verbose") else -1
    configure(verbosity)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        return import_module(f"hmaml.commands.{command}").main(rest) or 0
    except BrokenPipeError:  # `hmaml train --list-configs | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open until exit)
        return 0


if __name__ == "__main__":
    sys.exit(main())
