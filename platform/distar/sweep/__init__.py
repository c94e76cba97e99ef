"""Ray Tune sweeps over a run config: the space file (`space`)."""
