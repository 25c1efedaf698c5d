"""Run machinery shared by the TUI and headless mode: plan, supervise, tail (pure asyncio, no Textual)."""
