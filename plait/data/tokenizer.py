"""Tokenizers: plait's byte tokenizer, and `tokenizers` (Hugging Face) ones from local files.

ByteTokenizer: token id = byte value, vocabulary 256, nothing to download and nothing unknown.
Prepared data (`plait data prepare --tokenizer byte`) needs an end-of-text id between documents
that no byte can take, so it uses ids 0-255 for bytes and EOS_ID = 256: vocabulary 257, stored
as uint16. The raw-text corpora of `load_corpus` (no separator) keep vocabulary 256.

TextTokenizer wraps a `tokenizers.Tokenizer` loaded from a local tokenizer.json (or a model
folder holding one); `train_bpe` trains a byte-level BPE on the inputs. `transformers` is not
needed and nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from plait.errors import ConfigError

# the end-of-text token a trained BPE gets (id 0); also the first name looked for in a given file
ENDOFTEXT = "<|endoftext|>"
# looked for among the special tokens, in order, when no tokenizer_config.json names eos_token
EOS_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>",
                  "[SEP]")


class ByteTokenizer:
    vocab_size = 256
    eos_id = 256  # prepared data only: its vocabulary is 257
    prepared_vocab_size = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        # the end-of-text id (256) is no byte: it decodes to nothing, as special tokens do
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _require_tokenizers(what: str):
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError(f"{what} needs the `tokenizers` package: pip install tokenizers "
                          f"(or pip install 'plait[data]'), or use --tokenizer byte") from e
    return tokenizers


class TextTokenizer:
    """A `tokenizers.Tokenizer` with its end-of-text id; documents encode without added tokens."""

    def __init__(self, tok, eos_token: str, source: str, file: Path):
        self.tok = tok
        self.source = source
        self.file = file
        self.eos_token = eos_token
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise ConfigError(f"--eos {eos_token!r} is not a token of {file}: name one of its "
                              f"special tokens ({', '.join(special_tokens(tok)) or 'it has none'})")
        self.eos_id = int(eos)
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        # a document that contains the literal text "<|endoftext|>" is encoded as text, so the end
        # of text id only ever appears between documents
        tok.encode_special_tokens = True
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def special_tokens(tok) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def _eos_from_config(folder: Path) -> str | None:
    """The eos_token a transformers tokenizer folder declares (tokenizer_config.json & co)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            try:
                eos = json.loads(f.read_text()).get("eos_token")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    return None


def load_tokenizer(spec: str, eos: str | None = None) -> ByteTokenizer | TextTokenizer:
    """`byte`, a local tokenizer.json, or a local folder holding one (a transformers model)."""
    if spec == "byte":
        return ByteTokenizer()
    p = Path(spec)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        where = f"{p} holds no tokenizer.json" if p.is_dir() else f"{spec!r} is no file or folder"
        raise ConfigError(f"--tokenizer: {where}. Give `byte`, `train:VOCAB`, a local "
                          f"tokenizer.json or a model folder holding one; nothing is downloaded "
                          f"(fetch a hub tokenizer first: `huggingface-cli download NAME "
                          f"tokenizer.json --local-dir DIR`)")
    tokenizers = _require_tokenizers(f"--tokenizer {spec}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise ConfigError(f"--tokenizer: {file} is not a tokenizers tokenizer.json ({e})") from e
    if eos is None:
        eos = _eos_from_config(file.parent)
    if eos is None:  # a known name among its special tokens (an ordinary token could be text)
        eos = next((c for c in EOS_CANDIDATES if c in special_tokens(tok)), None)
    if eos is None:
        raise ConfigError(f"--tokenizer: {file} names no end-of-text token (no eos_token in a "
                          f"tokenizer_config.json, none of {', '.join(EOS_CANDIDATES)}): pass "
                          f"--eos TOKEN, one of its special tokens "
                          f"({', '.join(special_tokens(tok)) or 'it has none'})")
    return TextTokenizer(tok, eos, source=str(file.resolve()), file=file)


def parse_train_spec(spec: str) -> int | None:
    """VOCAB of `train:VOCAB`, or None when spec is no training request."""
    if not spec.startswith("train:"):
        return None
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        vocab = 0
    # 257 = the end-of-text token + 256 byte symbols; fewer leaves no room for a single merge
    if not 258 <= vocab <= 2**32:
        raise ConfigError(f"--tokenizer {spec}: VOCAB must be a whole number from 258 (256 bytes, "
                          f"the end-of-text token and one merge) to 2**32, e.g. train:4096")
    return vocab


def train_bpe(texts, vocab: int, out: Path) -> TextTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on `texts`, saved as `out` (tokenizer.json).

    The end-of-text token is id 0. Training is deterministic for the same texts in the same order.
    """
    tokenizers = _require_tokenizers(f"--tokenizer train:{vocab}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return TextTokenizer(tok, ENDOFTEXT, source=f"train:{vocab}", file=out)
