"""`fairlane bench`: drives a running suite and reports throughput, latency and correctness."""

from fairlane_server.bench.command import bench_command

__all__ = ["bench_command"]
