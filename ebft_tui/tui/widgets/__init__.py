"""Widgets of the ebft-tui app: each renders from state it is handed, none reads files itself."""
