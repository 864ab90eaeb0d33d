"""One exception type for problems the user can fix (bad flags, missing files, corrupt data).

Scripts catch it in `run_cli` and print `error: <message>` with exit code 2 and no traceback;
everything else is a bug and keeps its traceback.
"""
import sys


class UserError(Exception):
    """A one-line message that names the problem and the fix."""


def run_cli(main, *args):
    """Run `main(*args)`, turning a UserError into `error: ...` on stderr and exit code 2."""
    try:
        return main(*args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
