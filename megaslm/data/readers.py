"""Streaming readers for local text corpora, shared by tokenizer training and `prepare`.

Supported files (a `.gz` suffix on any text format is decompressed on the fly):

- `.txt`, `.txt.gz`: a document is a block of text separated from the next by a blank line (`"\\n\\n"` after
  universal-newline translation, as the `sample_by="paragraph"` mode of the `datasets` text builder). Leading /
  trailing newlines of a block are stripped. A file is read 10 MB at a time, so memory stays bounded unless one
  block is huge.
- `.jsonl`, `.jsonl.gz`: one document per line (blank lines skipped), taken from `text_field`.
- `.json`, `.json.gz`: JSON lines or one JSON array (an array is loaded whole by `datasets`).
- `.parquet`: one document per row, column `text_field`; read a record batch at a time.

Text that is not valid UTF-8: in `.txt` and `.jsonl` the offending block / line is reported with the file and
its number (1-based) to `BadInput`, and skipped (`on_bad_utf8="skip"`) or refused (`"error"`, a UserError).
A `.json` file with bad bytes is refused whole (its parser decodes the file at once); parquet strings are
UTF-8 by construction. `.txt` and `.jsonl` are read here; `.json` and `.parquet` through
`datasets.load_dataset(..., streaming=True)`. Nothing is cached to disk or loaded whole.

Empty documents (empty string, whitespace only, or null) are skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from megaslm.errors import UserError

_BUILDERS = {
    ".txt": "text",
    ".txt.gz": "text",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
SUPPORTED_SUFFIXES = tuple(_BUILDERS)
BAD_UTF8_POLICIES = ("skip", "error")
_CHUNK = 10 << 20
_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes


@dataclass
class BadInput:
    """Documents dropped because their bytes are not UTF-8: where they were, and the policy that applies."""
    on_bad_utf8: str = "error"
    found: list[str] = field(default_factory=list)  # "FILE: document N" / "FILE: line N"

    def report(self, path: str, where: str) -> None:
        msg = f"{path}: {where} is not valid UTF-8"
        if self.on_bad_utf8 == "error":
            raise UserError(f"{msg}; fix the file, or pass --on-bad-utf8 skip to leave such documents out")
        self.found.append(f"{path}: {where}")


def _suffix(path: str) -> str | None:
    name = os.path.basename(path).lower()
    for suffix in sorted(_BUILDERS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def is_supported(path: str) -> bool:
    return _suffix(path) is not None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Resolve the input list: files are kept as given, a directory contributes its supported files
    (recursively, sorted by path). Missing paths and unsupported files raise UserError."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input files given")
    out: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.join(root, f) for f in files if not f.startswith(".") and is_supported(f)]
            if not found:
                raise UserError(f"input directory {path} has no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
            out += sorted(found)
        elif os.path.isfile(path):
            if not is_supported(path):
                raise UserError(
                    f"input {path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
                )
            out.append(path)
        else:
            raise UserError(f"input {path} does not exist")
    return out


def _open_text(path: str, **kw):
    return gzip.open(path, "rt", **kw) if path.lower().endswith(".gz") else open(path, **kw)


def _txt_blocks(path: str, bad: BadInput) -> Iterator[str]:
    """Blank-line-separated blocks, read 10 MB at a time; undecodable blocks go to `bad`."""
    n = 0

    def checked(block: str):
        nonlocal n
        n += 1
        if _SURROGATE.search(block):
            bad.report(path, f"document {n}")
            return None
        return block

    with _open_text(path, encoding="utf-8", errors="surrogateescape") as f:
        rest = ""
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            parts = (rest + chunk + f.readline()).split("\n\n")
            rest = parts.pop()
            for block in parts:
                if block and (block := checked(block)) is not None:
                    yield block
        if rest and (rest := checked(rest)) is not None:
            yield rest


def _jsonl_records(path: str, bad: BadInput) -> Iterator[dict]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.report(path, f"line {n}")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"input {path} line {n} is not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise UserError(f"input {path} line {n} is not a JSON object")
            yield rec


def _own_batches(path: str, suffix: str, fields: list[str], batch_size: int, bad: BadInput):
    if suffix.startswith(".txt"):
        rows = ({"text": b} for b in _txt_blocks(path, bad))
    else:
        rows = _jsonl_records(path, bad)
    cols: dict[str, list] = {f: [] for f in fields}
    for n, rec in enumerate(rows, 1):
        for f in fields:
            if f not in rec:
                raise UserError(f"input {path} has no field {f!r} (record {n} has: {', '.join(rec) or 'none'})")
            cols[f].append(rec[f])
        if len(cols[fields[0]]) >= batch_size:
            yield cols
            cols = {f: [] for f in fields}
    if cols[fields[0]]:
        yield cols


def iter_column_batches(path: str, fields: list[str], batch_size: int = 1000,
                        bad: BadInput | None = None) -> Iterator[dict[str, list]]:
    """Yield {field: values} for batches of at most `batch_size` records of one file, in file order (a `.txt`
    file has the one field "text"). A missing field is a UserError naming the file."""
    suffix = _suffix(path)
    if suffix is None:
        raise UserError(f"input {path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not os.path.isfile(path):
        raise UserError(f"input {path} does not exist")
    bad = bad or BadInput()
    try:
        if suffix.startswith((".txt", ".jsonl")):
            yield from _own_batches(path, suffix, fields, batch_size, bad)
        else:
            yield from _datasets_batches(path, suffix, fields, batch_size)
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"input {path} is not valid UTF-8 ({e}); fix or drop the file") from e
    except (ValueError, OSError, KeyError, TypeError, EOFError) as e:
        # datasets / pyarrow / gzip raise these for malformed JSON, bad parquet, bad gzip.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"input {path} could not be read: {first_line}") from e


def iter_text_batches(path: str, text_field: str = "text", batch_size: int = 1000,
                      bad: BadInput | None = None) -> Iterator[list[str]]:
    """Yield lists of (at most `batch_size`) non-empty documents from one file, in file order."""
    field_name = "text" if _suffix(path) in (".txt", ".txt.gz") else text_field
    txt = field_name == "text" and str(_suffix(path)).startswith(".txt")
    for cols in iter_column_batches(path, [field_name], batch_size, bad):
        texts = []
        for value in cols[field_name]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"input {path}: field {field_name!r} holds {type(value).__name__}, not text")
            if txt:
                value = value.strip("\n")
            if value.strip():
                texts.append(value)
        if texts:
            yield texts


def _datasets_batches(path: str, suffix: str, fields: list[str], batch_size: int) -> Iterator[dict[str, list]]:
    import datasets

    builder = _BUILDERS[suffix]
    datasets.disable_progress_bars()
    data_file = os.path.abspath(path)
    link_dir = None
    if re.search(r"[][*?{}!#%:]", data_file):
        # datasets reads data_files as glob patterns / fsspec URLs ("gzip://...::path"), which names like
        # "part[1].json.gz" break; hand it a plain-named symlink instead.
        link_dir = tempfile.mkdtemp(prefix="megaslm-input-")
        os.symlink(data_file, os.path.join(link_dir, "input" + suffix))
        data_file = os.path.join(link_dir, "input" + suffix)
    try:
        ds = datasets.load_dataset(builder, data_files=[data_file], split="train", streaming=True)
        for batch in ds.iter(batch_size=batch_size):
            for f in fields:
                if f not in batch:
                    raise UserError(f"input {path} has no field {f!r} (fields: {', '.join(batch) or 'none'})")
            yield {f: batch[f] for f in fields}
    finally:
        if link_dir is not None:
            shutil.rmtree(link_dir, ignore_errors=True)
