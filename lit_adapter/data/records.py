"""Training records: a JSON list or JSON Lines file of Alpaca records (``instruction``, ``input``, ``output``) or
chat records (``messages``), read and checked with errors that name the record; and the Alpaca download."""

import json
import re
import shutil
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any, Optional

from lit_adapter.errors import UserError
from lit_adapter.files import NESTED_TOO_DEEPLY, atomic_path
from lit_adapter.prompts import ROLES

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
FIELDS = ("instruction", "input", "output")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")

_WHITESPACE = re.compile(r"\s*")


def load_records(path: Path, skip_bad_records: bool = False) -> tuple[list[dict], list[str]]:
    """The training records of a JSON list or JSON Lines file, and the problems skipped.

    A record is an Alpaca record (``instruction``, optional ``input``, ``output``: strings, a missing ``input``
    meaning none) or a chat record (``messages``: a list of ``{"role", "content"}`` with roles system, user,
    assistant, and at least one assistant answer). A file that holds neither, or a bad record, raises a
    ``UserError`` naming the file and the record (or line); with ``skip_bad_records`` bad records are left out
    and described in the second return value instead.
    """
    path = Path(path)
    entries = _read_records_file(path)
    records, problems = [], []
    for where, record in entries:
        try:
            records.append(_check_record(record, where))
        except UserError as err:
            if not skip_bad_records:
                hint = "fix it, or pass --skip_bad_records true to leave bad records out"
                raise UserError(f"{path}: {err} ({hint})") from None
            problems.append(str(err))
    if not records:
        raise UserError(f"{path} has no usable records ({len(problems)} bad ones skipped)")
    return records, problems


def _read_records_file(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for every record of a JSON list or JSON Lines file (told apart by suffix or content)."""
    text = _read_text(path)
    if path.suffix in JSON_LINES_SUFFIXES:
        return _parse_json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(path, text)
        index = _broken_record_index(text)
        where = f", in record {index}" if index is not None else ""
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}{where}); "
                        "is the file truncated?") from None
    except RecursionError:
        raise UserError(f"{path} is not valid JSON: {NESTED_TOO_DEEPLY}") from None
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected a list of records with keys {FIELDS}")
    return [(f"record {index}", record) for index, record in enumerate(data)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as UTF-8 text: {err}") from None


def _parse_json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, record) for each non-blank line of a JSON Lines text."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                                "JSON Lines hold one record per line") from None
            except RecursionError:
                raise UserError(f"{path} line {number} is not valid JSON: {NESTED_TOO_DEEPLY}") from None
    return entries


def _broken_record_index(text: str) -> Optional[int]:
    """Index of the first element of a top-level JSON list that does not parse; None where there is no such list."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        return None
    try:
        decoder.raw_decode(text, pos)
        return None  # the list itself is fine: the error follows it
    except json.JSONDecodeError:
        pass
    index, pos = 0, pos + 1
    while True:
        try:
            _, pos = decoder.raw_decode(text, _WHITESPACE.match(text, pos).end())
        except json.JSONDecodeError:
            return index
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if not text.startswith(",", pos):
            return index
        pos += 1


def _check_record(record: Any, where: str) -> dict:
    """The record with its fields checked (an Alpaca record gets its ``input``), or a ``UserError`` about ``where``."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object with keys {FIELDS}")
    if "messages" in record:
        return {"messages": _check_messages(record["messages"], where)}
    fields = {"input": "", **{key: record[key] for key in FIELDS if key in record}}
    for key in FIELDS:
        if key not in fields:
            raise UserError(f"{where} has no {key!r} (an Alpaca record needs {FIELDS}, a chat record 'messages')")
        if not isinstance(fields[key], str):
            raise UserError(f"{where}: {key!r} is a {type(fields[key]).__name__}, expected a string")
    if not fields["output"].strip():
        raise UserError(f"{where} has an empty 'output' (nothing to learn)")
    return fields


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat record's turns as ``{"role", "content"}``; at least one assistant answer must have text."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {turn} needs a string 'content' (and a 'role')")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: message {turn} has role {message.get('role')!r}, expected one of {ROLES}")
        turns.append({"role": message["role"], "content": message["content"]})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise UserError(f"{where} has no assistant answer (nothing to learn)")
    return turns


def download_alpaca(destination: Path, url: str = ALPACA_URL, timeout: float = 60.0) -> None:
    """Download the Stanford Alpaca JSON to ``destination``; a partial download never appears there."""
    print(f"downloading {url} to {destination}")
    with atomic_path(Path(destination)) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (OSError, HTTPException) as err:
            raise UserError(f"could not download {url} ({err}); without network, fetch alpaca_data.json "
                            "elsewhere and pass --data_file PATH") from None
