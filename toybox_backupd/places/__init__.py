"""Where backups live besides BACKUP_DIR: the off-site targets, copies and fetches."""
