"""Metric history: plain Python models of what the log says (no Textual)."""
