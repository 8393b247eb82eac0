"""The daemon, one module per concern: the scheduler loop and signals (loop), start-up
recovery (recovery), catch-up (catchup), the healthcheck (health) and their state keys (keys).

Import the submodule you need: `healthcheck` must not pay for the scheduler's imports.
"""
