"""Loading a DeepSpeed config file into a dict: the one way in from disk (the estimator's
``--deepspeed-config``, the launcher's ``--deepspeed_config``, an accelerate YAML's
``deepspeed_config_file``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from memprof.errors import MemprofError
from memprof.jsonfile import read_user_text


def load_config_file(path: str | os.PathLike, fix: str = "check the path") -> dict[str, Any]:
    """A DeepSpeed config file as a dict. JSON, or the Hjson DeepSpeed itself also reads
    (``DeepSpeedConfig.__init__``: ``hjson.load``; comments, trailing commas). A YAML file or a
    template with placeholders is one MemprofError line."""
    path = Path(path)
    what = "DeepSpeed config"
    text = read_user_text(path, what, fix)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise MemprofError(f"{what} {path} is a YAML file, not DeepSpeed JSON: if it is an accelerate config, "
                           "pass it with --accelerate-config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = _hjson_or_none(text)
        if data is None:
            hint = " (it looks like a template: fill in its placeholders)" if ("{{" in text or "${" in text) else ""
            raise MemprofError(
                f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){hint}: fix the file"
            ) from None
    if not isinstance(data, dict):
        raise MemprofError(f"{what} {path} must be a JSON object")
    return data


def _hjson_or_none(text: str) -> dict[str, Any] | None:
    """The object Hjson reads from ``text`` when the text is brace-delimited Hjson (comments,
    trailing commas); None otherwise. A bare ``key: value`` text (YAML) is not accepted, though
    Hjson would read it: no DeepSpeed config is written that way."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        import hjson  # a DeepSpeed dependency
    except ImportError:
        return None
    try:
        data = hjson.loads(text)
    except (ValueError, TypeError, RecursionError):  # hjson.HjsonDecodeError is a ValueError
        return None
    return _plain(data) if isinstance(data, dict) else None


def _plain(value: Any) -> Any:
    """hjson's OrderedDicts as plain dicts/lists (JSON-serialisable, compare equal to json.loads)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
