"""Benchmarks behind `python -m unet_dist.bench`; each `run(args)` returns a JSON-able dict."""
