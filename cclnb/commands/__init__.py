"""The last stage, the command line: `cli` dispatches, one module per `cclnb` subcommand
(`add_arguments(parser)` and `run(args) -> int`). May import every stage; nothing imports it
but `cclnb.__main__` and the console script.
"""
