"""Errors the CLI turns into one line and a non-zero exit (STYLE 14)."""


class PipelineError(Exception):
    """A known failure caused by input: bad params, a bad file, a missing dataset.

    The message names the file, row, column or key and what was expected.
    """


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 run', '3 runs': the count and its noun for messages; `plural` where adding an s is wrong ('entries')."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_line(exc: BaseException | str) -> str:
    """The first line of an error's message (MLflow's `.message` when it has one), else its type's name."""
    text = exc if isinstance(exc, str) else (getattr(exc, "message", None) or str(exc))
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ("" if isinstance(exc, str) else type(exc).__name__)
