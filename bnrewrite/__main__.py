"""``python -m bnrewrite`` runs the CLI (also what torchrun launches for distributed commands)."""

from .cli import main

main()
