"""One module per `cclnb` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
