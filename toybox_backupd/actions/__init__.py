"""What one command or one scheduled run does: run a job, back up by hand, verify, check, retention."""
