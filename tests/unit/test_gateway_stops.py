"""Stop strings at the gateway: held-back prefixes, matches across chunk boundaries."""

import pytest

from services.gateway.stream import StopChecker


def _run(stops, pieces):
    sc = StopChecker(stops)
    out = []
    for p in pieces:
        text, matched = sc.feed(p)
        out.append(text)
        if matched:
            return out, True
    out.append(sc.flush())
    return out, False


def test_no_stops_passes_through():
    assert _run([], ["ab", "cd"]) == (["ab", "cd", ""], False)


def test_match_inside_one_piece_drops_stop_and_rest():
    assert _run(["STOP"], ["hello STOP world"]) == (["hello "], True)


def test_match_across_boundaries_holds_back_prefix():
    out, matched = _run(["STOP"], ["hello S", "T", "OP and more"])
    assert out == ["hello ", "", ""] and matched
    assert "".join(out) == "hello "


def test_false_prefix_is_released():
    out, matched = _run(["STOP"], ["a ST", "ar", "t"])
    assert out == ["a ", "STar", "t", ""] and not matched


def test_held_prefix_flushed_at_end():
    assert _run(["</s>"], ["done <", "/"]) == (["done ", "", "</"], False)


def test_earliest_of_several_stops_wins():
    out, matched = _run(["world", "lo w"], ["hello world"])
    assert out == ["hel"] and matched


@pytest.mark.parametrize("stops", [["\n\n"], ["ab", "b"]])
def test_text_never_contains_stop(stops):
    text = "xxab\n\nbyy"
    for cut in range(len(text) + 1):
        out, _ = _run(stops, [text[:cut], text[cut:]])
        joined = "".join(out)
        assert not any(s in joined for s in stops)
        assert text.startswith(joined)
