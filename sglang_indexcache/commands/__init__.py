"""One module per ``indexcache`` verb: ``add_arguments(parser)`` and ``run(args) -> int``."""
