"""The benchmarks of tools/bench.py, one module per subcommand; each prints one JSON object per measurement."""
