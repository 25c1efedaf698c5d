"""The `ebft-tui` Textual app. Imported lazily by the CLI (`ebft run`, `ebft tui`): Textual loads
only when a terminal UI is actually wanted. Entry point: `ebft_tui.tui.app.run_app`."""
