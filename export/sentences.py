"""The texts an encoder export is verified on, and the tiny tokenizer of the test encoder.

Both are fixed: the same seed gives the same sentences on every machine, so a figure in one
card can be compared with another's.
"""
from __future__ import annotations

import random

from tokenizers import Tokenizer

# A fixed vocabulary of everyday words: the test encoder's WordPiece vocabulary, and the words of the
# generated verification sentences.
WORDS = tuple("""
the a an and or but if of to in on at by for with from up down over under after before this that these
those it its he she they we you i me my your our their his her is are was were be been being have has had
do does did will would can could should may might must not no yes all any some many much more most few
each every other such only own same so than too very just now then here there when where why how what
which who whom time year day week night morning people man woman child friend family house home city
country world school work water food tree river mountain road car train book paper letter music song
light dark red green blue white black small large long short old new good bad great high low early late
first last next open close go come see look make take give find think know say tell ask use try help
play run walk read write sing learn teach love like want need feel keep start stop turn move live
""".split())
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Sentences a person wrote: punctuation, digits, capitals, accents, a long compound.
REAL_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Where is the nearest train station?",
    "She bought 3 apples and 12 oranges at the market on Tuesday.",
    "Transformers map a sequence of tokens to a sequence of vectors.",
    "Das Wetter ist heute schön, aber morgen soll es regnen.",
    "I can't believe it's already December!",
    "The café on the corner serves a naïve but charming crème brûlée.",
    "Reading a long novel in one sitting takes patience, coffee, and a comfortable chair; "
    "finishing it takes a stubbornness that few readers admit to.",
    "OK",
)


def verification_sentences(count: int = 100, max_words: int = 120, seed: int = 0) -> list[str]:
    """REAL_SENTENCES, then seeded sentences of WORDS of 1..max_words words, in an order of mixed lengths."""
    rng = random.Random(seed)
    generated = []
    for i in range(count - len(REAL_SENTENCES)):
        n_words = 1 + (i * 37) % max_words  # every length class, spread over the list
        words = [rng.choice(WORDS) for _ in range(n_words)]
        generated.append(" ".join(words).capitalize() + rng.choice((".", "?", "!", "")))
    return list(REAL_SENTENCES) + generated


def tiny_wordpiece_tokenizer() -> Tokenizer:
    """A small BERT-style WordPiece tokenizer over WORDS (lower-cased; unknown words spelled in letters)."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'")
    tokens = list(SPECIAL_TOKENS) + letters + [f"##{c}" for c in letters] + sorted(set(WORDS) - set(letters))
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokens.index("[CLS]")), ("[SEP]", tokens.index("[SEP]"))])
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
