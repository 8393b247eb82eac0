"""Point in time: base backups, the WAL archive here and off-site, restores to a moment."""
