"""The base: errors, settings, logs, atomic writes, locks, compression, schedules, manifests."""
