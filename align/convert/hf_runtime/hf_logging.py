"""`from ...utils import logging`: HF's logger factory, here the standard library's."""

import logging


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(name)
