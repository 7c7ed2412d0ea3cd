"""VQA_LOG_FORMAT: text as before, or one JSON object per line carrying the call's extras and the worker's name."""

from __future__ import annotations

import json
import logging

import pytest

from producer.logs import JsonFormatter, configure_logging
from producer.settings import Settings


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("worker.runner", logging.WARNING, __file__, 1, "job %s: %s", ("j1", "boom"), None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fields_and_every_extra() -> None:
    line = JsonFormatter(worker="gpu0").format(_record(job_id="j1", job_ids=["j1", "j2"], when=object()))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "job j1: boom" and entry["level"] == "WARNING" and entry["logger"] == "worker.runner"
    assert entry["worker"] == "gpu0" and entry["job_id"] == "j1" and entry["job_ids"] == ["j1", "j2"]
    assert entry["ts"].endswith("Z") and isinstance(entry["when"], str)  # what JSON cannot hold becomes text
    assert not {"args", "msg", "levelno", "pathname"} & set(entry)


def test_exceptions_stay_on_their_line() -> None:
    try:
        raise ValueError("bad\nimage")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc"] and "worker" not in json.loads(line)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_configure_installs_one_handler_in_the_asked_format(log_format: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(Settings(log_format=log_format, log_level="WARNING"), worker="w9")
        configure_logging(Settings(log_format=log_format, log_level="WARNING"), worker="w9")  # again: still one handler
        logging.getLogger("vqa.test").info("hidden")
        logging.getLogger("vqa.test").warning("shown %d", 1, extra={"job_id": "j7"})
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        if log_format == "json":
            assert json.loads(err[0])["job_id"] == "j7" and json.loads(err[0])["worker"] == "w9"
        else:
            assert err[0].endswith("WARNING vqa.test: shown 1")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
