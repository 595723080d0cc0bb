"""The command line: `m3db COMMAND [PATH] ...` (docs/cli.md). main.py parses and runs commands,
shell.py is the interactive SQL shell, table.py draws result tables.
"""

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
