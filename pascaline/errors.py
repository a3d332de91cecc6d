"""User-facing errors.

Every ``PascalineError`` is a mistake the user can fix (a missing or wrong file, an
impossible size, a budget too small). The CLI prints its message as one sentence and
exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PascalineError(Exception):
    """Base class: the message is one sentence that says what is wrong and what to do."""


class WeightsError(PascalineError):
    """A weights file or folder cannot be used."""


class MissingFileError(WeightsError):
    """A file or folder that was named does not exist or holds no weights."""


class NotSafetensorsError(WeightsError):
    """The file is not a safetensors file (pickled checkpoints are never loaded)."""


class NotGGUFError(WeightsError):
    """The file is not a GGUF file, or its GGUF header is damaged."""


class TruncatedFileError(WeightsError):
    """The file is shorter than its own header declares (an interrupted download)."""


class CorruptFileError(WeightsError):
    """The file's header contradicts itself or the file's size (a damaged or hand-edited file)."""


class WrongModelError(WeightsError):
    """The file holds another model than the one asked for."""


class ConfigError(WeightsError):
    """The tensor shapes fit no configuration of the model."""


class StateDictError(WeightsError):
    """Strict loading found missing or unexpected keys, or wrong shapes."""


class LoraError(WeightsError):
    """A LoRA file cannot be applied: malformed, of an unsupported kind, or for another model."""


class TokenizerNotFoundError(PascalineError):
    """No tokenizer could be found offline."""


class InvalidArgumentError(PascalineError):
    """An option has an impossible value (size, steps, sampler, dtype...)."""


class BudgetError(PascalineError):
    """The VRAM budget cannot hold even the smallest working set."""


class HostMemoryError(BudgetError):
    """A model would not fit in the RAM this machine has available."""


class DeviceError(PascalineError):
    """The requested device is absent, or the installed torch cannot drive it."""


class RequestError(InvalidArgumentError):
    """A request (over HTTP or from a batch file) has an unknown field or a value of the wrong type."""


class WriteError(PascalineError):
    """A file could not be written (a full disk, a read-only folder); nothing half-written is left."""


class PascalineWarning(UserWarning):
    """Something the user should hear of that did not stop the run (a damaged cache rebuilt).

    The CLI prints it as one line, ``pascaline: warning: <message>``.
    """


def plural(count: int, word: str, many: str | None = None) -> str:
    """``plural(1, "step") -> "1 step"``, ``plural(8, "step") -> "8 steps"`` (``many`` for odd plurals)."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"
class MissingExtraError(PascalineError):
    """An optional dependency a command needs (a pyproject extra) is not installed."""
