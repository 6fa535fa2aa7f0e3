"""Command line: argument parsing only; each command calls one public function of the package.

Imports of the heavy modules happen inside the handlers so that `nfnet-zoo --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from .errors import NFNetZooError


# --- convert ---------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official DeepMind checkpoint (F0_haiku.npz ...) into a timm model folder",
        description="Read an official DeepMind NFNet checkpoint safely (no code is executed), infer "
        "its architecture from the tensor shapes, and write DIR/model.safetensors and a timm "
        "DIR/config.json. Load the result with timm.create_model('local-dir:DIR', pretrained=True) "
        "after `import nfnet_zoo`.",
    )
    p.add_argument("src", help="DeepMind checkpoint, e.g. F0_haiku.npz (a dill/pickle file)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--activation", default="gelu",
                   help="nonlinearity the checkpoint was trained with; shapes cannot reveal it (default: gelu)")
    p.add_argument("--alpha", type=float, default=0.2,
                   help="residual scaling alpha the checkpoint was trained with (default: 0.2)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from .convert import convert_haiku_checkpoint

    out = convert_haiku_checkpoint(args.src, args.out, activation=args.activation, alpha=args.alpha)
    print(f"wrote {out}/model.safetensors and {out}/config.json")


# --- (other commands register themselves below: one _add_<command> function each) ------------

_COMMANDS = [_add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfnet-zoo",
        description="DeepMind-faithful NFNets for timm: convert, fine-tune, evaluate and publish.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NFNetZooError as e:
        print(f"nfnet-zoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nfnet-zoo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
