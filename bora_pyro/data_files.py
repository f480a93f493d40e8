"""Data files and folders read into a ``datasets.Dataset`` (Arrow, memory-mapped), with one-line errors.

``--data`` takes a ``.jsonl`` (or ``.json``: JSON lines or one array of objects), ``.csv`` (with a
header row) or ``.parquet`` file, or a folder written by ``Dataset.save_to_disk``. datasets'
own loaders read them into Arrow files in a cache folder (``cache_dir``; by default datasets'
own), so a corpus of millions of documents is memory-mapped rather than held as Python objects.

A text file is first checked by a streaming pass that holds one line at a time: UTF-8, valid
JSON objects per line (no ``NaN``/``Infinity``, which Python reads but JSON does not have) or a
CSV header of distinct names. A mistake is then named with its line, instead of the Arrow
reader's message about a byte offset.
"""

from __future__ import annotations

import codecs
import csv
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, first_line

#: datasets' loader of each file suffix.
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ACCEPTED = "a .jsonl, .json, .csv or .parquet file, or a folder written by Dataset.save_to_disk"


def load_data(path: str | Path, cache_dir: str | Path | None = None):
    """The rows of a data file or ``save_to_disk`` folder as a ``datasets.Dataset``.

    Raises:
        DataError: a missing, empty, non-UTF-8, malformed or unsupported file, in one line.
    """
    import datasets

    path = Path(path)
    if path.is_dir():
        return saved_dataset(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the --data path")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"cannot read {path.name!r}: use {ACCEPTED}")
    if path.stat().st_size == 0 or (loader != "parquet" and not any(line.strip() for line in text_lines(path))):
        raise DataError(f"data file {path} is empty; it needs one document per row")
    options = {}
    if loader == "json":
        check_json(path)
    elif loader == "csv":
        names = check_csv(path)  # every column read as text, as csv.DictReader would (pandas would guess numbers)
        options = {"features": datasets.Features({name: datasets.Value("string") for name in names}),
                   "keep_default_na": False, "encoding": "utf-8-sig",
                   "index_col": False}  # a row with extra fields keeps its first columns (csv.DictReader's reading)
    try:
        dataset = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache_dir, **options)
    except Exception as error:  # Arrow and pandas raise many types for a file they cannot read
        raise DataError(f"cannot read {path} ({first_line(error)}); check that it is a valid {path.suffix} file") \
            from None
    if len(dataset) == 0:
        raise DataError(f"data file {path} has no rows; it needs one document per row")
    return dataset


def saved_dataset(path: Path):
    """A folder of ``Dataset.save_to_disk`` (not a ``DatasetDict``: name the split to use)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"cannot read the folder {str(path)!r} ({first_line(error)}): --data takes {ACCEPTED}") \
            from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds a DatasetDict with splits {sorted(dataset)}; save one split "
                        "(dataset_dict['train'].save_to_disk(...)) and pass its folder")
    return dataset


def text_lines(path: Path) -> Iterator[str]:
    """The file's lines as text (a BOM dropped), decoded as UTF-8 one chunk at a time, with a
    :class:`DataError` naming the line and byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line_number, pending = 1, ""
    with path.open("rb") as file:
        for raw in iter(functools.partial(file.read, 1 << 20), b""):
            try:
                text = pending + decoder.decode(raw)
            except UnicodeDecodeError as error:
                before = pending.count("\n") + raw[: error.start].count(b"\n")
                raise DataError(f"{path} is not UTF-8 text: byte 0x{raw[error.start]:02x} on line "
                                f"{line_number + before} cannot be decoded; re-save the file as UTF-8 "
                                "(e.g. iconv -f latin1 -t utf-8)") from None
            *lines, pending = text.split("\n")
            for line in lines:
                yield line
                line_number += 1
        yield pending + decoder.decode(b"", final=True)


def check_csv(path: Path) -> list[str]:
    """The header's column names; every row must parse as CSV."""
    reader = csv.reader(text_lines(path))
    try:
        header = next(reader)
        for _ in reader:
            pass
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    if not header or len(set(header)) < len(header) or not all(header):
        raise DataError(f"{path} needs a header row of distinct column names, got {header}")
    return header


def check_json(path: Path) -> None:
    """JSON lines, or (a file whose first non-blank line starts with ``[``) one JSON array."""
    lines = enumerate(text_lines(path), start=1)
    for number, line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("["):  # one array: the rest of the file belongs to it
            check_json_value(path, number, "\n".join([line, *(rest for _, rest in lines)]))
            return
        check_json_value(path, number, line)


def check_json_value(path: Path, number: int, text: str) -> None:
    """``text`` (from line ``number`` on) is a JSON object or an array of objects. ``NaN`` and
    ``±Infinity``, which Python's json reads but JSON does not have, are refused."""
    try:
        value = json.loads(text, parse_constant=functools.partial(no_constant, path, number, text))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {number + error.lineno - 1}: not valid JSON ({error.msg}); a .jsonl file "
                        "holds one JSON object per line") from None
    for row in value if isinstance(value, list) else [value]:
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object with a task and a text field, "
                            f"got {type(row).__name__}")


def no_constant(path: Path, number: int, line: str, constant: str):
    """json's ``parse_constant``: refuse ``constant``, naming the line of the first one outside a string."""
    strings_or_constants = re.finditer(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)', line)
    offset = next((match.start() for match in strings_or_constants if match.group(1)), 0)
    at = number + line.count("\n", 0, offset)
    raise DataError(f"{path}, line {at}: {constant} is not a JSON number (JSON has no NaN or Infinity); "
                    f"write it as null or as a string such as \"{constant}\"")
