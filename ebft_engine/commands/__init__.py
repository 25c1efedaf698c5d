"""One module per `python -m ebft_engine` command (validate, schema, train, serve, eval,
prepare-model): `add_arguments(parser)` and `run(args) -> int`, dispatched by `cli.py`.

May import any engine module, but inside `run` only: `add_arguments` must stay free of heavy
imports so `--help` and `validate` answer fast. Nothing but `cli.py` imports this package.
"""
