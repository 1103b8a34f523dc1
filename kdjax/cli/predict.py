"""``kdjax predict`` (also ``python -m kdjax.predict``): classify image files with a model directory.

    python -m kdjax.predict --checkpoint DIR IMAGE [IMAGE ...]

Prints one JSON object per image on stdout, ``{"path", "label", "probs": {class: p}}``, using
exactly torchvision's evaluation transform at the directory's input size. An image that cannot
be read is reported on stderr (one line) while the others are still classified; the exit code
is then 1. A bad model directory stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kdjax import checkpoint, models
from kdjax.data.transforms import ImageReadError
from kdjax.predict import predict_files


def main(argv: Sequence[str] | None = None, prog: str = "python -m kdjax.predict") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a kdjax model directory")
    parser.add_argument("--arch", choices=sorted(models.ARCHS), help="fail unless the model is this arch")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    name = "kdjax.predict" if prog == "python -m kdjax.predict" else prog
    try:
        if args.arch is not None:
            meta = checkpoint.read_meta(args.checkpoint)
            if meta.arch != args.arch:
                raise checkpoint.ModelDirError(
                    f"{args.checkpoint}: holds a {meta.arch}, but --arch {args.arch} was given"
                )
        failed = False
        for result in predict_files(args.checkpoint, args.images):
            if isinstance(result, ImageReadError):
                failed = True
                print(f"{name}: error: {result}", file=sys.stderr)
            else:
                print(json.dumps(result), flush=True)
    except checkpoint.ModelDirError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
