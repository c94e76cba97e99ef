"""Ray Tune sweeps over a run config: the space file (space), one trial (trial), the driver
(runner) and what it leaves to read (results)."""
