"""A JSON file read whole, but only when it is small enough: config.json, the shard index, manifests, tokenizer files.

Why one reader: each of these is read before a3q trusts the folder it is in, so a file of gigabytes, bytes that are not
UTF-8 or text that is not JSON must be refused the same way, naming the file, and never crash or fill memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JSONFileError(ValueError):
    """A JSON file is too large, not UTF-8 or not JSON; ``reason`` says which (``str()`` prefixes the file's name)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path.name} {reason}")
        self.path, self.reason = path, reason


def read_json_file(path: Path | str, max_bytes: int) -> Any:
    """The JSON value in ``path``, read only when the file holds at most ``max_bytes``."""
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise JSONFileError(path, f"is larger than {max_bytes >> 20} MiB")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise JSONFileError(path, "is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise JSONFileError(path, f"is not valid JSON ({exc})") from None
