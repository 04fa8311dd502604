"""What a run's driver does: pre-flight, Ray session, attempts, the worker loop, the run directory."""
