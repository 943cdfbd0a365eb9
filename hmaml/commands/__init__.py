"""The command-line tools, one module per command, each with ``main(argv) -> int``: run as
``hmaml <command>`` (:mod:`hmaml.cli`), ``python -m hmaml.cli <command>`` (for ``accelerate
launch -m``) or through the thin ``launch/<command>.py`` scripts of a checkout."""
