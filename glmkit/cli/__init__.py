"""Command line: one thin module per command (see main.py for the list)."""
