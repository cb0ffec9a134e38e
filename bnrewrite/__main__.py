"""``python -m bnrewrite`` runs the CLI (also what torchrun launches for distributed commands)."""

from bnrewrite.cli import main

main()
