"""Benchmarks (not tests): start latency against dask-gateway, control-plane scale."""
