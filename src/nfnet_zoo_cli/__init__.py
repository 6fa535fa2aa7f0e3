"""The `nfnet-zoo` command line, apart from the nfnet_zoo package so that `nfnet-zoo --help` and usage errors
import neither it nor torch and timm (importing nfnet_zoo registers its models with timm, which takes seconds).

`settings.py` declares every setting of `nfnet-zoo finetune` once (nfnet_zoo.FinetuneConfig is its dataclass);
`cli.py` parses the arguments and calls one public function of nfnet_zoo per command.
"""
from .cli import build_parser, exit_process, main, run

__all__ = ["main", "run", "build_parser", "exit_process"]
