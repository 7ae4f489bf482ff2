"""The ``ircnn`` command line. Each command parses, validates and calls the same functions the service calls.

Human-readable text by default, one JSON document (or JSON lines) with ``--json``; errors go to stderr with a
non-zero exit code and a message that says what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class CliError(Exception):
    """A user-facing error: printed to stderr as ``ircnn: error: <message>``, exit code 2."""


def _print_json(doc) -> None:
    print(json.dumps(doc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ircnn", description="GoogLeNet classification and R-CNN detection "
                                     "as in 'Going deeper with convolutions'")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="create, import and inspect model bundles")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    _add_model_commands(model_sub)

    train = sub.add_parser("train", help="train a classifier (and later detectors, MultiBox)")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    _add_train_commands(train_sub)

    ev = sub.add_parser("eval", help="score predictions")
    eval_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    _add_eval_commands(eval_sub)

    _add_classify_command(sub)
    return parser


# ---- ircnn model ... -------------------------------------------------------------------------------------


def _add_model_commands(sub) -> None:
    pass


# ---- ircnn train ... -------------------------------------------------------------------------------------


def _add_train_commands(sub) -> None:
    pass


# ---- ircnn eval ... --------------------------------------------------------------------------------------


def _add_eval_commands(sub) -> None:
    pass


# ---- ircnn classify --------------------------------------------------------------------------------------


def _add_classify_command(sub) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
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


if __name__ == "__main__":
    sys.exit(main())
