"""Writing a run folder's text files so that a crash never leaves half of one."""
from __future__ import annotations

import json
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
