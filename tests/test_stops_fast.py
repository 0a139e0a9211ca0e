"""The stop scanner's promises, piece by piece: a stop string is never emitted, nor
anything after it; text that might begin a stop is held back exactly as long as it
might, and no longer; bytes that are not UTF-8 become U+FFFD, never an error."""

from __future__ import annotations

from appliance.engines.stops import StopScanner


def test_a_stop_at_the_very_start_emits_nothing() -> None:
    assert StopScanner(("END",)).feed(b"END and more") == ("", True)


def test_the_first_occurrence_of_a_stop_ends_the_text() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed(b"aENDbEND") == ("a", True)
    assert scanner.flush() == ""  # what followed the stop is never emitted


def test_an_empty_stop_string_stops_nothing() -> None:
    scanner = StopScanner(("", "END"))
    assert scanner.feed(b"hello ") == ("hello ", False)
    assert scanner.feed(b"xEND") == ("x", True)


def test_the_longest_possible_beginning_of_a_stop_is_held() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed(b"xEN") == ("x", False)  # "EN" may become "END"
    assert scanner.feed(b"!") == ("EN!", False)  # it did not: released, in order
    scanner = StopScanner(("ABCD",))
    assert scanner.feed(b"xAB") == ("x", False)
    assert scanner.feed(b"C") == ("", False)
    assert scanner.feed(b"D") == ("", True)


def test_nothing_is_held_that_cannot_begin_a_stop() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed(b"abc") == ("abc", False)
    assert scanner.feed(b"N") == ("N", False)


def test_each_stop_holds_back_its_own_beginning() -> None:
    # "B" may begin "BX", "AB" may begin "ABC": the longer is held.
    scanner = StopScanner(("BX", "ABC"))
    assert scanner.feed(b"zAB") == ("z", False)
    assert scanner.feed(b"C") == ("", True)
    scanner = StopScanner(("BX", "ABC"))
    assert scanner.feed(b"zAB") == ("z", False)
    assert scanner.feed(b"X") == ("A", True)


def test_flush_gives_what_was_held_once() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed(b"tail E") == ("tail ", False)
    assert scanner.flush() == "E"
    assert scanner.flush() == ""


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    scanner = StopScanner(())
    assert scanner.feed(b"a\xffb") == ("a\ufffdb", False)


def test_a_character_cut_off_at_the_end_is_flushed_as_a_replacement() -> None:
    scanner = StopScanner(())
    assert scanner.feed(b"a" + "€".encode()[:2]) == ("a", False)
    assert scanner.flush() == "\ufffd"


def test_a_character_split_across_tokens_is_joined_with_or_without_stops() -> None:
    euro = "€".encode()
    for stops in ((), ("END",)):
        scanner = StopScanner(stops)
        assert scanner.feed(b"a" + euro[:1]) == ("a", False)
        assert scanner.feed(euro[1:2]) == ("", False)
        assert scanner.feed(euro[2:] + b"!") == ("€!", False)
