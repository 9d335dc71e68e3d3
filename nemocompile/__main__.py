"""`python -m nemocompile`: the command line (what `nemocompile run --world-size` starts per rank)."""

from nemocompile.cli import main

main()
