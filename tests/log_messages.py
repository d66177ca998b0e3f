"""The messages the ``aligner`` logger emits while a block runs (whatever stream its own
handler writes to): ``with kept_messages() as messages: ...``."""
from __future__ import annotations

import contextlib
import logging


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def kept_messages():
    from aligner.runtime import get_logger

    kept = _Messages()
    logger = get_logger("aligner")  # configured on first use
    logger.addHandler(kept)
    try:
        yield kept.messages
    finally:
        logger.removeHandler(kept)
