"""``kdjax convert | export | fetch`` (also ``python -m kdjax.weights convert|fetch|list|export``):
torchvision and timm files to kdjax model directories and back, and torchvision's ImageNet files.

    python -m kdjax.weights convert --arch ARCH --src FILE --out DIR [--class-names ants,bees]
    python -m kdjax.weights convert --from timm --arch resnet50.a1_in1k --src model.safetensors --out DIR
    python -m kdjax.weights fetch --arch ARCH [--weights IMAGENET1K_V2]
    python -m kdjax.weights list
    python -m kdjax.weights export --checkpoint DIR --out FILE.pth

``FILE`` is read by :mod:`kdjax.models.torchfile` (no torch, no pickled code run) and may hold a
state_dict or a whole pickled module; :mod:`kdjax.models.torchvision` maps it, strictly, or with
``--from timm`` :mod:`kdjax.models.timm` (``--arch`` is then a timm name, ``model[.tag]``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

from kdjax import checkpoint, models
from kdjax.fetch import DownloadError
from kdjax.models import timm
from kdjax.models.torchfile import TorchFileError
from kdjax.models.torchvision import DEFAULT_DIR
from kdjax.weights import (
    IMAGENET_WEIGHTS,
    ClassNamesError,
    WeightMappingError,
    convert,
    convert_timm,
    export,
    fetch,
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's usage block
        raise _UsageError(message)


def _class_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise ClassNamesError(f"empty name in {text!r}")
    if len(set(names)) != len(names):
        raise ClassNamesError(f"duplicate names in {text!r}")
    return names


def _print_weights() -> None:
    from kdjax.models import imagenet

    print(f"{'arch':18s} {'weights':26s} {'acc@1':>6s}  {'eval transform':28s} {'checked by':10s} file")
    for arch, by_name in imagenet.WEIGHTS.items():
        for w in by_name.values():
            transform = f"resize {w.resize_size} {w.interpolation}, crop {w.crop_size}"
            print(f"{arch:18s} {w.name:26s} {w.acc1:6.2f}  {transform:28s} {imagenet.verification(w):10s} "
                  f"{w.filename}")


def main(argv: Sequence[str] | None = None, prog: str = "python -m kdjax.weights") -> int:
    """``prog`` is the parser's name: the ``kdjax`` console script passes ``kdjax``, so usage and
    errors read ``kdjax convert ...``."""
    parser = _Parser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="torchvision .pth/.pt or timm file -> kdjax model directory")
    conv.add_argument("--from", dest="source", choices=("torchvision", "timm"), default="torchvision",
                      help="whose parameter names the file has (default torchvision)")
    conv.add_argument("--arch", required=True,
                      help=f"torchvision: one of {', '.join(sorted(models.ARCHS))}; timm: a timm name MODEL[.TAG] "
                           f"(a bare MODEL is timm's default tag) of {', '.join(timm.ARCHS)}")
    conv.add_argument("--src", required=True, type=pathlib.Path,
                      help="state_dict or module file (.pth, .pt; .safetensors)")
    conv.add_argument("--out", required=True, type=pathlib.Path, help="model directory to write")
    conv.add_argument("--class-names", help="comma-separated, in output order (default class_i)")
    get = commands.add_parser("fetch", help=f"torchvision's ImageNet file -> {DEFAULT_DIR}/")
    get.add_argument("--arch", required=True, choices=sorted(IMAGENET_WEIGHTS))
    get.add_argument("--weights", help="torchvision's weight name (default IMAGENET1K_V1; see `list`)")
    commands.add_parser("list", help="torchvision's ImageNet weights for every architecture")
    out = commands.add_parser("export", help="kdjax model directory -> torchvision state_dict .pth + .json")
    out.add_argument("--checkpoint", required=True, type=pathlib.Path, help="a kdjax model directory")
    out.add_argument("--out", required=True, type=pathlib.Path, help="the .pth file to write")

    command = (list(argv or sys.argv[1:]) or [""])[0]
    name = "kdjax.weights" if prog == "python -m kdjax.weights" else f"{prog} {command}".strip()

    def fail(message: str) -> int:
        print(f"{name}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2

    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        return fail(str(err))
    try:
        if args.command == "fetch":
            print(fetch(args.arch, name=args.weights))
            return 0
        if args.command == "list":
            _print_weights()
            return 0
        if args.command == "export":
            path, sidecar = export(args.checkpoint, args.out)
            builder = json.loads(sidecar.read_text()).get("torchvision_builder")
            if builder and builder != "none":
                print(f"{path} (+ {sidecar.name}): load with torchvision.models.{builder}(num_classes=n)"
                      ".load_state_dict(torch.load(path), strict=True)")
            else:
                print(f"{path} (+ {sidecar.name}): a state_dict with the PyTorch reference's parameter names "
                      "(the sidecar names the architecture); load it strictly into that network")
            return 0
        if args.source == "torchvision" and args.arch not in models.ARCHS:
            return fail(f"argument --arch: invalid choice: {args.arch!r} (choose from "
                        f"{', '.join(map(repr, sorted(models.ARCHS)))}; a timm name needs --from timm)")
        w = timm.get(args.arch) if args.source == "timm" else None  # unknown: a ValueError naming the known
        names = _class_names(args.class_names) if args.class_names is not None else None
        if w is None:
            meta = convert(args.src, args.out, arch=args.arch, class_names=names)
        else:
            meta = convert_timm(args.src, args.out, w.tag, class_names=names)
            for note in timm.notes(w).values():
                print(f"{name}: warning: {note}", file=sys.stderr)
    except ClassNamesError as err:
        return fail(f"--class-names: {err}")
    except (WeightMappingError, TorchFileError, DownloadError, checkpoint.ModelDirError,
            OSError, ValueError) as err:
        return fail(str(err))
    print(f"{args.out}: {meta.arch}, {meta.num_classes} classes, {meta.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
