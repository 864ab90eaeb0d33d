"""The repository's boolean flag: `--x` / `--no_x` (argparse's BooleanOptionalAction spells the negation `--no-x`,
and store_true has none). Every script's parser uses it, so one convention holds everywhere. BoolAutoFlag adds
a third value, `--x auto` (`x: auto` in a config file), for a setting the script decides at run time."""
import argparse


class BoolFlag(argparse.Action):
    words = "true or false"  # what a config file may say

    def __init__(self, option_strings, dest, default=False, help=None, nargs=0, **kwargs):
        names = [n for opt in option_strings for n in (opt, "--no_" + opt[2:])]
        super().__init__(names, dest, nargs=nargs, default=default, help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))

    def format_usage(self):
        return " | ".join(self.option_strings)

    def accepts(self, value):
        """Whether a config file's `value` is one of this flag's values."""
        return isinstance(value, bool)


class BoolAutoFlag(BoolFlag):
    """`--x` (True), `--no_x` (False) or `--x auto` ("auto")."""
    words = "true, false or auto"

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        super().__init__(option_strings, dest, default=default, help=help, nargs="?", const=True, metavar="auto",
                         **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        off = option_string.startswith("--no_")
        if values is not True and (off or values != "auto"):
            parser.error(f"argument {option_string}: {values!r} is not a value it takes (give "
                         f"{self.option_strings[0]}, {self.option_strings[0]} auto or {self.option_strings[1]})")
        setattr(namespace, self.dest, False if off else values)

    def accepts(self, value):
        return isinstance(value, bool) or value == "auto"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown; a BoolAutoFlag reads `--x [auto], --no_x` (argparse would print `[auto]` after both)."""

    def _format_action_invocation(self, action):
        if isinstance(action, BoolAutoFlag):
            return f"{action.option_strings[0]} [auto], {action.option_strings[1]}"
        return super()._format_action_invocation(action)
