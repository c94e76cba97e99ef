"""The roles of a DI* run as plain classes (no Ray): reward worker, reference pool, trainer step.

Ray wraps these same classes as actors; the in-process runner wires them in one process.
"""
