"""What the command modules share: the usage error, JSON output, choice literals and help texts of flags that
several commands take, and turning a config's ValueError into the usage error of its flag.

Literals here so that building the parser imports nothing heavy (torch, cv2, numpy): `ircnn --help`, any `--help`
and usage errors answer at once. tests/service/cli checks them against detector.nets.googlenet.VARIANTS and
detector.nets.efficientnet_lite.VARIANTS. The runtimes and precisions come from detector.runtimes and
detector.config, which import nothing heavy.
"""

from __future__ import annotations

import json

from detector.runtimes import AUTO, REFERENCE, RUNTIMES

VARIANTS = ("paper", "torchvision")
LITE_VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")

def backend_choices() -> tuple[str, ...]:
    """``--backend``'s choices: auto and every runtime of ``detector.runtimes.RUNTIMES``, read when a parser is
    built, so that a runtime added to the table is a choice everywhere."""
    return (AUTO,) + tuple(RUNTIMES)


def backend_help() -> str:
    return (f"auto (default): the fastest of {', '.join(RUNTIMES)} that matches {REFERENCE} fp32 within 1e-4, "
            "measured once per member architecture on this machine (a few seconds) and cached, see `ircnn model "
            "info BUNDLE --backends`; or force one: " + ", ".join(
                f"{name} ({', '.join(info.precisions)}{'; the reference' if name == REFERENCE else ''})"
                for name, info in RUNTIMES.items()))


PRECISION_HELP = ("fp32 (default) or bf16 (bfloat16, probabilities differ by ~1e-2): faster only where bf16 is "
                  "native (AVX512_BF16 or AMX CPUs, GPUs), slower elsewhere; with --backend auto, bf16 allows "
                  "bf16 candidates where native and lets the measurement decide; int8: the bundle's int8 models "
                  "(made by `ircnn model quantize`), on onnxruntime (auto) or openvino")


class CliError(Exception):
    """A user-facing error: printed to stderr as ``ircnn: error: <message>``, exit code 2."""


def print_json(doc) -> None:
    print(json.dumps(doc))


def count(n: int, word: str, plural: str = "") -> str:
    """``count(1, "image")`` is "1 image", ``count(2, "box", "boxes")`` "2 boxes"."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def flag_error(e: ValueError, *fields: str) -> CliError:
    """A config's ``ValueError`` about one of ``fields`` as the usage error of its flag: "max_regions must be in
    1..3000, got 0" -> "--max-regions must be in 1..3000, got 0". Other messages pass through as they are."""
    message = str(e)
    for name in fields:
        if message.startswith(name + " "):
            return CliError("--" + name.replace("_", "-") + message[len(name):])
    return CliError(message)


def given(**options) -> dict:
    """The options a user set (argparse's None means "not given"), as keywords for a config: a flag left out
    takes the config's default, declared there once."""
    return {k: v for k, v in options.items() if v is not None}


def print_bundle(bundle, as_json: bool) -> None:
    """A bundle's description (`ircnn model ...` and `ircnn train ...` print it after writing one)."""
    info = bundle.describe()
    if as_json:
        print_json(info)
        return
    print(f"bundle      {info['path']}")
    if info["task"] == "det200":
        print(f"task        det200 ({info['classes'] - 1} DET classes + background)")
    elif info["task"] == "det200-from-cls1000":
        print(f"task        det200-from-cls1000 ({info['classes']} CLS classes summed into 200 DET classes)")
    else:
        print(f"task        {info['task']} ({info['classes']} classes)")
    sizes = info["member_sizes"]
    mixed_sizes = len(set(sizes)) > 1
    members = [f"{name}, {params:,} parameters" + (f", {size} px input" if mixed_sizes else "")
               for name, params, size in zip(info["architectures"], info["parameters_per_member"], sizes)]
    if len(set(members)) == 1:
        print(f"members     {len(members)} x {members[0]}")
    else:  # a mixed ensemble: one line per member
        for i, member in enumerate(members):
            print(f"member {i:<4} {member}")
    pre = info["preprocess"]
    side = (f"{'/'.join(map(str, sizes))} px (each member's own)" if mixed_sizes else
            f"{pre['size']}x{pre['size']}")
    print(f"preprocess  {side}, mean {pre['mean']}, std {pre['std']}")
    print(f"multibox    {info['multibox'] or 'none'}")
    print(f"provenance  {short_provenance(info['provenance'])}")


def short_provenance(provenance: dict, width: int = 100) -> str:
    """The provenance on one line of about ``width`` characters: each key with its value, long values cut
    (``ircnn model info --json`` and model.json hold it whole)."""
    parts = []
    for key, value in provenance.items():
        text = json.dumps(value)
        parts.append(f"{key} {text if len(text) <= 40 else text[:37] + '...'}")
    line = ", ".join(parts) or "none"
    more = "... (--json: all of it)"
    return line if len(line) <= width else line[: width - len(more)] + more
