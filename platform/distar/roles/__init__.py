"""The roles of a DI* run as plain classes (no Ray, no I/O), with their request and result types:
the reward worker, the reference worker and the trainer step.

A pool is a set of workers: on Ray each replica of a Serve deployment holds one (distar.cluster);
in one process the run calls them directly (distar.run.in_process).
"""
