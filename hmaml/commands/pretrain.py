"""Pre-train an encoder as an ordinary classifier of the base classes, for ``model.init_from``.

`python launch/pretrain.py --config mini_pretrain` (or `accelerate launch launch/pretrain.py ...`)
trains the encoder plus a linear layer on every image of the training split, validates the encoder
as a ProtoNet on the few-shot validation episodes, and writes the best encoder to
`<run_dir>/encoder.pt`; meta-training configs load it with `model.init_from`. Overrides follow
the config: `... --config mini_pretrain train.epochs=50 pretrain.batch_size=256`.
"""

from __future__ import annotations

import argparse

from hmaml.config import load_config
from hmaml.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="a config name in configs/ (e.g. mini_pretrain) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from hmaml.train.pretrain import pretrain

    pretrain(cfg)
    return 0

