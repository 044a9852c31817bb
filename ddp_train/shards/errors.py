"""The packer's error type, in its own module so that ``pack`` and ``folds`` can both raise it."""


class PackError(ValueError):
    """A problem with the user's input or settings; the CLI prints it as one line and exits 2."""
