"""Stop strings over pushed text: held-back prefixes, matches split across pushes, earliest match wins."""
import random

import pytest

from server.stop_strings import StopMatcher


def run(stops, pieces):
    """Push pieces until a stop matches; return (all text sent, whether it stopped)."""
    matcher = StopMatcher(stops)
    sent = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        sent.append(text)
        if stopped:
            return "".join(sent), True
    return "".join(sent) + matcher.flush(), False


def reference(stops, text):
    """Feed one character at a time and cut at the first stop that completes."""
    for end in range(len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_no_stops_passes_everything_through():
    matcher = StopMatcher([])
    assert matcher.push("hello") == ("hello", False)
    assert matcher.flush() == ""


def test_stop_split_across_many_pushes():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.push("Hello <") == ("Hello ", False)
    assert matcher.push("|") == ("", False)
    assert matcher.push("en") == ("", False)
    assert matcher.push("d|") == ("", False)
    assert matcher.push(">trailing") == ("", True)
    assert matcher.push("more") == ("", True)  # stays stopped
    assert matcher.flush() == ""


def test_stop_at_the_very_start():
    assert run(["###"], ["###", " rest"]) == ("", True)
    assert run(["###"], ["#", "#", "#x"]) == ("", True)


def test_a_false_prefix_is_released():
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.push("one\n") == ("one", False)
    assert matcher.push("\nUs") == ("", False)
    assert matcher.push("ed to") == ("\n\nUsed to", False)
    assert matcher.push("\n\nUser") == ("", False)
    assert matcher.flush() == "\n\nUser"  # ended for another reason: the held text was not a stop


def test_the_held_part_restarts_inside_a_failed_prefix():
    # "aab" fails as "aa" + "a", but its last "aa" can still begin the stop.
    matcher = StopMatcher(["aab"])
    assert matcher.push("aa") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("b!") == ("", True)


def test_overlapping_stops_and_earliest_match_wins():
    assert run(["abc", "bcd"], ["xabcd"]) == ("x", True)
    assert run(["bcd", "abc"], ["xabcd"]) == ("x", True)  # order of the stop list does not matter
    assert run(["END", "STOP"], ["say STOP then END"]) == ("say ", True)
    assert run(["ab", "b"], ["a", "b"]) == ("", True)  # "ab" starts at 0, before "b" at 1


def test_the_first_stop_to_complete_wins_however_the_text_is_split():
    for pieces in (["a", "bc", "d"], ["abcd"], ["ab", "cd"]):
        assert run(["bc", "abcd"], pieces) == ("a", True)
    assert run(["b", "ab"], ["ab"]) == ("", True)  # both end at "b": the longer one starts earlier


def test_unicode_stops():
    assert run(["。\n"], ["東京は", "首都です。", "\n次"]) == ("東京は首都です", True)
    assert run(["👍🏽"], ["ok 👍", "🏽 done"]) == ("ok ", True)
    assert run(["👍🏽"], ["ok 👍", "! done"]) == ("ok 👍! done", False)
    assert run(["ß"], ["stra", "ße"]) == ("stra", True)


def test_random_splits_match_one_character_at_a_time():
    rng = random.Random(7)
    alphabet = "ab\n東👍"
    for _ in range(2000):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert run(stops, pieces) == reference(stops, text), (stops, pieces)


def test_empty_stop_is_rejected():
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])
