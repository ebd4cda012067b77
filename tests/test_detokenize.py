from llmkit.engine.detokenize import IncrementalDetokenizer, StopMatcher


def feed_all(matcher, pieces):
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return out, stopped


def test_stop_split_across_chunks_never_leaks():
    out, stopped = feed_all(StopMatcher(["END"]), ["Hello E", "N", "D and more"])
    assert stopped
    assert "".join(out) == "Hello "
    assert "E" not in "".join(out)


def test_partial_stop_is_released_when_it_does_not_complete():
    out, stopped = feed_all(StopMatcher(["END"]), ["Hello E", "lse"])
    assert not stopped
    assert out[0] == "Hello "  # 'E' held back: it could start END
    assert "".join(out) == "Hello Else"


def test_earliest_stop_wins_and_text_before_is_kept():
    out, stopped = feed_all(StopMatcher(["\n\n", "."]), ["one. two\n\n"])
    assert stopped and "".join(out) == "one"


def test_no_stops_passes_everything():
    out, stopped = feed_all(StopMatcher([]), ["a", "b"])
    assert not stopped and "".join(out) == "ab"


def test_multibyte_characters_are_never_split(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    text = "Caf\u00e9 \U0001f600 \u65e5\u672c\u8a9e na\u00efve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the emoji and CJK need several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.feed(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
