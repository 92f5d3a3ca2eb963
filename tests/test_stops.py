from server.stops import StopStrings


def run(stops, pieces):
    checker = StopStrings(stops)
    out = []
    for piece in pieces:
        text, stop = checker.push(piece)
        out.append(text)
        if stop:
            return "".join(out), stop
    return "".join(out) + checker.flush(), None


def test_stop_split_across_pieces_is_found_and_nothing_past_it_is_emitted():
    assert run(["END"], ["abc E", "N", "D and more"]) == ("abc ", "END")
    assert run(["\n\n", "###"], ["one\n", "\ntwo"]) == ("one", "\n\n")
    assert run(["###"], ["a#", "#b"]) == ("a##b", None)  # a partial match that breaks is released


def test_held_text_is_released_at_the_end():
    checker = StopStrings(["STOP"])
    assert checker.push("go ST") == ("go ", None)
    assert checker.flush() == "ST"


def test_earliest_stop_wins():
    assert run(["b", "abc"], ["xxabc"]) == ("xx", "abc")  # the one that starts first
    assert run([], ["anything"]) == ("anything", None)
