"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 1."""


class UserError(Exception):
    """Bad input (config, paths, data). The message must name what is wrong and where."""
