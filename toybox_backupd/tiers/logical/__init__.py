"""The logical tier: pg_dump backups and their restores."""
