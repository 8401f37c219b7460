"""Reading a user's JSON file (a DeepSpeed config, an HF config.json) with one clear error per way
it can be wrong: missing, a folder, unreadable, not JSON, not an object."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from memprof.errors import MemprofError


def read_user_text(path: str | os.PathLike, what: str, fix: str) -> str:
    """The UTF-8 text of a user's file, with one MemprofError line per way reading it can fail.
    ``what`` names the file in messages ("DeepSpeed config"); ``fix`` tells how to fix a missing one."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MemprofError(f"{what} {path} does not exist: {fix}") from None
    except IsADirectoryError:
        raise MemprofError(f"{what} {path} is a folder: pass the file itself") from None
    except OSError as e:
        raise MemprofError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MemprofError(f"{what} {path} is not UTF-8 text: fix the file") from None


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``. ``what`` names the file in messages ("DeepSpeed config");
    ``fix`` tells how to fix a missing file ("pass --deepspeed_config configs/<name>.json")."""
    path = Path(path)
    text = read_user_text(path, what, fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MemprofError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix the file"
        ) from None
    if not isinstance(data, dict):
        raise MemprofError(f"{what} {path} must be a JSON object")
    return data
