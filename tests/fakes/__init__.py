"""Stand-ins for the engine's trainer and server, run as real subprocesses by the ebft_tui tests."""
