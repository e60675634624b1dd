"""The error type for user mistakes, which the CLI turns into one line and exit status 2."""


class UserInputError(ValueError):
    """Bad user input: a config field, a file, or a command-line value.

    The message names the field, file or value, and says what to do. It is shown to the
    user as it is, without a traceback.
    """
