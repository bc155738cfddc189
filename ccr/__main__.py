"""`python -m ccr`: the command line."""

from ccr.cli import main

main()
