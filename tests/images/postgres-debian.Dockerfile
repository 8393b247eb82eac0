# A PostgreSQL image of the plain Debian-package shape (what a user's own `apt-get install
# postgresql-15` image looks like): the same packages as postgres.Dockerfile but NO `ENV PATH`,
# so only pg_wrapper's links are in /usr/bin (psql, pg_dump, pg_basebackup, pg_receivewal, ...)
# and pg_waldump, pg_amcheck, pg_ctl and postgres are only in /usr/lib/postgresql/15/bin. The
# entrypoint finds the server's programs there itself (postgres-debian-entrypoint.sh).
ARG BASE_IMAGE=toybox-test/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15 /etc/postgresql/15/main \
 && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY postgres-debian-entrypoint.sh /usr/local/bin/debian-entrypoint.sh
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/debian-entrypoint.sh"]
CMD ["postgres"]
