"""`potluck generate` and `chat` stream text to the terminal; a log line (a failover, a redone step)
or an error printed meanwhile starts on a line of its own, not in the middle of the text."""
import logging
import sys

import pytest

from potluck.client.chat import line_streamer, streaming_apart_from_logs


@pytest.fixture
def terminal(capsys):
    """The root logger writing to stderr, as the CLI sets it up; yields a function that reads what
    the user saw on stdout and stderr."""
    class Stderr(logging.StreamHandler):  # whichever stream sys.stderr is when a line is written
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    root = logging.getLogger()
    kept, root.handlers = root.handlers, [Stderr()]
    yield lambda: capsys.readouterr()
    root.handlers = kept


def test_a_log_line_while_text_streams_starts_on_a_line_of_its_own(terminal):
    streamer = line_streamer(None)
    with streaming_apart_from_logs(streamer):
        streamer.on_finalized_text("Once upon")
        logging.getLogger("potluck.test").warning("a step was redone")
        streamer.on_finalized_text(" a time\n")
        logging.getLogger("potluck.test").warning("after a whole line")
        streamer.on_finalized_text("there was", stream_end=True)
        logging.getLogger("potluck.test").warning("after the end")
    seen = terminal()
    assert seen.out == "Once upon\n a time\nthere was\n"  # one newline more: the one before the first log line
    assert seen.err.splitlines() == ["a step was redone", "after a whole line", "after the end"]
    logging.getLogger("potluck.test").warning("outside")
    streamer.on_finalized_text("more")
    logging.getLogger("potluck.test").warning("not filtered any more")
    assert terminal().out == "more"


def test_an_error_while_text_streams_leaves_the_line_ended(terminal):
    streamer = line_streamer(None)
    with pytest.raises(KeyboardInterrupt):
        with streaming_apart_from_logs(streamer):
            streamer.on_finalized_text("Once upon")
            raise KeyboardInterrupt
    assert terminal().out == "Once upon\n"
