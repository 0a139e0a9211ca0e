"""Stop strings and UTF-8 across token boundaries."""

from appliance.engines.stops import StopScanner


def feed_all(scanner: StopScanner, pieces: list[bytes]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


def test_stop_split_across_tokens_is_not_emitted() -> None:
    text, stopped = feed_all(StopScanner(("END",)), [b"abc E", b"N", b"D tail"])
    assert (text, stopped) == ("abc ", True)


def test_partial_stop_that_does_not_complete_is_released() -> None:
    text, stopped = feed_all(StopScanner(("END",)), [b"EN", b"O", b"!"])
    assert (text, stopped) == ("ENO!", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopScanner(("b", "a")), [b"xxab"]) == ("xx", True)


def test_utf8_split_inside_a_character() -> None:
    euro = "€".encode()
    text, stopped = feed_all(StopScanner(()), [b"5 ", euro[:1], euro[1:], b"!"])
    assert (text, stopped) == ("5 €!", False)


def test_no_text_held_back_without_stops() -> None:
    scanner = StopScanner(())
    assert scanner.feed(b"hello") == ("hello", False)
