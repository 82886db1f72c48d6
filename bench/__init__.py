"""chatd benchmark harness: ``python -m bench run --scenario rooms`` (see bench/README.md)."""
