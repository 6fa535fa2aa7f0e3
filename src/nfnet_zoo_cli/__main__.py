"""`python -m nfnet_zoo_cli ...` (what torchrun runs: torchrun ... -m nfnet_zoo_cli finetune ...)."""
from .cli import run

if __name__ == "__main__":
    run()
