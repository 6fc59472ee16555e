"""Speed benchmarks: `python -m repro bench NAME`; each module has main(argv)."""
