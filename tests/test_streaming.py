"""`ptjax.streaming.Streamer` (what `python -m ptjax.generate` prints): streamed text, stop
strings across token boundaries, stop ids."""

from __future__ import annotations

import io

import numpy as np

from ptjax.data import ByteTokenizer
from ptjax.streaming import Streamer


def feed(streamer: Streamer, text: str) -> list[bool]:
    """Push `text`'s byte tokens through the streamer one per call, as the sampler does."""
    flags = []
    for token in ByteTokenizer().encode(text):
        flags.append(bool(streamer(np.asarray([token]), np.asarray([True]))[0]))
    return flags


def test_streams_text_as_it_arrives():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), out=out)
    feed(streamer, "Hello")
    assert out.getvalue() == "Hello"
    assert streamer.finish() == "Hello" and out.getvalue() == "Hello\n"


def test_stop_string_spanning_tokens_is_never_printed():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), stop_strings=["\nUser:"], out=out)
    flags = feed(streamer, "Answer 42\nUser: more")
    stop_at = flags.index(True)
    assert stop_at == len("Answer 42\nUser:") - 1 and all(flags[stop_at:])
    assert streamer.finish() == "Answer 42"
    assert out.getvalue() == "Answer 42\n"


def test_a_partial_stop_string_is_held_back_then_released():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), stop_strings=["STOP"], out=out)
    feed(streamer, "go ST")
    assert out.getvalue() == "go "  # "ST" could still become "STOP"
    feed(streamer, "AY")
    assert out.getvalue() == "go STAY"


def test_incomplete_characters_wait_for_their_bytes():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), out=out)
    ids = ByteTokenizer().encode("é")  # two bytes
    streamer(np.asarray([ids[0]]), np.asarray([True]))
    assert out.getvalue() == ""
    streamer(np.asarray([ids[1]]), np.asarray([True]))
    assert out.getvalue() == "é"


def test_stop_ids_and_inactive_rows_print_nothing():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), out=out)
    streamer(np.asarray([ByteTokenizer.EOS]), np.asarray([True]))
    streamer(np.asarray([ByteTokenizer().encode("x")[0]]), np.asarray([False]))
    assert out.getvalue() == "" and streamer.finish() == ""


def test_only_row_zero_is_streamed():
    out = io.StringIO()
    streamer = Streamer(ByteTokenizer(), out=out)
    a, b = ByteTokenizer().encode("ab")
    flags = streamer(np.asarray([a, b]), np.asarray([True, False]))
    assert out.getvalue() == "a" and flags.shape == (2,)
