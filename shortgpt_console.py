"""The ``shortgpt`` console script's entry point.

It lives outside the ``shortgpt_hf`` package on purpose: importing the package
imports torch and transformers, which takes seconds, and Python runs a
package's ``__init__`` before any module inside it. A Ctrl-C in those seconds
would otherwise end in a KeyboardInterrupt traceback and exit status 130. Here
the interrupt handler is in place before anything heavy is imported, so the
command keeps its promise from the first instant: one ``shortgpt: error:``
line and exit status 2. Nothing has been written that early, so exiting at
once loses nothing; once the command runs, `shortgpt_hf.cli.main` turns
Ctrl-C back into KeyboardInterrupt so that every write can clean up after
itself.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("shortgpt: error: interrupted; nothing was written\n")
    sys.stderr.flush()
    os._exit(2)


def main() -> None:
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a caller that ignores Ctrl-C (nohup, &) keeps it so
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from shortgpt_hf.cli import main as run

    run()


if __name__ == "__main__":
    main()
