"""The project's own errors, one per concern. Each message says what went wrong and what
to do, so the command line prints it on one line; any other exception is a bug and keeps
its traceback. This module imports nothing heavy: the CLI can catch these without
loading TensorFlow."""


class TrainingError(Exception):
    """Base class: an error the user can act on from its message alone."""


class DataError(TrainingError):
    """The dataset is missing, unreadable or not CIFAR-100."""


class RunError(TrainingError):
    """A run folder is not in a state for the request: nothing to resume, an interrupted
    run with another recipe, no checkpoint yet."""


class WeightsError(TrainingError):
    """A Keras 2 weights file that is unreadable or fits neither original architecture."""


class ExportError(TrainingError):
    """The converted graph does not reproduce the Keras model; nothing was written."""


class ReportError(TrainingError):
    """A report cannot be made from the exported files: none there, or no `features`."""


class RecipeError(TrainingError):
    """Training settings that cannot work: an unknown augmentation, a rate outside [0, 1)."""
