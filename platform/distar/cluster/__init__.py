"""Ray wiring: the pools as Serve deployments, the trainer on Ray Train with DeepSpeed engines."""
