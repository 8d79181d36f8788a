"""``python -m ckapipe``: the same command line as ``ckapipe``."""

from ckapipe.cli import main

main()
