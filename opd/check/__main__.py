"""`python -m opd.check ...`: the same as `opd-check ...`."""

from opd.check import main

main()
