"""Errors the CLI turns into one line and a non-zero exit (STYLE 14)."""


class PipelineError(Exception):
    """A known failure caused by input: bad params, a bad file, a missing dataset.

    The message names the file, row, column or key and what was expected.
    """
