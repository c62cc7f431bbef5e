"""Exceptions that decide slimlab's exit codes (2 = bad input, 1 = a run failed)."""


class ConfigError(ValueError):
    """Bad input: an unknown or invalid config key, value, technique or order (exit 2)."""


class PluginError(RuntimeError):
    """A plugin that cannot be used as written, e.g. a misspelled hook (exit 2)."""


class RunFailed(RuntimeError):
    """A run raised while it was running; the cause is chained (exit 1)."""


class Refused(ValueError):
    """A run stopped on purpose by what it measured (a recipe slower than fp32 here): exit 1, the run FAILED with
    the reason; the message says it all, so no traceback is printed."""


class SweepSetupFailed(BaseException):  # noqa: N818 - it carries the cause, like hydra_app.BadInput
    """A sweep could not be set up (its store or parent run); exit 1.

    A ``BaseException`` because Hydra turns a callback's ``Exception`` into a warning and carries on.
    """


RECORDED = "slimlab_recorded"  # set on an error raised after the run was opened, and so recorded as FAILED


def recorded(error: BaseException) -> bool:
    """Whether ``error`` ended a run that tracking had opened: a failed run (exit 1), never bad input (exit 2),
    whatever its type, so the run's record and job folder stay."""
    return bool(getattr(error, RECORDED, False))
