"""``python -m alignlab`` (what ``torchrun -m alignlab`` and ``accelerate launch -m alignlab`` run)."""

from alignlab.cli.main import main

main()
