"""Logging set-up for `sirocco serve`: plain or JSON lines on stderr; uvicorn's loggers go through the same handler.

With JSON logs, huggingface_hub's and transformers' progress bars (tqdm, drawn on stderr) are switched off: they would
break the one-object-per-line stream a log collector reads.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

# LogRecord attributes that are not `extra=` fields
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any `extra=` fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: value for key, value in record.__dict__.items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, is_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if is_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    if is_json:
        disable_progress_bars()


def disable_progress_bars() -> None:
    """No tqdm bars from downloads (huggingface_hub) or checkpoint loading (transformers, used to convert the embedded model)."""
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
