"""`python -m edgeport`: the same command line as `edgeport`."""

from edgeport.cli import main

main()
