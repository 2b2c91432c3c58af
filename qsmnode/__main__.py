"""`python -m qsmnode` runs the command line."""

from qsmnode.cli import main

raise SystemExit(main())
