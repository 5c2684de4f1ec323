"""The command line: flags from the settings dataclasses, one command a function (``palr --help``)."""

from palr.cli.main import app, main

__all__ = ["app", "main"]
