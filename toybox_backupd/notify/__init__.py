"""Reports of every run: the outbox, the report's text, SMTP, chat and pings."""
