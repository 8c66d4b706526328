"""One module per command family: each stage reads its inputs, runs the library and writes its
outputs, returning a :class:`~mavl_cli.stages.result.StageResult`. The CLI and the demo call these.
"""
