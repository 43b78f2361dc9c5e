"""WorkerService: lane consumers, handler registry, retries, dead letters, control RPCs."""
