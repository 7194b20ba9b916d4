"""One exception type for bad user input: the CLI prints its message as one sentence, no traceback."""


class UserError(ValueError):
    """Bad input from the user (unknown model, site, path, malformed option...).

    The message is one clear sentence naming the bad value and what would be valid.
    """
