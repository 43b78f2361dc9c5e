"""QueueService: sessions, lanes, admission, batched durable intake and result fan-out."""
