"""One exception type for problems the user can fix (bad flags, missing files, corrupt data), and the way
scripts end on Ctrl-C or SIGTERM.

Scripts run under `run_cli`: a UserError prints `error: <message>` with exit code 2 and no traceback; Ctrl-C
(SIGINT) and SIGTERM print one line (where the run stopped, how to continue) and exit 130 / 143; everything
else is a bug and keeps its traceback.
"""
import signal
import sys


class UserError(Exception):
    """A one-line message that names the problem and the fix."""


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM; `hint` says what was kept and how to continue. A BaseException, as
    KeyboardInterrupt is: the signal lands anywhere, and no `except Exception` on the way (a logging handler's
    emit, a file reader's fallback) may swallow it."""

    def __init__(self, signum, hint=""):
        super().__init__(signum, hint)
        self.signum, self.hint = signum, hint

    @property
    def exit_code(self):
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def run_cli(main, *args):
    """Run `main(*args)`, turning a UserError into `error: ...` on stderr and exit code 2, and SIGINT/SIGTERM into
    one line and exit 130/143."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return main(*args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:
        e = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        name = signal.Signals(e.signum).name
        sys.stderr.write(f"stopped by {name}" + (f": {e.hint}" if e.hint else "") + "\n")
        sys.exit(e.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)
