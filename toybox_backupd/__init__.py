"""toybox-backupd: logical, full and differential backups of a docker compose stack."""

__version__ = "0.2.0"
