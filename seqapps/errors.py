"""The one exception type for bad input from a user.

A leaf module with no imports, so that every layer (kernels, backbones, tasks, shell) can
raise it; the CLI turns it into a single line on stderr and a non-zero exit.
"""


class InputError(ValueError):
    """Bad input: the message names what was given and what would be right, in one line."""
