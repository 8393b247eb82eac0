"""The catalog of restore points: choosing one, rebuilding it from BACKUP_DIR or off-site."""
