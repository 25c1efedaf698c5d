"""`python -m ebft_tui ...` is the `ebft` command."""

from ebft_tui.cli import main

main()
