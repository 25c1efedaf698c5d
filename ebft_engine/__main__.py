"""`python -m ebft_engine ...`: the engine's own entry point (the `ebft` CLI launches this)."""

from ebft_engine.cli import main

raise SystemExit(main())
