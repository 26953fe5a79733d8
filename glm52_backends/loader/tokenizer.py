"""A checkpoint's `tokenizer.json` (HF `tokenizers`, an optional dependency), checked against the
model's vocabulary.
"""

from __future__ import annotations

import os
from typing import Any

from .headers import CheckpointError
from .layout import load_config

class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` (the checkpoint's `tokenizer.json`)."""

    def __init__(self, tok: Any) -> None:
        self.tokenizer = tok
        self._byte_level: bool | None = None     # whether it is byte-level BPE (token_bytes; read once)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for: through the byte-level alphabet where the tokenizer is
        byte-level BPE (a token may hold part of a UTF-8 character), else its decoded text as UTF-8."""
        if self._byte_level is None:
            import json
            dec = json.loads(self.tokenizer.to_str()).get("decoder") or {}
            kinds = [d.get("type") for d in dec.get("decoders", [dec])]
            self._byte_level = "ByteLevel" in kinds
        piece = self.tokenizer.id_to_token(int(i))
        if self._byte_level and piece is not None and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        return self.decode([int(i)]).encode("utf-8")


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: the printable Latin-1 bytes stand for themselves, the other byte
    values (controls, space, 0x7F-0xA0, 0xAD) for the characters from U+0100 on, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(0x100 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_alphabet()      # character of a byte-level token -> the byte it stands for


# A checkpoint's embedding may be padded past its tokenizer (to a multiple of 64 .. 128 x tp: Megatron,
# HF); a tokenizer covering less than this share of `vocab_size` is another model's.
TOKENIZER_MIN_SHARE = 7 / 8


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer | None:
    """The folder's `tokenizer.json` as a `Tokenizer`, or None when there is none. Checked against the
    model's `vocab_size` (default: the folder's config.json): a tokenizer with more ids than the model
    embeds, or far fewer (another model's: the ids it lacks would decode to nothing), is refused."""
    file = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        from tokenizers import Tokenizer as _HFTokenizer  # lazy: optional dependency
    except ImportError as e:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install 'glm52_backends[tokenizer]'") from e
    try:
        tok = Tokenizer(_HFTokenizer.from_file(file))
    except Exception as e:  # tokenizers raises its own Exception type on malformed files
        raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
    if vocab_size is None:
        vocab_size = load_config(path).vocab_size
    n = tok.vocab_size
    if n > vocab_size or n < TOKENIZER_MIN_SHARE * vocab_size:
        why = ("its ids past the embedding cannot be embedded" if n > vocab_size else
               f"{vocab_size - n} of the model's ids would decode to nothing")
        raise CheckpointError(f"{file}: the tokenizer has {n} tokens, but the model's vocab_size is {vocab_size} "
                              f"({why}); is it another model's tokenizer.json? (a padded embedding may exceed the "
                              f"tokenizer by up to {1 - TOKENIZER_MIN_SHARE:.1%})")
    return tok
