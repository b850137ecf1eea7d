"""`megaslm analyze tokens`: which tokens the reference makes Rho-1 keep, as a page and as data.

Both models score the same documents (see megaslm/analyze/documents.py); the selection is the training path's
own `select_tokens` with scope "global" over all analyzed tokens at once, so exactly ceil(ratio * n) of the n
tokens are selected (ties: lower position in the analysis wins).

Outputs in DIR:
- `tokens.jsonl`: one row per token, in document order: `doc` (index in the analysis), `pos` (position in the
  document), `token_id`, `piece` (its text), `loss`, `ref_loss` (nats), `excess` (loss - ref_loss), `selected`.
- `tokens.html`: the token page (megaslm/analyze/html.py) with tables per source and per document.
- `summary.json`: per-source and overall figures (the tables of the page).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from megaslm.analyze import html as page
from megaslm.analyze.documents import Document, document_windows, pieces, read_documents
from megaslm.analyze.media import log_media
from megaslm.analyze.scoring import check_same_tokenizer, load_scorer, pick_device, score_windows
from megaslm.atomic import write_json, write_text
from megaslm.errors import UserError
from megaslm.loss import select_tokens


def document_losses(scorer, docs: list[Document], eos_id: int, seq_len: int, batch_size: int,
                    desc: str) -> list[np.ndarray]:
    """One loss per token of each document."""
    windows, owner = [], []
    for i, d in enumerate(docs):
        w = document_windows(d.ids, eos_id, seq_len)
        windows += w
        owner += [i] * len(w)
    losses = score_windows(scorer, windows, batch_size=batch_size, pad_id=eos_id, desc=desc)
    per_doc: list[list[np.ndarray]] = [[] for _ in docs]
    for i, v in zip(owner, losses):
        per_doc[i].append(v)
    return [np.concatenate(v) for v in per_doc]


def select_all(loss: list[np.ndarray], ref: list[np.ndarray], ratio: float) -> list[np.ndarray]:
    """The training selection (global scope) over every analyzed token, split back per document."""
    excess = torch.from_numpy(np.concatenate([a - b for a, b in zip(loss, ref)])).view(1, -1)
    mask = select_tokens(excess, torch.ones_like(excess, dtype=torch.bool), ratio, scope="global").view(-1).numpy()
    return np.split(mask, np.cumsum([len(a) for a in loss])[:-1])


def _stats(loss, ref, sel) -> dict:
    n = int(sum(len(a) for a in loss))
    cat = [np.concatenate(x) if x else np.zeros(0) for x in (loss, ref, sel)]
    return {"tokens": n, "selected": int(cat[2].sum()), "selected_frac": float(cat[2].mean()) if n else float("nan"),
            "mean_loss": float(cat[0].mean()) if n else float("nan"),
            "mean_ref_loss": float(cat[1].mean()) if n else float("nan"),
            "mean_excess": float((cat[0] - cat[1]).mean()) if n else float("nan")}


def summarize(docs: list[Document], names: list[str], loss, ref, sel) -> dict:
    by_source = {}
    for s, name in enumerate(names):
        idx = [i for i, d in enumerate(docs) if d.source == s]
        if idx:
            by_source[name] = {"documents": len(idx), **_stats(*([x[i] for i in idx] for x in (loss, ref, sel)))}
    return {"all": _stats(loss, ref, sel), "sources": by_source,
            "documents": [{"doc": d.index, "source": names[d.source], **_stats([loss[i]], [ref[i]], [sel[i]])}
                          for i, d in enumerate(docs)]}


def write_jsonl(path: Path, docs, piece_lists, loss, ref, sel) -> None:
    lines = []
    for d, ps, lo, re_, se in zip(docs, piece_lists, loss, ref, sel):
        for pos in range(len(d.ids)):
            lines.append(json.dumps({"doc": d.index, "pos": pos, "token_id": int(d.ids[pos]), "piece": ps[pos],
                                     "loss": float(lo[pos]), "ref_loss": float(re_[pos]),
                                     "excess": float(lo[pos] - re_[pos]), "selected": bool(se[pos])},
                                    ensure_ascii=False))
    write_text(path, "\n".join(lines) + "\n")


def _tables(summary: dict) -> list[tuple[str, str]]:
    cols = ["selected_frac", "mean_loss", "mean_ref_loss", "mean_excess"]
    heads = ["tokens", "selected", "selected fraction", "mean loss", "mean ref loss", "mean excess"]
    src_rows = [[name, s["documents"], s["tokens"], s["selected"], *[s[c] for c in cols]]
                for name, s in summary["sources"].items()]
    a = summary["all"]
    src_rows.append(["all", len(summary["documents"]), a["tokens"], a["selected"], *[a[c] for c in cols]])
    doc_rows = [[d["doc"], d["source"], d["tokens"], d["selected"], *[d[c] for c in cols]]
                for d in summary["documents"]]
    return [("Per source", page.table(["source", "documents", *heads], src_rows), True),
            (f"Per document ({len(doc_rows)})", page.table(["doc", "source", *heads], doc_rows), len(doc_rows) <= 12)]


def analyze_tokens(model: str, reference: str, data: list[str], out: str, *, text_field: str = "text",
                   docs: int = 20, seq_len: int = 256, ratio: float = 0.6, batch_size: int = 8) -> dict:
    if not 0 < ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {ratio}")
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    t0 = time.time()
    device = pick_device()
    m, r = load_scorer(model, device), load_scorer(reference, device)
    check_same_tokenizer(m, r)
    tok = m.tokenizer or r.tokenizer
    documents, names = read_documents(data, tok, m.vocab_size, docs, text_field, model)
    eos = tok.eos_id if tok else int(m.model.lm.config.eos_token_id)
    loss = document_losses(m, documents, eos, seq_len, batch_size, "model")
    ref = document_losses(r, documents, eos, seq_len, batch_size, "reference")
    sel = select_all(loss, ref, ratio)
    piece_lists = [pieces(tok, d.ids) for d in documents]

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    write_jsonl(dest / "tokens.jsonl", documents, piece_lists, loss, ref, sel)
    summary = summarize(documents, names, loss, ref, sel)
    summary.update(model=model, reference=reference, data=data, ratio=ratio, seq_len=seq_len,
                   device=str(device), seconds=time.time() - t0)
    views = [page.DocView(f"doc {d.index} · {names[d.source]} · {len(d.ids)} tokens · selected "
                          f"{summary['documents'][i]['selected_frac']:.2f}", piece_lists[i], loss[i], ref[i], sel[i])
             for i, d in enumerate(documents)]
    notes = [f"model {model}; reference {reference}; data {', '.join(data)}.",
             f"Selection: the top {ratio:g} of all {summary['all']['tokens']} analyzed tokens by excess loss "
             f"({summary['all']['selected']} selected), as training selects with scope global. "
             "Hover a token for its loss, reference loss and excess."]
    write_text(dest / "tokens.html", page.render_page("megaslm analyze tokens", notes, views, _tables(summary)))
    write_json(dest / "summary.json", summary)
    log_media(m.run_dir, {"analyze/tokens": dest / "tokens.html"})
    return summary
