"""`python -m runner`: the same as the `airlock` command."""

from runner.entry import main

main()
