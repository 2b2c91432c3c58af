"""The commands of the ``qsmnode`` command line that are more than a few lines, one module
each (:mod:`qsmnode.cli` parses the arguments and calls them)."""
