"""The one base class for user mistakes: the CLI prints these as one clear message (exit 2),
never as a traceback. Everything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input, a missing file, or an output that would be overwritten; the message says which."""


class Preempted(Exception):
    """Training stopped early on a signal after saving a checkpoint; the same command resumes.
    The CLI exits with ``exit_code`` (75, EX_TEMPFAIL: "try again later")."""

    exit_code = 75
