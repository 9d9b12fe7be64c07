"""Support for test_reliability.py: a tiny model and data, file helpers, and the scripts the
fault tests run in subprocesses (they import ``common`` as a sibling module)."""
