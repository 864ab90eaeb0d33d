"""The repository's boolean flag: `--x` / `--no_x` (argparse's BooleanOptionalAction spells the negation `--no-x`,
and store_true has none). Every script's parser uses it, so one convention holds everywhere."""
import argparse


class BoolFlag(argparse.Action):
    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        names = [n for opt in option_strings for n in (opt, "--no_" + opt[2:])]
        super().__init__(names, dest, nargs=0, default=default, help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))

    def format_usage(self):
        return " | ".join(self.option_strings)
