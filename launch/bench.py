"""Benchmarks that print figures: `adapt` (methods' speed) and `loader` (episodic data stream)."""

from __future__ import annotations

import sys

from hmaml.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("adapt", "loader")
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: bench.py {{{','.join(commands)}}} [options]  (bench.py adapt --help)")
    if argv[0] == "adapt":
        from hmaml.bench import main as run
    else:
        from hmaml.data.loader_bench import main as run
    run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
