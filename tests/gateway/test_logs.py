"""configure_logging: JSON lines carry extra fields, and JSON mode switches off the libraries' tqdm progress bars."""

from __future__ import annotations

import json
import logging

import huggingface_hub.utils
import transformers.utils.logging

from gateway.logs import JsonFormatter, disable_progress_bars


def test_json_formatter_writes_one_object_with_extras() -> None:
    record = logging.LogRecord("sirocco", logging.INFO, __file__, 1, "ready in %.1fs", (1.25,), None)
    record.request_id = "r1"
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["level"], line["request_id"]) == ("ready in 1.2s", "info", "r1")


def test_json_logs_switch_off_download_and_loading_progress_bars() -> None:
    try:
        disable_progress_bars()
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:  # process-wide switches: leave them as other tests expect
        huggingface_hub.utils.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
