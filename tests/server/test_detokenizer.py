"""Incremental detokenizer on small tokenizers built here: byte-level BPE and two byte-fallback styles."""
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from server.detokenizer import IncrementalDetokenizer

LATIN = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there, the cat and the hat",
    "café naïve résumé über straße Ünïcödé",
] * 3
CORPUS = LATIN + ["東京は日本の首都です", "👍🏽 🎉 🇫🇷 👩‍👩‍👧"] * 3

# Pieces for random texts: several need bytes the small vocabularies below
# lack, so they are split across tokens (byte-level BPE) or spelled as
# <0xNN> byte tokens (byte fallback).
PIECES = ["the", "hello", "world", "fox", " ", " ", "  ", "\n", ",", "café", "naïve", "straße", "東京", "首都",
          "は", "語", "😀", "👍🏽", "🇫🇷", "👩‍👩‍👧", "🎉", "ж", "ß", "Ω", "x"]


def byte_level_bpe() -> Tokenizer:
    """GPT-2 / SmolLM2 style: every byte is a symbol, merges learned from the corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def byte_fallback_bpe(metaspace: bool) -> Tokenizer:
    """Sentencepiece style: "▁" for spaces, unknown characters spelled as <0xNN> byte tokens.

    metaspace=False is Llama 2's layout (Prepend/Replace normalizer, a decoder
    that fuses and strips one leading space); True uses the Metaspace
    pre-tokenizer and decoder, which drop the first token's leading space.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Trained without CJK and emoji, so those always fall back to byte tokens.
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(LATIN, trainer)
    # The trainer cannot add byte tokens as ordinary (non-special) tokens, so
    # append the 256 of them to the vocabulary and turn byte fallback on.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    if metaspace:
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    else:
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return tokenizer


TOKENIZERS = {
    "byte_level": byte_level_bpe(),
    "llama_byte_fallback": byte_fallback_bpe(metaspace=False),
    "metaspace_byte_fallback": byte_fallback_bpe(metaspace=True),
}


def stream(tokenizer, ids) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))


@pytest.fixture(params=list(TOKENIZERS))
def tokenizer(request) -> Tokenizer:
    return TOKENIZERS[request.param]


def test_the_test_tokenizers_split_characters_into_bytes(tokenizer):
    # Guards the tests below: multi-byte characters really span several tokens.
    ids = tokenizer.encode("東京 👍🏽").ids
    assert any("\ufffd" in tokenizer.decode([i]) or tokenizer.decode([i]) == "" for i in ids)


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "café naïve, straße",
        "東京は日本の首都です",
        "👍🏽 🎉 🇫🇷 👩‍👩‍👧 x",
        " leading and  double  spaces\n",
        "ж",
    ],
)
def test_stream_equals_decode_and_never_breaks_a_character(tokenizer, text):
    ids = tokenizer.encode(text).ids
    chunks = stream(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_random_texts(tokenizer):
    rng = random.Random(1234)
    for _ in range(200):
        ids = tokenizer.encode(random_text(rng)).ids
        chunks = stream(tokenizer, ids)
        assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_round_trip_texts_come_back_whole():
    # These two tokenizers decode(encode(text)) == text, so the stream is the text itself.
    rng = random.Random(99)
    for name in ["byte_level", "llama_byte_fallback"]:
        tokenizer = TOKENIZERS[name]
        for _ in range(50):
            text = random_text(rng)
            assert "".join(stream(tokenizer, tokenizer.encode(text).ids)) == text


def test_special_tokens_are_skipped_anywhere(tokenizer):
    special = [i for t in ("<|endoftext|>", "<s>", "</s>") if (i := tokenizer.token_to_id(t)) is not None]
    rng = random.Random(5)
    for _ in range(100):
        ids = tokenizer.encode(random_text(rng)).ids
        for _ in range(3):
            ids.insert(rng.randint(0, len(ids)), rng.choice(special))
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_character_is_held_until_its_last_byte():
    tokenizer = TOKENIZERS["llama_byte_fallback"]
    ids = tokenizer.encode("a東").ids
    bytes_of_east = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in "東".encode()]
    assert ids[-3:] == bytes_of_east
    detokenizer = IncrementalDetokenizer(tokenizer)
    outputs = [detokenizer.push(i) for i in ids]
    assert outputs[-3:] == ["", "", "東"]
    assert detokenizer.flush() == ""


def test_leading_spaces_inside_the_output_survive():
    # Decoding "▁the" alone gives "the"; in the stream it must stay " the".
    tokenizer = TOKENIZERS["metaspace_byte_fallback"]
    first, second = (tokenizer.token_to_id(word) for word in ("▁hello", "▁the"))
    assert tokenizer.decode([second]) == "the"
    assert stream(tokenizer, [first, second]) == ["hello", " the", ""]


def test_invalid_or_unfinished_bytes_come_out_as_decode_has_them():
    tokenizer = TOKENIZERS["llama_byte_fallback"]
    byte = {b: tokenizer.token_to_id(f"<0x{b:02X}>") for b in (0xE2, 0x82, 0xAC)}
    hello = tokenizer.encode("hello").ids
    for ids in [
        [byte[0xE2], byte[0x82]] + hello,  # a character cut short, then text
        hello + [byte[0xAC]] + hello,  # a stray continuation byte
        hello + [byte[0xE2], byte[0x82]],  # generation ends mid-character
    ]:
        detokenizer = IncrementalDetokenizer(tokenizer)
        pushed = "".join(detokenizer.push(i) for i in ids)
        assert pushed + detokenizer.flush() == tokenizer.decode(ids)
        assert "\ufffd" in tokenizer.decode(ids)


def test_the_decoded_window_stays_short():
    inner = TOKENIZERS["byte_level"]

    class CountingTokenizer:
        longest = 0

        def decode(self, ids, skip_special_tokens):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
            return inner.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = inner.encode(random_text(random.Random(3)) * 40).ids
    assert len(ids) > 500
    chunks = stream(CountingTokenizer(), ids)
    assert "".join(chunks) == inner.decode(ids)
    # Bounded by the tokens of a character or two, not by the 500+ of the sequence.
    assert CountingTokenizer.longest <= 16
