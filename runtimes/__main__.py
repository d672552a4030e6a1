"""``python -m runtimes`` is ``python -m runtimes.sample``."""

from runtimes.sample import main

main()
