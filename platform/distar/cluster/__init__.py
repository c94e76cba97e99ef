"""Ray wiring: the session (session), the pools as Serve deployments (pools, calls), the Ray Train
runtime of the run loop with DeepSpeed engines (train_worker, engines), the driver (launch)."""
