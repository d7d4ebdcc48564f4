"""Corpus reading and splitting, and the byte-level BPE tokenizer."""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from model.corpus import CorpusError, Document, read_documents, split_documents, stdlib_files
from model.tokenizer import (
    ENDOFTEXT, cached_token_arrays, encode_documents, special_token_ids, train_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def stdlib_sample() -> list[Document]:
    return read_documents(max_bytes=300_000)


@pytest.fixture(scope="module")
def tokenizer(stdlib_sample):
    return train_tokenizer(stdlib_sample, vocab_size=512)


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    files = [f.relative_to(STDLIB).as_posix() for f in stdlib_files()]
    assert "json/__init__.py" in files and "argparse.py" in files
    assert files == sorted(files) and files == [f.relative_to(STDLIB).as_posix() for f in stdlib_files()]
    for excluded in ("test/", "site-packages/", "idlelib/idle_test/", "unittest/test/"):
        assert not any(f.startswith(excluded) for f in files), excluded


def test_reading_stops_at_the_byte_cap(stdlib_sample):
    assert sum(len(d.text.encode()) for d in stdlib_sample) <= 300_000
    assert len(stdlib_sample) > 10
    assert [d.name for d in read_documents(max_bytes=300_000)] == [d.name for d in stdlib_sample]


def test_split_is_deterministic_disjoint_and_complete():
    documents = read_documents()
    train, val = split_documents(documents)
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_documents(shuffled)
    assert {d.name for d in train} == {d.name for d in train2} and {d.name for d in val} == {d.name for d in val2}
    assert not {d.digest for d in train} & {d.digest for d in val}
    assert len(train) + len(val) == len(documents)
    assert 0.005 < len(val) / len(documents) < 0.05  # about 2 %


def test_tiny_corpora_still_get_a_validation_side():
    few = [Document(f"doc{i}", f"text number {i}\n") for i in range(3)]
    train, val = split_documents(few)
    assert train and val and len(train) + len(val) == 3
    one = Document("one", "".join(f"line {i}\n" for i in range(100)))
    train, val = split_documents([one])
    assert train[0].text + val[0].text == one.text and 0 < len(val[0].text) < len(train[0].text)


def test_folders_skip_binary_and_hidden_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("wörld 🌍\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\1\2")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    documents = read_documents([tmp_path])
    assert [d.name for d in documents] == [f"{tmp_path.name}/a.txt", f"{tmp_path.name}/sub/b.md"]
    assert documents[1].text == "wörld 🌍\n"


def test_missing_or_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents([tmp_path / "missing"])
    with pytest.raises(CorpusError, match="no UTF-8 text"):
        read_documents([tmp_path])


def test_special_tokens_and_vocab_size(tokenizer):
    assert tokenizer.get_vocab_size() == 512
    assert special_token_ids(tokenizer) == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    assert tokenizer.encode(ENDOFTEXT).ids == [0]


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # done\n",
    "naïve café, Ünïcödé, 日本語のテキスト, עברית",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",
    "\t tabs,  double  spaces, trailing \n\n\r\n",
    "\x00\x01 control \x7f characters",
])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_string_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_documents_are_joined_by_endoftext(tokenizer):
    documents = [Document("a", "first"), Document("b", "second")]
    ids = encode_documents(tokenizer, documents)
    assert ids.dtype == np.uint16
    assert ids[0] == ids[-1] == 0 and (ids == 0).sum() == 3
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == "<|endoftext|>first<|endoftext|>second<|endoftext|>"


def test_token_arrays_are_cached(tmp_path, tokenizer, monkeypatch):
    train, val = [Document("a", "some training text")], [Document("b", "held out")]
    first = cached_token_arrays(tmp_path, tokenizer, train, val)
    monkeypatch.setattr("model.tokenizer.encode_documents", lambda *a: pytest.fail("tokenized again"))
    second = cached_token_arrays(tmp_path, tokenizer, train, val)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
