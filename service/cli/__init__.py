"""The ``ircnn`` command line. Each command parses, validates and calls the same functions the service calls.

Human-readable text by default, one JSON document (or JSON lines) with ``--json``; errors go to stderr with a
non-zero exit code and a message that says what to do. One module per command group, each with ``add_parser(sub)``;
they import torch and the models inside their commands only, so that `ircnn --help`, any `--help` and usage errors
answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from service.cli import classify, data, detect, evaluate, model, propose, quickstart, serve, train
from service.cli.common import CliError

# the order of `ircnn --help`
COMMANDS = (model, train, evaluate, data, propose, classify, detect, serve, quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ircnn", description="GoogLeNet classification and R-CNN detection "
                                     "as in 'Going deeper with convolutions'")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ircnn = main  # a command made of other commands (quickstart) runs them through this, in this process
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader that went away can be answered quietly
        return code
    except BrokenPipeError:  # `ircnn model info | head`: the reader has what it wanted
        _stdout_to_devnull()
        return 1
    except (CliError, ValueError, OSError) as e:
        # Domain errors (bad bundle, bad image, malformed file) are ValueError/OSError subclasses whose
        # messages say what to do; IRCNN_DEBUG=1 shows the traceback instead.
        if os.environ.get("IRCNN_DEBUG"):
            raise
        print(f"ircnn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ircnn: interrupted", file=sys.stderr)
        return 130


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (a test's capture)
        pass
