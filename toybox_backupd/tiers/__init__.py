"""The tiers: one module each, sharing one interface (see jobs.py); imported by the registry."""
