"""Screens of the ebft-tui app, one per file."""
