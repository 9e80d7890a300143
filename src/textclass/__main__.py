"""`python -m textclass`: the command line, as torchrun starts it (`torchrun ... -m textclass train ...`)."""

from textclass.cli import main

main()
