"""Keep torch's chatter from the user: its warnings and log records (``W1122 ...
specialized``, exporter notes) are not bnctl's output. ``--debug`` shows tracebacks, not these."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Warnings ignored and log records below ERROR dropped for the duration."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
