"""The command line: the Typer app (:mod:`~mavl_cli.cli.app`) and its shared data-set options.

Each command parses its options into the specs of :mod:`mavl_cli.core.options`, calls one
stage from :mod:`mavl_cli.stages` and prints its result. Everything heavy is imported inside
the command that needs it, so ``mavl --help`` never imports torch.
"""
