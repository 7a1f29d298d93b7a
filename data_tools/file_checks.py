"""What is wrong with a local data file, said with its line number before `datasets` says it worse.

`datasets` reads an empty file into an error with no message, passes bytes that are not UTF-8
through to the first row that is read (a UnicodeDecodeError deep in training), and reports a
malformed JSONL line as "row 3", counting from 0 and only sometimes. `check_text_file` runs
before a text file (JSONL, JSON, CSV) is loaded and costs one read at disk speed;
`json_problem` runs only after `datasets` failed on a JSON file, to find the line.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from posttrain.errors import PosttrainError

TEXT_SUFFIXES = {".jsonl", ".json", ".csv"}
CHUNK = 1 << 20


def check_text_file(path: Path) -> None:
    """Raise a PosttrainError (file, line, fix) for an empty file or one that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, content = 1, False
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = max(
                    e.start - len(e.object) + len(chunk), 0
                )  # the decoder may hold bytes of the last chunk
                line += chunk.count(b"\n", 0, at)
                raise PosttrainError(
                    f"not UTF-8: byte 0x{chunk[at]:02x} cannot be decoded (data files must be UTF-8)",
                    file=str(path),
                    line=line,
                    fix=f"convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`",
                ) from None
            content = content or bool(chunk.strip())
            line += chunk.count(b"\n")
    if not content:
        raise PosttrainError("the file is empty", file=str(path), fix="point `data:` at a file with rows")


def json_problem(path: Path) -> PosttrainError | None:
    """The first line of a JSONL file that is not a JSON object (or where a JSON file stops
    parsing), as an error naming the file and line; None when every line parses."""
    if path.suffix.lower() == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            return PosttrainError(
                f"not valid JSON: {e.msg} (column {e.colno})", file=str(path), line=e.lineno
            )
        return None
    with open(path, encoding="utf-8-sig") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return PosttrainError(
                    f"not JSON: {e.msg} (column {e.colno})",
                    file=str(path),
                    line=number,
                    fix="each line of a .jsonl file is one JSON object",
                )
            if not isinstance(row, dict):
                return PosttrainError(
                    f"a JSON {type(row).__name__}, not an object",
                    file=str(path),
                    line=number,
                    fix='each line of a .jsonl file is one JSON object: {"prompt": ..., ...}',
                )
    return None
