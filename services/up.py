"""Placeholder: this subcommand is being written (see the open issues)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("not implemented yet")
