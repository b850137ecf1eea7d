"""The UTF-8 bytes of every token of a tokenizer, for laying two tokenizations on the same bytes (align.py).

Supported: SentencePiece models (megaslm's own `tokenizer train`, Llama/Mistral `.model` files: "▁" is a space,
`<0xNN>` byte-fallback pieces are one byte) and Hugging Face tokenizers whose pieces are byte-level BPE strings
(GPT-2, Llama-3, Qwen, SmolLM2: each character stands for one byte) or SentencePiece-style pieces. Control and
special tokens (EOS, BOS, added tokens) have no bytes: they are `None` in the table.

A tokenizer that prepends a "dummy prefix" space (SentencePiece's default) encodes "a" as "▁a": `dummy_prefix` is
True and `encode_spans` drops that space, so the spans always cover exactly the bytes of the text given.
"""

from __future__ import annotations

import re

import numpy as np

from megaslm.errors import UserError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenBytes:
    """`table[id]`: the bytes of token id, or None for a special token; `dummy_prefix`; `encode_spans`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.table = _sentencepiece_table(tokenizer) if hasattr(tokenizer, "_sp") else _hf_table(tokenizer)
        self.lengths = np.array([-1 if b is None else len(b) for b in self.table], np.int64)
        probe = tokenizer.encode_batch(["a"])[0]
        self.dummy_prefix = b"".join(self.table[i] or b"" for i in probe) == b" a"
        self._plain = _without_dummy_prefix(tokenizer) if self.dummy_prefix else None

    def bytes_of(self, ids) -> list[bytes | None]:
        return [self.table[int(i)] for i in ids]

    def encode_spans(self, texts: list[bytes],
                     doc_start: list[bool] | None = None) -> list[tuple[list[int], np.ndarray]]:
        """Each text (valid UTF-8 bytes) as (token ids, int64 [n, 2] byte spans of the tokens within it). A text
        that does not start a document is encoded without the dummy prefix where the tokenizer allows it (a
        SentencePiece model); else a dummy-prefix space is dropped from the first token's span (which may become
        empty). UserError when the tokenizer's pieces do not spell the text (a normalizing tokenizer)."""
        strs = [t.decode("utf-8") for t in texts]
        encoded = self.tokenizer.encode_batch(strs)
        if self._plain is not None and doc_start is not None:
            mid = [i for i, start in enumerate(doc_start) if not start]
            for i, ids in zip(mid, self._plain.encode([strs[i] for i in mid], out_type=int)):
                encoded[i] = ids
        out = []
        for text, ids in zip(texts, encoded):
            lengths = self.lengths[np.asarray(ids, np.int64)] if ids else np.zeros(0, np.int64)
            if (lengths < 0).any():
                raise UserError(f"tokenizer {self.tokenizer.path} made a special token of text {text[:60]!r}")
            spans, spelled = _spans(lengths), b"".join(self.bytes_of(ids))
            if spelled != text:
                if not (self.dummy_prefix and spelled == b" " + text):
                    raise UserError(f"tokenizer {self.tokenizer.path}: its tokens do not spell the text "
                                    f"{text[:60]!r} byte for byte (a normalizing tokenizer?); it cannot be aligned "
                                    "by bytes")
                spans = np.maximum(spans - 1, 0)  # the dummy space is not in the text
            out.append((list(ids), spans))
        return out


def _without_dummy_prefix(tok):
    """A SentencePiece processor of the same model that adds no dummy prefix (None for other tokenizers)."""
    if not hasattr(tok, "_sp"):
        return None
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok._data)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _spans(lengths: np.ndarray) -> np.ndarray:
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1) if len(ends) else np.zeros((0, 2), np.int64)


def _sentencepiece_table(tok) -> list[bytes | None]:
    sp = tok._sp
    table: list[bytes | None] = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            table.append(None)
        elif sp.is_byte(i):
            table.append(bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)]))
        else:
            table.append(piece.replace("▁", " ").encode("utf-8"))
    return table


def _hf_table(tok) -> list[bytes | None]:
    hf = tok._tok
    special = set(hf.all_special_ids) | {int(i) for i in getattr(hf, "added_tokens_decoder", {})}
    pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
    byte_level = "ByteLevel" in hf.backend_tokenizer.to_str() if hasattr(hf, "backend_tokenizer") else False
    decode = _byte_level_decoder()
    table: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(None)
        elif byte_level:
            try:
                table.append(bytes(decode[c] for c in piece))
            except KeyError:
                table.append(piece.encode("utf-8"))
        else:
            m = _BYTE_PIECE.fullmatch(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    return table
