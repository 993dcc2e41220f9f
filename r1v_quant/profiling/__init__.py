"""`profile`: measured load time, TTFT, prefill / decode speed and peak memory of a real run."""
