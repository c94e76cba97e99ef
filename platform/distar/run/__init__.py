"""A training run: the one run loop (loop) over a small runtime interface (runtime), the
in-process runtime (in_process), and what the loop is built from (build, record, validation, timing)."""
