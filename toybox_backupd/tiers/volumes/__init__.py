"""The volume tiers (full, diff): archives, restores, the helper container."""
