"""`python -m raylm.cli`: the `raylm` command."""

from raylm.cli import main

main()
