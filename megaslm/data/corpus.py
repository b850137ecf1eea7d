"""Demo corpora built from text that ships on this machine (no network).

- Clean math/science prose: docstrings (module, class, function) of the installed sympy, networkx and mpmath
  packages, read with `ast` (nothing is imported), whitespace-normalized, tiny ones (< 200 chars) and exact
  duplicates skipped. Each document is tagged with its package as `source`.
- Noisy web-like text from /usr/share/doc: Debian changelogs (`changelog*.gz`, source "changelog"), HTML
  manuals/release notes (raw markup kept, source "html"), and README/NEWS/*.txt/*.md files (source "text");
  each cut to its first 8 KB at a line boundary, duplicates skipped.

Both walk their files in an order shuffled by `seed` (so a small budget still samples many packages) and stop
once `max_bytes` of UTF-8 text has been yielded. `build_demo_corpora` writes the four JSONL files of the demo,
splitting clean documents by a hash of their text so the splits are disjoint.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator

import numpy as np

from megaslm.errors import UserError

CLEAN_PACKAGES = ("sympy", "networkx", "mpmath")
DOC_ROOT = "/usr/share/doc"
MIN_DOC_CHARS = 200
MAX_NOISY_DOC_BYTES = 8192


def _normalize(text: str) -> str:
    """Tabs to spaces, trailing spaces dropped, runs of blank lines collapsed to one."""
    lines = [ln.rstrip() for ln in text.expandtabs(4).split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def _docstrings(path: str) -> Iterator[str]:
    import ast
    import warnings

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _package_files(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return []
    root = os.path.dirname(spec.origin)
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("tests", "__pycache__"))
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _budgeted(docs: Iterable[dict], max_bytes: int) -> Iterator[dict]:
    """The distinct documents of at least MIN_DOC_CHARS characters, in order, until about max_bytes of text."""
    total, seen = 0, set()
    for doc in docs:
        if total >= max_bytes:
            return
        key = hashlib.sha1(doc["text"].encode("utf-8")).digest()
        if len(doc["text"]) < MIN_DOC_CHARS or key in seen:
            continue
        seen.add(key)
        total += len(doc["text"].encode("utf-8"))
        yield doc


def clean_documents(max_bytes: int, seed: int = 0) -> Iterator[dict]:
    """Docstrings of sympy/networkx/mpmath as {"text", "source"} dicts, about `max_bytes` in all."""
    files = [(pkg, f) for pkg in CLEAN_PACKAGES for f in _package_files(pkg)]
    if not files:
        raise UserError(f"no source files found for {', '.join(CLEAN_PACKAGES)} (looked for the installed "
                        "packages' .py files; install sympy)")
    order = np.random.default_rng(seed).permutation(len(files))

    def gen() -> Iterator[dict]:
        for i in order:
            pkg, path = files[i]
            for doc in _docstrings(path):
                yield {"text": _normalize(doc), "source": pkg}

    return _budgeted(gen(), max_bytes)


def _noisy_files() -> list[tuple[str, str]]:
    """(kind, path) of every candidate noisy file, sorted, one per real path."""
    out, seen = [], set()
    if not os.path.isdir(DOC_ROOT):
        return out
    for d, dirs, names in os.walk(DOC_ROOT):
        dirs.sort()
        for n in sorted(names):
            path = os.path.join(d, n)
            low = n.lower()
            if low.startswith("changelog") and low.endswith(".gz"):
                kind = "changelog"
            elif low.endswith((".html", ".htm", ".html.gz")):
                kind = "html"
            elif low.startswith(("readme", "news")) or low.endswith((".txt", ".md", ".txt.gz", ".md.gz")):
                kind = "text"
            else:
                continue
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            out.append((kind, path))
    return out


def _read_head(path: str, limit: int) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(limit + 1)
    except (OSError, EOFError):
        return ""
    if len(raw) > limit:  # cut at the last line break, so no line or UTF-8 character is split
        cut = raw.rfind(b"\n", 0, limit)
        raw = raw[:cut if cut > 0 else limit]
    if b"\0" in raw:  # binary
        return ""
    return raw.decode("utf-8", errors="replace")


def noisy_documents(max_bytes: int, seed: int = 0) -> Iterator[dict]:
    """Debian changelogs, HTML and README-like files from /usr/share/doc as {"text", "source"} dicts."""
    files = _noisy_files()
    if not any(kind == "changelog" for kind, _ in files):
        raise UserError(f"no Debian changelogs found (looked for {DOC_ROOT}/*/changelog*.gz); the noisy demo "
                        "corpus needs a Debian-like system")
    order = np.random.default_rng(seed).permutation(len(files))

    def gen() -> Iterator[dict]:
        for i in order:
            kind, path = files[i]
            yield {"text": _read_head(path, MAX_NOISY_DOC_BYTES).strip(), "source": kind}

    return _budgeted(gen(), max_bytes)


def write_jsonl(docs: Iterable[dict], path: str) -> tuple[int, int]:
    """Write one JSON object per line (atomically: temp file, then rename); returns (documents, text bytes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    n = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n += 1
                size += len(doc["text"].encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n, size


def build_demo_corpora(out_dir: str, clean_bytes: int = 1_500_000, noisy_bytes: int = 3_000_000,
                       valid_bytes: int = 200_000, seed: int = 0, noise_fraction: float = 0.5) -> dict[str, str]:
    """Write the demo's corpora to `out_dir` and return {name: path}:

    - `clean_train`: clean prose for the reference model (~clean_bytes);
    - `noisy_train_clean` + `noisy_train_noise`: the noisy training corpus (~noisy_bytes in all, a
      `noise_fraction` of it noise), as two files so `prepare` records two sources;
    - `clean_valid`: held-out clean prose (~valid_bytes).

    Each clean document goes to the split chosen by a hash of its text (and is dropped if that split is
    already full), so the three clean splits never share a document."""
    if not 0.0 <= noise_fraction <= 1.0:
        raise UserError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    budgets = {"clean_train": int(clean_bytes), "noisy_train_clean": int(round(noisy_bytes * (1 - noise_fraction))),
               "clean_valid": int(valid_bytes)}
    total = sum(budgets.values())
    if total <= 0:
        raise UserError("build_demo_corpora: all clean budgets are zero")
    names = list(budgets)
    edges = np.cumsum([budgets[k] / total for k in names])
    splits: dict[str, list[dict]] = {k: [] for k in names}
    filled = {k: 0 for k in names}
    for doc in clean_documents(max_bytes=1 << 62, seed=seed):
        h = int.from_bytes(hashlib.sha256(doc["text"].encode("utf-8")).digest()[:8], "big") / 2.0**64
        name = names[min(int(np.searchsorted(edges, h, side="right")), len(names) - 1)]
        if filled[name] >= budgets[name]:
            if all(filled[k] >= budgets[k] for k in names):
                break
            continue
        splits[name].append(doc)
        filled[name] += len(doc["text"].encode("utf-8"))
    for k in names:
        if budgets[k] > 0 and not splits[k]:
            raise UserError(f"not enough clean text for the {k} split (wanted {budgets[k]} bytes)")
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("clean_train", "noisy_train_clean",
                                                             "noisy_train_noise", "clean_valid")}
    for k in names:
        write_jsonl(splits[k], paths[k])
    noise_budget = int(round(noisy_bytes * noise_fraction))
    write_jsonl(noisy_documents(noise_budget, seed=seed) if noise_budget > 0 else [], paths["noisy_train_noise"])
    return paths
