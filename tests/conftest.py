"""Shared by every test file: the signal state of a terminal.

A runner that starts the tests in the background (`cmd &` in a non-interactive shell, as some CI scripts do)
hands them SIGINT ignored, and an ignored signal stays ignored in every process they start (`cli.main_guard` and
`_startup.py` respect `nohup`-style ignores on purpose).  The tests of Ctrl-C handling need SIGINT delivered, as in
a terminal, so it is restored here; child processes then start with the default action.
"""

import signal

import pytest

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core machine they lose 10x; restored afterwards.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
