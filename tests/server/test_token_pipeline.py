"""The per-request token pipeline is pure: a real (tiny) tokenizer, no engine, no onnxruntime."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.token_pipeline import TokenOutput, TokenPipeline
from server.types import FinishReason

EOS_TEXT = "<eos>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level, one token per byte and no merges: a text's tokens are its UTF-8 bytes, so a test
    controls exactly where characters and stop strings split across tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TEXT])
    return tokenizer


def ids(tokenizer, text):
    return tokenizer.encode(text).ids


def pipeline(tokenizer, stop=(), ignore_eos=False, max_new_tokens=100, num_prompt_tokens=3, max_total_tokens=1000):
    return TokenPipeline(tokenizer, stop=stop, eos_token_ids=[tokenizer.token_to_id(EOS_TEXT)], ignore_eos=ignore_eos,
                         max_new_tokens=max_new_tokens, num_prompt_tokens=num_prompt_tokens,
                         max_total_tokens=max_total_tokens)


def push_all(p, tokens) -> list[TokenOutput]:
    outputs = []
    for token in tokens:
        outputs.append(p.push(token))
        if outputs[-1].finish_reason is not None:
            break
    return outputs


def text_of(outputs):
    return "".join(o.text for o in outputs)


def test_every_token_streams_and_the_text_is_the_decoded_text(tokenizer):
    text = "héllo, wörld"  # two characters of two bytes each: four tokens that complete no character alone
    tokens = ids(tokenizer, text)
    outputs = push_all(pipeline(tokenizer, max_new_tokens=len(tokens)), tokens)
    assert [t for o in outputs for t in o.token_ids] == tokens
    assert text_of(outputs) == text
    assert [o.finish_reason for o in outputs] == [None] * (len(tokens) - 1) + [FinishReason.LENGTH]
    assert outputs[1].text == "" and outputs[2].text == "é"  # the first byte of é is held back


def test_end_of_sequence_is_not_streamed_and_releases_held_text(tokenizer):
    eos = tokenizer.token_to_id(EOS_TEXT)
    outputs = push_all(pipeline(tokenizer, stop=["world"]), ids(tokenizer, "hello wor") + [eos])
    assert text_of(outputs[:-1]) == "hello "  # "wor" might become the stop string: held back
    assert outputs[-1] == TokenOutput((), "wor", FinishReason.EOS)


def test_ignore_eos_streams_the_end_of_sequence_token_and_goes_on(tokenizer):
    eos = tokenizer.token_to_id(EOS_TEXT)
    outputs = push_all(pipeline(tokenizer, ignore_eos=True), [eos] + ids(tokenizer, "ab"))
    assert [o.token_ids for o in outputs] == [(eos,), (ids(tokenizer, "a")[0],), (ids(tokenizer, "b")[0],)]
    assert text_of(outputs) == "ab" and all(o.finish_reason is None for o in outputs)


def test_a_stop_string_split_across_tokens_ends_the_text_before_it(tokenizer):
    tokens = ids(tokenizer, "hello world, more")
    outputs = push_all(pipeline(tokenizer, stop=["lo w"]), tokens)
    assert text_of(outputs) == "hel"
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert [t for o in outputs for t in o.token_ids] == tokens[: len("hello w")]  # up to the completing token


def test_max_new_tokens_flushes_a_held_stop_prefix(tokenizer):
    outputs = push_all(pipeline(tokenizer, stop=["abc"], max_new_tokens=4), ids(tokenizer, "xyab" + "c"))
    assert len(outputs) == 4 and outputs[-1].finish_reason is FinishReason.LENGTH
    assert text_of(outputs) == "xyab"  # "ab" was held as a possible start of "abc", and is due at the end


def test_the_slot_capacity_ends_a_request_before_max_new_tokens(tokenizer):
    p = pipeline(tokenizer, max_new_tokens=100, num_prompt_tokens=10, max_total_tokens=12)
    outputs = push_all(p, ids(tokenizer, "abcdef"))
    assert [o.finish_reason for o in outputs] == [None, FinishReason.LENGTH] and p.num_generated == 2


def test_end_of_sequence_wins_over_length(tokenizer):
    eos = tokenizer.token_to_id(EOS_TEXT)
    assert pipeline(tokenizer, max_new_tokens=1).push(eos).finish_reason is FinishReason.EOS
