"""The job registry (registry.py) and one package per tier, sharing one interface."""
