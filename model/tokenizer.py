"""A byte-level BPE tokenizer trained on the corpus, and the corpus turned into token ids.

Byte-level means every UTF-8 string maps to tokens and back unchanged: the
base alphabet is the 256 byte values, so nothing is ever unknown. The file it
saves is a Hugging Face `tokenizers` JSON, which the server loads as is.

Documents are joined as  <|endoftext|> doc <|endoftext|> doc ... <|endoftext|>,
so the same token marks both the start (BOS) and the end (EOS) of a document.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.corpus import Document

ENDOFTEXT, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, PAD]  # in this order, so <|endoftext|> is id 0 and <|pad|> id 1


def train_tokenizer(documents: Sequence[Document], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with at most vocab_size tokens (fewer when the corpus has too few pairs to merge)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in documents), trainer=trainer, length=len(documents))
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids save_checkpoint records: <|endoftext|> is both BOS and EOS."""
    eot, pad = tokenizer.token_to_id(ENDOFTEXT), tokenizer.token_to_id(PAD)
    assert (eot, pad) == (0, 1), f"special tokens landed at {eot}, {pad}; expected 0, 1"
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad}


def encode_documents(tokenizer: Tokenizer, documents: Sequence[Document]) -> np.ndarray:
    """One flat array: <|endoftext|> before each document and after the last one."""
    eot = tokenizer.token_to_id(ENDOFTEXT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
    pieces = [np.array([eot], dtype=dtype)]
    batch = 256  # documents per call: bounds the memory the Encoding objects take
    for start in range(0, len(documents), batch):
        for encoding in tokenizer.encode_batch([d.text for d in documents[start : start + batch]], add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.array([eot], dtype=dtype))
    return np.concatenate(pieces)


def corpus_key(tokenizer_json: str, train: Sequence[Document], val: Sequence[Document]) -> str:
    """A name for one tokenized corpus: changes when the tokenizer, the text or the split changes."""
    digest = hashlib.sha256(tokenizer_json.encode("utf-8"))
    for side, documents in (("train", train), ("val", val)):
        for document in documents:
            digest.update(f"{side}\0{document.digest}\0".encode())
    return digest.hexdigest()[:20]


def cached_token_arrays(
    cache_dir: Path, tokenizer: Tokenizer, train: Sequence[Document], val: Sequence[Document]
) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), read from cache_dir when this exact corpus was tokenized before."""
    path = Path(cache_dir) / f"tokens-{corpus_key(tokenizer.to_str(), train, val)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["train"], cached["val"]
    train_ids, val_ids = encode_documents(tokenizer, train), encode_documents(tokenizer, val)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")  # written whole, then renamed: readers never see half a file
    np.savez(tmp, train=train_ids, val=val_ids)
    os.replace(tmp, path)
    return train_ids, val_ids
