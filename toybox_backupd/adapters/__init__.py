"""The outside world: the Docker SDK, psycopg, the PostgreSQL client tools."""
