"""The error type for user mistakes, which the CLI turns into one line and exit status 2."""


class UserInputError(ValueError):
    """Bad user input: a config field, a file, or a command-line value.

    The message names the field, file or value, and says what to do. It is shown to the
    user as it is, without a traceback.
    """


class StudyInterrupted(Exception):
    """A study stopped by Ctrl-C (SIGINT); the finished cells are saved.

    Attributes:
      out_dir: the results folder.
      saved: the number of finished cells it holds.
    """

    def __init__(self, out_dir, saved: int):
        self.out_dir, self.saved = out_dir, saved
        super().__init__(f"interrupted: {saved} cell{'s' if saved != 1 else ''} saved in "
                         f"{out_dir}; run the same command to resume")
