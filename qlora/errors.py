"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class QLoraError(Exception):
    """A problem the user can act on (bad path, bad option, incompatible files...)."""
