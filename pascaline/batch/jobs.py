"""A JOBS file (JSONL or CSV) as rows: one image each, checked by the HTTP API's own validator.

    rows = JobsFile.read(Path("jobs.jsonl")).rows(batch_seed=7)
    rows[0].id, rows[0].options, rows[0].record   # a ready row: file stem, GenerateOptions, JSON form
    rows[3].error                                 # a row refused on its own: its one sentence

A row carries the fields a request to ``pascaline serve`` takes (``runtime.requests``), plus
an ``id`` (its file stem and manifest key; default: the row's line number). Two differences
from the HTTP form, both because a batch file sits on disk next to its inputs: a row without
a seed gets ``batch_seed + k`` (k: the row's place in the file from 0, as ``generate --count``
numbers its seeds), and ``init_image`` is an image file's path (relative to the JOBS file's
folder) rather than base64. The format is told from the content: a first line that opens a
JSON object (or array) is JSONL, anything else is a CSV header of field names. A mistake in one row
makes that row an error and leaves the others; a file that cannot be read, holds no rows
or has a CSV header naming unknown fields is refused whole (``JobsFileError``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pascaline.errors import InvalidArgumentError, PascalineError, RequestError
from pascaline.runtime.requests import _json_kind as _kind
from pascaline.runtime.requests import check_value, parse_request, request_fields

ID_FIELD = "id"
MAX_ID_CHARS = 64
_SAFE_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")
# names Windows will not create a file under, whatever the extension
_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}

Check = Callable[[Any], Any]  # GenerateOptions -> GenerateOptions, raising a PascalineError
# a row as read from the file: (line, its fields) or (line, the sentence of why it cannot be read)
Parsed = tuple[int, "dict[str, Any] | str"]


class JobsFileError(InvalidArgumentError):
    """The JOBS file cannot be used at all (missing, unreadable, empty, a bad CSV header)."""


@dataclass(frozen=True)
class Row:
    """One row of a JOBS file: ready to run (``options`` set) or refused (``error`` set)."""

    line: int  # where the row starts in the file, from 1
    index: int  # its place among the rows, from 0
    id: str | None  # None: the row's id is not usable (unsafe, or another row's)
    options: Any = None  # GenerateOptions, seed set
    record: dict[str, Any] | None = None  # the JSON form (seed included): what a rerun compares
    seed_from: str = "row"  # "row": the row gave it; "batch": batch seed + index
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class JobsFile:
    """A JOBS file read and split into rows; file-level mistakes are found here, before any output."""

    path: Path
    parsed: list[Parsed]  # (line, fields) per row, or (line, why it cannot be read)

    @classmethod
    def read(cls, path: Path) -> JobsFile:
        text = _read_text(path)
        parsed = list(_jsonl(text) if _is_jsonl(text) else _csv(text, path))
        if not parsed:
            raise JobsFileError(
                f"{path} holds no rows; write one JSON object per line (JSONL), or a CSV header "
                "and one line per image."
            )
        return cls(path, parsed)

    def rows(
        self, batch_seed: int, *, load: Mapping[str, Any] | None = None, check: Check | None = None
    ) -> list[Row]:
        """Every row, in file order, checked.

        ``load``: the batch's load-level settings (``{"model": ...}``); a row naming other ones
        is refused. ``check(options)`` runs the pipeline's own checks (the family's samplers, ...).
        """
        taken: dict[str, int] = {}
        return [
            _row(line, index, data, taken, batch_seed, self.path.parent, load or {}, check)
            for index, (line, data) in enumerate(self.parsed)
        ]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: Excel starts its UTF-8 CSV with a BOM
    except FileNotFoundError:
        raise JobsFileError(f"the JOBS file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise JobsFileError(f"{path} is a folder; give a JSONL or CSV file with one image per row.") from None
    except PermissionError:
        raise JobsFileError(f"{path} cannot be read (permission denied); check its permissions.") from None
    except UnicodeDecodeError:
        raise JobsFileError(f"{path} is not UTF-8 text; save it as a UTF-8 JSONL or CSV file.") from None


def _is_jsonl(text: str) -> bool:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first.startswith(("{", "["))  # no CSV header starts so; a list row is an error of its own


# ---------------------------------------------------------------------------- the two formats


def _jsonl(text: str) -> Iterator[Parsed]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield (
                number,
                (
                    f"line {number} is not valid JSON ({exc.msg} at column {exc.colno}); write one "
                    "JSON object per line."
                ),
            )


def _csv(text: str, path: Path) -> Iterator[Parsed]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = [name.strip() for name in next(reader, [])]
    _check_header(header, path)
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            yield (
                line,
                (
                    f"line {line} has {len(cells)} cells but the header names {len(header)} columns; "
                    "quote cells that hold commas."
                ),
            )
            continue
        values = {name: _cell(name, cell) for name, cell in zip(header, cells, strict=False) if cell != ""}
        yield line, values


def _check_header(header: list[str], path: Path) -> None:
    known = [ID_FIELD, *request_fields()]
    unknown = [name for name in header if name not in known]
    if unknown:
        raise JobsFileError(
            f"the first line of {path} is neither a JSON object nor a CSV header of known fields "
            f"({unknown[0]!r} is none); the fields are {', '.join(known)}."
        )
    repeated = [name for name in header if header.count(name) > 1]
    if repeated:
        raise JobsFileError(f"the CSV header of {path} names {repeated[0]!r} twice; give each column once.")


def _cell(name: str, text: str) -> Any:
    """A CSV cell as the JSON value its field wants: text where text is accepted, else parsed as JSON
    (``64``, ``4.5``, ``[7, 8, 9]``, ``true``); what does not parse stays text for the check to refuse."""
    if name in (ID_FIELD, "init_image"):
        return text
    try:
        return check_value(name, request_fields()[name].annotation, text)
    except RequestError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---------------------------------------------------------------------------- one row


def _row(
    line: int,
    index: int,
    data,
    taken: dict[str, int],
    batch_seed: int,
    folder: Path,
    load: Mapping[str, Any],
    check: Check | None,
) -> Row:
    if not isinstance(data, dict):  # a sentence: the line could not be read
        row_id, _ = _claim(str(line), line, taken)
        error = (
            data
            if isinstance(data, str)
            else (f'line {line} must be a JSON object such as {{"prompt": "..."}}, not {_kind(data)}.')
        )
        return Row(line, index, row_id, error=error)
    data = dict(data)
    row_id, problem = _claim(data.pop(ID_FIELD, str(line)), line, taken)
    if problem:
        return Row(line, index, None, error=problem)
    seed_from = "row"
    if data.get("seed") is None:
        data["seed"], seed_from = batch_seed + index, "batch"
    try:
        options, record = _options(data, folder, load, check)
    except PascalineError as exc:
        return Row(line, index, row_id, seed_from=seed_from, error=str(exc))
    return Row(line, index, row_id, options, record, seed_from)


def _claim(value: Any, line: int, taken: dict[str, int]) -> tuple[str | None, str | None]:
    """The row's id, taken for it, or (None, why it cannot be used)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None, f'the id must be text such as "cat-01", not {_kind(value)}.'
    if len(value) > MAX_ID_CHARS or not _SAFE_ID.fullmatch(value) or value.split(".")[0].lower() in _RESERVED:
        return None, (
            f"id {value!r} is not a safe file name; use up to {MAX_ID_CHARS} letters, digits, '.', "
            "'_' or '-', starting with a letter or digit."
        )
    key = value.lower()  # "Cat" and "cat" are one file on Windows and macOS
    if key in taken:
        return None, f"id {value!r} is already used by line {taken[key]}; give every row an id of its own."
    taken[key] = line
    return value, None


def _options(data: dict[str, Any], folder: Path, load: Mapping[str, Any], check: Check | None):
    """``(options, record)`` of a row's fields, checked by ``parse_request`` (and ``check``)."""
    image = data.pop("init_image", None)
    denoise = data.pop("denoise", None) if image is not None else None
    loras = data.get("loras")
    if isinstance(loras, list):  # paths relative to the JOBS file, as init_image's
        data["loras"] = [_lora_spec(spec, folder) if isinstance(spec, str) else spec for spec in loras]
    job = parse_request(data)
    other = {k: v for k, v in job.load.items() if load.get(k) != v}
    if other:
        name, value = next(iter(other.items()))
        runs = load.get(name) or "the one the command line gives"
        raise InvalidArgumentError(
            f"this row asks for {name} {value!r} but the batch runs {runs}; put rows "
            f"of another {name} in a batch of their own."
        )
    options, record = job.options, dict(job.record)
    if isinstance(loras, list):
        record["loras"] = loras  # as the row wrote them: the manifest compares rows, not folders
    if image is not None:
        options = replace(
            options, init_image=_image_path(image, folder), denoise=1.0 if denoise is None else denoise
        )
        record |= {"init_image": image} | ({} if denoise is None else {"denoise": denoise})
    if check is not None:
        check(options)
    return options, json.loads(json.dumps(record))  # lists for tuples: the form the manifest reads back


def _lora_spec(spec: str, folder: Path) -> str:
    """``"name:strength"`` with a relative name resolved in the JOBS file's folder."""
    from pascaline.lora.files import parse_lora_spec

    path, strength = parse_lora_spec(spec)
    if path.is_absolute():
        return spec
    if not (folder / path).is_file():
        raise InvalidArgumentError(
            f"LoRA {path} is not a file; give a path relative to the JOBS file's folder, or an absolute one."
        )
    return f"{(folder / path).resolve()}:{strength!r}"


def _image_path(value: Any, folder: Path) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"init_image must be the path of an image file, not {_kind(value)}.")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise InvalidArgumentError(
            f"init image {value} is not a file; give a path relative to the JOBS file's "
            "folder, or an absolute one."
        )
    return str(path.resolve())
