"""Ctrl-C and SIGTERM during a CLI's start-up (not a part of the paper): exit 130, one line, no traceback; a missing
package (a CLI run outside the project's venv): exit 2, one line.

A CLI spends seconds importing torch, open_clip and timm before `cli.main_guard` installs its handler; a Ctrl-C
then gave a `KeyboardInterrupt` traceback and a SIGTERM exit -15.  Every CLI imports this module first among its
third-party imports (`pyproject.toml` files it there, and `_` sorts it first), so the handler is in place before
the heavy imports; `main_guard` replaces it with its own, which saves finished work.  Nothing has been written
yet at start-up, so the process simply ends.  Only a script of this folder run as `__main__` installs it: a test,
a notebook or a program that imports a CLI keeps its own signal handling.  An ignored signal (`nohup`) stays ignored.
"""

import os
import signal
import sys

STARTUP_EXIT = 130


def _exit_at_startup(signum, frame):
    sys.stderr.write("interrupted.\n")
    sys.stderr.flush()
    os._exit(STARTUP_EXIT)  # no clean-up to run: the imports have written nothing


def _missing_package(kind, exc, tb):
    """sys.excepthook of a CLI: a third-party package that is missing or too old (an ImportError naming a module
    that is not one of this folder's) is one `error:` line and exit 2; anything else keeps its traceback."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    here = os.path.dirname(os.path.abspath(__file__))
    if not issubclass(kind, ImportError) or not top or os.path.exists(os.path.join(here, top + ".py")):
        return sys.__excepthook__(kind, exc, tb)
    what = "is not installed" if issubclass(kind, ModuleNotFoundError) else "is too old or broken"
    sys.stdout.flush()
    sys.stderr.write(
        f"error: a required package {what} ({exc}); install the project's requirements in the Python that runs "
        f"this script (`pip install -r requirements.txt`; is the project's venv active?).\n"
    )
    sys.stderr.flush()
    os._exit(2)


def install():
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file or os.path.dirname(os.path.abspath(main_file)) != os.path.dirname(os.path.abspath(__file__)):
        return  # imported by a test, a notebook or another program: leave its handlers alone
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _exit_at_startup)
    sys.excepthook = _missing_package


install()
