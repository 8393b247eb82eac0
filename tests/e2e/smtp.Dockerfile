# A real SMTP server for the end-to-end test: aiosmtpd from Debian, storing every message in the
# Maildir /mail (read back with `python3 -m mailbox`-style code through `docker exec`). It runs on
# the test's compose network only; no port is published.
ARG BASE_IMAGE=toybox-test/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-aiosmtpd >/dev/null \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 1025
CMD ["python3", "-m", "aiosmtpd", "-n", "-l", "0.0.0.0:1025", "-c", "aiosmtpd.handlers.Mailbox", "/mail"]
