"""``python -m alignlab.cli``."""

from alignlab.cli.main import main

main()
