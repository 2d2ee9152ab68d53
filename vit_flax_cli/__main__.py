"""`python -m vit_flax_cli ...` is the `vit-flax` command."""
from .cli import run

run()
