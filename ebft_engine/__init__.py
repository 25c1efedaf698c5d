"""ebft_engine: the EBFT trainer (feature rewards, strided and structured modes).

Importing this package is cheap: heavy modules (torch, transformers) are imported by the modules
that need them, so `python -m ebft_engine validate` answers fast.
"""

__version__ = "0.1.0"
