"""Streaming readers for local text corpora, shared by tokenizer training and `prepare`.

Supported files (a `.gz` suffix on any text format is decompressed on the fly):

- `.txt`, `.txt.gz`: a document is a block of text separated from the next by a blank line (`"\\n\\n"`, the
  `sample_by="paragraph"` mode of the `datasets` text builder). Leading/trailing newlines of a block are
  stripped; undecodable bytes become U+FFFD. A file is read 10 MB at a time, so memory stays bounded unless
  one block is huge.
- `.jsonl`, `.jsonl.gz`, `.json`, `.json.gz`: one document per record, taken from `text_field`.
  `.json` may be JSON lines or one JSON array (an array is loaded whole by `datasets`).
- `.parquet`: one document per row, column `text_field`; read a record batch at a time.

Empty documents (empty string, whitespace only, or null) are skipped. Every reader goes through
`datasets.load_dataset(..., streaming=True)`, so nothing is cached to disk or loaded whole.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator

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


def iter_text_batches(path: str, text_field: str = "text", batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield lists of (at most `batch_size`) non-empty documents from one file, in file order."""
    import datasets

    suffix = _suffix(path)
    if suffix is None:
        raise UserError(f"input {path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not os.path.isfile(path):
        raise UserError(f"input {path} does not exist")
    builder = _BUILDERS[suffix]
    # Undecodable bytes in plain text become U+FFFD instead of failing the whole file.
    kwargs = {"sample_by": "paragraph", "encoding_errors": "replace"} if builder == "text" else {}
    field = "text" if builder == "text" else text_field
    datasets.disable_progress_bars()
    data_file = os.path.abspath(path)
    link_dir = None
    if re.search(r"[][*?{}!#%:]", data_file):
        # datasets reads data_files as glob patterns / fsspec URLs ("gzip://...::path"), which names like
        # "part[1].jsonl.gz" break; hand it a plain-named symlink instead.
        link_dir = tempfile.mkdtemp(prefix="megaslm-input-")
        os.symlink(data_file, os.path.join(link_dir, "input" + suffix))
        data_file = os.path.join(link_dir, "input" + suffix)
    try:
        ds = datasets.load_dataset(builder, data_files=[data_file], split="train", streaming=True, **kwargs)
        for batch in ds.iter(batch_size=batch_size):
            if field not in batch:
                raise UserError(f"input {path} has no field {field!r} (fields: {', '.join(batch) or 'none'})")
            texts = []
            for value in batch[field]:
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise UserError(f"input {path}: field {field!r} holds {type(value).__name__}, not text")
                if builder == "text":
                    value = value.strip("\n")
                if value.strip():
                    texts.append(value)
            if texts:
                yield texts
    except UserError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as e:
        # datasets / pyarrow raise these for malformed JSON, bad parquet, bad gzip, undecodable text.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"input {path} could not be read: {first_line}") from e
    finally:
        if link_dir is not None:
            shutil.rmtree(link_dir, ignore_errors=True)
