"""Silence lm-eval warnings that evomerge's own use of it triggers by design."""

from __future__ import annotations

import logging


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop_messages(logger: str, *fragments: str) -> None:
    """Drop records of `logger` that contain any of `fragments`; everything else still shows."""
    logging.getLogger(logger).addFilter(_Drop(fragments))
