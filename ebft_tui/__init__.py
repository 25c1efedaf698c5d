"""ebft_tui: the `ebft` CLI and the `ebft-tui` Textual app.

This package never imports torch or ebft_engine: it talks to runs through subprocesses
(`python -m ebft_engine ...`), config files and the structured log (`metrics.jsonl`).
"""

__version__ = "0.1.0"
