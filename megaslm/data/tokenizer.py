"""Tokenizers: train a SentencePiece BPE model, or load one (a `.model` file, a directory written by
`train_tokenizer`/`save_pretrained`, or a Hugging Face tokenizer directory).

Everything downstream sees one small `Tokenizer` interface: `vocab_size`, `eos_id`, `bos_id`,
`fingerprint` (sha256 of the model file, recorded in the shards' meta.json so a model is never trained on
shards tokenized by a different tokenizer), `encode_batch` (no BOS/EOS added), `decode`, `save_pretrained`.

Trained models follow the Llama convention: BPE with byte fallback (no unknown characters), ids
unk=0, bos=1, eos=2, no pad id, no text normalization, digits split, a dummy prefix space.

`save_pretrained(dir)` writes the raw `tokenizer.model` (so `load_tokenizer(dir)` gives the same
fingerprint) plus `tokenizer.json`/`tokenizer_config.json`, an equivalent `tokenizers` pipeline that
`transformers.AutoTokenizer.from_pretrained(dir)` loads offline. That HF tokenizer adds no BOS/EOS by
default and treats special-token text literally (`split_special_tokens`), exactly like `encode_batch`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator

from megaslm.atomic import write_bytes
from megaslm.data.readers import BadInput, expand_inputs, iter_text_batches
from megaslm.errors import UserError

MODEL_FILE = "tokenizer.model"
# Files that make up a Hugging Face tokenizer; save_pretrained copies them verbatim.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
             "chat_template.json")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Common interface; use `load_tokenizer` to get one."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    fingerprint: str
    path: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save_pretrained(self, out_dir: str) -> str:
        """Write files that both `load_tokenizer` and `transformers.AutoTokenizer` load; returns out_dir."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"sha256={self.fingerprint[:12]})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Pickles as its model bytes (a few hundred KB), so workers rebuild it cheaply."""

    def __init__(self, model_file: str):
        with open(model_file, "rb") as f:
            data = f.read()
        self._init(model_file, data)

    def _init(self, path: str, data: bytes) -> None:
        import sentencepiece as spm

        self.path = path
        self._data = data
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise UserError(f"tokenizer {path} is not a valid SentencePiece model ({e})") from e
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self._sp.vocab_size())
        if self._sp.eos_id() < 0:
            raise UserError(f"tokenizer {path} has no EOS piece; documents need an end-of-sequence id")
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def __getstate__(self):
        return {"path": self.path, "data": self._data}

    def __setstate__(self, state):
        self._init(state["path"], state["data"])

    # Threads for batch encoding; -1 = all cores. prepare's worker processes set 1 to avoid oversubscription.
    num_threads: int = -1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save_pretrained(self, out_dir: str) -> str:
        from transformers import PreTrainedTokenizerFast

        os.makedirs(out_dir, exist_ok=True)
        proto = _model_proto(self._data)
        spec = proto.trainer_spec
        specials = {}
        for key, idx in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                         ("pad_token", spec.pad_id)):
            if 0 <= idx < len(proto.pieces):
                specials[key] = proto.pieces[idx].piece
        hf = PreTrainedTokenizerFast(tokenizer_object=_hf_backend(proto), split_special_tokens=True,
                                     clean_up_tokenization_spaces=False, model_max_length=int(1e30), **specials)
        hf.save_pretrained(out_dir)
        write_bytes(os.path.join(out_dir, MODEL_FILE), self._data)
        return out_dir


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, loaded with AutoTokenizer (offline)."""

    def __init__(self, directory: str):
        self.path = directory
        self._tok = _load_hf(directory)
        tok = self._tok
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer {directory} defines no eos_token; documents need an end-of-sequence id")
        self.vocab_size = len(tok)
        self.eos_id = int(tok.eos_token_id)
        self.bos_id = int(tok.bos_token_id) if tok.bos_token_id is not None else None
        tj = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tj):
            self.fingerprint = _sha256_file(tj)
        else:  # e.g. vocab.json + merges.txt: hash every tokenizer file, by name
            h = hashlib.sha256()
            for name in sorted(os.listdir(directory)):
                if name in _HF_FILES:
                    h.update(name.encode() + b"\0" + bytes.fromhex(_sha256_file(os.path.join(directory, name))))
            self.fingerprint = h.hexdigest()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self._tok(list(texts), add_special_tokens=False, split_special_tokens=True,
                        return_attention_mask=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save_pretrained(self, out_dir: str) -> str:
        # Copy the files verbatim: re-serializing could change tokenizer.json's bytes and so the fingerprint.
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(self.path):
            if name in _HF_FILES:
                shutil.copyfile(os.path.join(self.path, name), os.path.join(out_dir, name))
        return out_dir


def _load_hf(directory: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError... with long messages
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer {directory} could not be loaded by transformers: {msg}") from e


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a SentencePiece `.model` file, a directory holding `tokenizer.model`
    (what `train_tokenizer`/`save_pretrained` write; read with SentencePiece), or a Hugging Face tokenizer
    directory (`tokenizer.json`, `tokenizer_config.json`, ...). Anything else raises UserError."""
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    if os.path.isdir(spec):
        model = os.path.join(spec, MODEL_FILE)
        if os.path.isfile(model):
            return SentencePieceTokenizer(model)
        if any(os.path.isfile(os.path.join(spec, n)) for n in _HF_FILES):
            return HFTokenizer(spec)
        raise UserError(f"tokenizer {spec} is a directory with neither {MODEL_FILE} nor Hugging Face tokenizer "
                        "files (tokenizer.json, tokenizer_config.json)")
    if os.path.isfile(spec):
        if spec.endswith(".model"):
            return SentencePieceTokenizer(spec)
        raise UserError(f"tokenizer {spec} is not a SentencePiece .model file or a tokenizer directory")
    raise UserError(f"tokenizer {spec} does not exist")


def _sentences(inputs: list[str], text_field: str, max_sentence_bytes: int) -> Iterator[str]:
    # SentencePiece skips "sentences" longer than max_sentence_length, so feed lines, cut to that size.
    for path in inputs:
        for batch in iter_text_batches(path, text_field, bad=BadInput("skip")):  # prepare reports them
            for doc in batch:
                for line in doc.split("\n"):
                    if not line.strip():
                        continue
                    raw = line.encode("utf-8")
                    for i in range(0, len(raw), max_sentence_bytes):
                        yield raw[i:i + max_sentence_bytes].decode("utf-8", errors="ignore")


def train_tokenizer(inputs: list[str], vocab_size: int, out_dir: str, text_field: str = "text",
                    max_sentences: int = 2_000_000, num_threads: int | None = None) -> str:
    """Train a SentencePiece BPE tokenizer (Llama convention, see module doc) on local text files read like
    `prepare` reads them; write `out_dir/tokenizer.model` atomically and return out_dir.

    Lines are streamed to the trainer, which keeps a uniform sample of `max_sentences` of them, so memory
    is bounded by the sample, not the corpus."""
    import sentencepiece as spm

    if int(vocab_size) < 1:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    files = expand_inputs(inputs)
    max_len = 16384
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(files, text_field, max_len),
            model_writer=model,
            model_type="bpe",
            vocab_size=int(vocab_size),
            byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            max_sentence_length=max_len,
            input_sentence_size=int(max_sentences),
            shuffle_input_sentence=True,
            num_threads=num_threads or max(1, min(16, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except UserError:
        raise
    except RuntimeError as e:
        # Drop the C++ location prefix ("INTERNAL: src/trainer_interface.cc(744) [check] ") of the message.
        msg = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", " ".join(str(e).split()))
        if "ocabulary size" in msg or "vocab" in msg.lower():
            raise UserError(f"cannot train a tokenizer with vocab_size {vocab_size} on {', '.join(inputs)}: "
                            f"{msg}") from e
        raise UserError(f"sentencepiece training failed on {', '.join(inputs)}: {msg}") from e
    if not model.getvalue():
        raise UserError(f"sentencepiece produced no model from {', '.join(inputs)} (is the text empty?)")
    os.makedirs(out_dir, exist_ok=True)
    write_bytes(os.path.join(out_dir, MODEL_FILE), model.getvalue())
    return out_dir


# ---- SentencePiece -> tokenizers (for transformers) -------------------------------------------------------

def _model_proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def _hf_backend(proto):
    """Build a `tokenizers.Tokenizer` that reproduces SentencePiece's encoding of this model.

    SentencePiece: normalize (charsmap), optionally drop extra whitespace, prepend a dummy '▁', replace
    spaces by '▁', then BPE/unigram over the whole string with byte fallback. The tokenizers pipeline below
    does the same steps with no pre-tokenizer (a Metaspace pre-tokenizer would treat leading spaces
    differently)."""
    from tokenizers import Regex, decoders, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE, Unigram

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    unk = pieces[spec.unk_id] if 0 <= spec.unk_id < len(pieces) else None
    byte_fallback = bool(spec.byte_fallback)
    if spec.model_type == 2:  # BPE
        vocab = {p: i for i, p in enumerate(pieces)}
        # A merge (a, b) exists for every normal piece a+b whose halves are pieces; SentencePiece merges the
        # adjacent pair whose result scores highest, so merges are ranked by the result's score.
        normal = {i for i, p in enumerate(proto.pieces) if p.type == 1}
        ranked = []
        for i, piece in enumerate(pieces):
            if i not in normal or len(piece) < 2:
                continue
            for k in range(1, len(piece)):
                a, b = piece[:k], piece[k:]
                if vocab.get(a) in normal and vocab.get(b) in normal:
                    ranked.append((-proto.pieces[i].score, i, vocab[a], vocab[b], a, b))
        ranked.sort()
        merges = [(a, b) for *_, a, b in ranked]
        model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    elif spec.model_type == 1:  # unigram
        # SentencePiece never matches control, unused or byte pieces against text; tokenizers' Unigram
        # would, so price them out of the Viterbi search.
        scores = [(p.piece, p.score if p.type in (1, 4) else -1e9) for p in proto.pieces]
        model = Unigram(scores, spec.unk_id if unk is not None else None, byte_fallback)
    else:
        raise UserError("only BPE and unigram SentencePiece models can be exported to transformers")
    tok = RustTokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    dummy = norm.add_dummy_prefix if norm.HasField("add_dummy_prefix") else True
    if dummy:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if unk is not None:  # SentencePiece renders the unknown piece as " ⁇ "
        dec.insert(0, decoders.Replace(unk, " \u2047 "))
    if dummy:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok
