"""`python -m ccr`: the command line."""

from ccr.entrypoint import main

main()
