"""What the data modules share without importing each other: the error type and the label ignored by the loss."""
from __future__ import annotations

#: label value the loss ignores (prompt positions, padding)
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and line / item."""
