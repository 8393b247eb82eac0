"""Benchmarks of toybox-backupd against the standard tools (`python -m benchmarks.run`)."""
