"""ebft_engine: the EBFT trainer (feature rewards, strided and structured modes).

What lives here: the config schema (`config.py`), model and data loading (`modeling.py`,
`data.py`, `transforms/`), the shared math (`features.py`, `rewards.py`, `advantages.py`), the
two modes (`strided/`, `structured/`, both behind the `Stepper` protocol of `stepper.py`), the
generation server and its client (`rollout/`), the loop (`train.py`, `checkpoint.py`,
`metrics.py`), evaluation (`eval.py`, `sandbox/`) and the `python -m ebft_engine` commands
(`cli.py`, `commands/`). docs/architecture.md draws one step of each mode.

May import: torch, transformers, peft, datasets, pydantic, yaml, httpx, fastapi (the server).
Never `ebft_tui` or textual (tests/test_import_layers.py). Importing this package is cheap:
heavy modules (torch, transformers) are imported by the modules that need them, so
`python -m ebft_engine validate` answers fast.
"""

__version__ = "0.1.0"
