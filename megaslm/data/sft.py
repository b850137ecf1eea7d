"""Supervised fine-tuning records -> text segments with a loss flag (what `prepare` writes as a loss mask).

A document is a list of `(text, takes_loss)` segments; each segment is tokenized on its own and the ids are
concatenated, so the mask boundary falls exactly between the prompt and the response tokens.

- prompt/response (`--prompt-field P --response-field R`): `[(prompt + "\\n", False), (response, True)]`.
- chat (`--messages-field M`, a list of `{role, content}`): every turn is a header `"<role>: "` (never a loss)
  followed by `content + "\\n"`, which takes a loss when the role is `assistant`.
The document's EOS takes the mask of its last token (so a response's end is learnt). A record whose response is
null or empty contributes its prompt only (no loss tokens); a record with nothing in it is skipped.
"""

from __future__ import annotations

from megaslm.errors import UserError

Segments = list[tuple[str, bool]]


def pair_segments(prompt, response, where: str) -> Segments:
    for name, v in (("prompt", prompt), ("response", response)):
        if v is not None and not isinstance(v, str):
            raise UserError(f"{where}: the {name} field holds {type(v).__name__}, not text")
    segs = [(s, loss) for s, loss in (((prompt or "") + "\n", False), (response or "", True)) if s.strip()]
    return segs


def chat_segments(messages, where: str) -> Segments:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise UserError(f"{where}: the messages field holds {type(messages).__name__}, not a list of "
                        "{role, content}")
    segs: Segments = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} is not a {{role, content}} mapping of strings: {m!r}"[:300])
        segs.append((f"{m['role']}: ", False))
        segs.append((m["content"] + "\n", m["role"] == "assistant"))
    return segs


def record_segments(cols: dict[str, list], fields: dict[str, str], where: str) -> list[Segments]:
    """The segments of each record of one column batch; `fields` maps prompt/response or messages to columns."""
    if "messages" in fields:
        docs = [chat_segments(m, where) for m in cols[fields["messages"]]]
    else:
        docs = [pair_segments(p, r, where) for p, r in zip(cols[fields["prompt"]], cols[fields["response"]])]
    return [d for d in docs if d]
