"""Off-site copies: S3-compatible or directory targets, age encryption, the upload queue."""
