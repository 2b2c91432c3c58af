"""Quantitative susceptibility mapping: pure numerical code, arrays in and arrays out.

The engine is :func:`qsmnode.qsm.engine.run_qsm` with its settings in
:class:`qsmnode.qsm.engine.QSMParams`; each step is its own module (``mask``, ``offsets``,
``unwrap``, ``fieldfit``, ``quality``, ``background``, ``inversion``, ``reference``,
``relaxometry``), with the parameter type of each method beside it (``background.PDF``,
``inversion.SingleStepTV``, ``mask.MaskParams``, ...), which ``QSMParams`` composes.
``engine.METHODS`` names the measured pipelines; ``DEFAULT_METHOD`` (here, so that commands
and the configuration name it without importing numpy) is the one ``QSMParams()`` holds and
the node runs.
"""

DEFAULT_METHOD = "tfi"

METHOD_NAMES: tuple[str, ...] = ("tfi", "single-step-tv", "pdf-tv-admm")
"""The names of ``engine.METHODS``, for what must name a method without importing numpy (the
configuration's ``[pipeline] qsm_method``; a test keeps them equal)."""
