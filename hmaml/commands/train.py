"""Train, validate and test one experiment: `accelerate launch -m hmaml.cli train --config cub5`.

Overrides follow the config: `... --config quickstart train.epochs=5 method.hn_width=256`.
`--list-configs` lists the shipped configs; `--show-config NAME` prints one fully resolved, to copy
and edit (`hmaml train --show-config cub5 > my.yaml`, then `--config my.yaml`).
Re-running the same command on the same run directory resumes it; SIGTERM checkpoints and exits 0.
`--dry-run` prints the resolved config and the distributed plan (processes, tasks per rank per
step, micro-batches, steps per epoch, precision, engine) and exits without training; with
`--accelerate-config FILE` it plans for that launch file, else for the current launch.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import replace

from hmaml.config import config_keys, load_config, shipped_configs, to_yaml
from hmaml.errors import one_line_errors
from hmaml.train.rundir import Status


def _epilog() -> str:
    names = textwrap.fill(", ".join(shipped_configs()), 96, initial_indent="  ",
                          subsequent_indent="  ")
    keys = "\n".join(textwrap.fill(f"{section or '(top level)'}: {', '.join(keys)}", 96,
                                    initial_indent="  ", subsequent_indent="    ")
                      for section, keys in config_keys().items())
    return (f"shipped configs (--list-configs for what each is):\n{names}\n\n"
            f"keys, as section.key=value overrides:\n{keys}\n\n"
            "examples:\n  hmaml train --config quickstart\n"
            "  accelerate launch -m hmaml.cli train --config cub5 train.epochs=100 seed=1\n"
            "  hmaml train --config omni_emnist1 --dry-run --processes 8\n"
            "  hmaml train --show-config cub5 > my.yaml && hmaml train --config my.yaml")


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmaml train", description=__doc__, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped config's name (e.g. cub5) or a YAML path")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the shipped configs and exit")
    parser.add_argument("--show-config", metavar="NAME",
                        help="print the config NAME (with overrides) fully resolved and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the distributed plan, then exit")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="with --dry-run: plan for this accelerate config file")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="with --dry-run: plan for N processes (overrides the launch's)")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="with --dry-run: spread the processes over N nodes")
    args = parser.parse_args(argv)
    if args.list_configs:
        configs = shipped_configs()
        width = max(map(len, configs))
        print("\n".join(f"{name:<{width}}  {what}" for name, what in configs.items()))
        return 0
    if args.show_config:
        print(to_yaml(load_config(args.show_config, args.overrides)), end="")
        return 0
    if not args.config:
        parser.error("--config is required (or --list-configs / --show-config NAME)")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # the engine imports torch: not for --help or --list-configs
        from hmaml.train.engine import dry_run, is_rank0, launch_from_env, launch_from_file

        launch = (launch_from_file(args.accelerate_config) if args.accelerate_config
                  else launch_from_env())
        launch = replace(launch, processes=args.processes or launch.processes,
                         nodes=args.nodes or launch.nodes)
        if is_rank0():
            print(dry_run(cfg, launch))
        return 0
    from hmaml.train.loop import train

    result = train(cfg)
    if result.status == Status.PREEMPTED:
        print(f"stopped at epoch {result.epoch}; checkpoint in {result.run_dir} "
              "(re-run the same command to resume)")
    return 0

