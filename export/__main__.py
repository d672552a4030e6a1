"""``python -m export`` = ``lego-export``."""

from export.cli import main

main()
