"""Delivery beside email: Apprise chat URLs (NOTIFY_URLS) and dead-man's-switch pings (PING_URL).

The outbox (notify) decides what to send and when; this module only delivers one message and
says why it could not, in words without the URL (the URLs hold tokens: every one is
registered with `redact.register_url`, and only `label(url)`, which shows the service and host, is stored
or logged).

Ping conventions (`ping_target`):
- healthchecks.io and compatible (the default): `<url>/start` when a run starts, `<url>` on
  success, `<url>/fail` on failure; the POST body says which run and why.
- Uptime Kuma push URLs (`…/api/push/<token>`): `?status=up|down&msg=…` at the end of a run;
  Kuma has no start signal, so none is sent.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Literal

from ..core import redact
from ..core.basics import ToyboxError

Signal = Literal["start", "success", "fail"]
PING_TIMEOUT = 10.0  # seconds: a ping never holds anything up for long


class ChannelError(ToyboxError):
    """A chat message or ping that did not go through, in words without the URL."""


def fingerprint(url: str) -> str:
    """A stable, non-reversible name for `url` (to find it again among NOTIFY_URLS)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def label(url: str) -> str:
    """The service and host of `url`, tokens masked: `slack://T...2`, `json://127.0.0.1:8080`."""
    shown = url
    try:
        import apprise

        plugin = apprise.Apprise.instantiate(url)
        if plugin is not None:
            shown = plugin.url(privacy=True)
    except Exception:  # a label is never worth a failure
        pass
    parts = urllib.parse.urlsplit(shown)
    host = parts.netloc.rsplit("@", 1)[-1]
    return redact.redact(f"{parts.scheme}://{host}")


def unusable(url: str) -> str | None:
    """Why Apprise cannot use `url` (None if it can)."""
    import apprise

    if apprise.Apprise.instantiate(url) is None:
        scheme = url.split("://", 1)[0] if "://" in url else url[:10]
        return (f"{scheme!r}… is not a URL Apprise understands (see "
                "https://github.com/caronc/apprise/wiki for the services and their URL forms)")
    return None


# Apprise ---------------------------------------------------------------------------------------
def send_chat(url: str, *, title: str, body: str, failure: bool) -> None:
    """Deliver one message through Apprise; ChannelError saying why not."""
    import apprise

    redact.register_url(url)
    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise ChannelError(unusable(url) or "Apprise refused the URL")
    kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.SUCCESS
    # what Apprise says goes into our error text, not into the log a second time
    logging.getLogger("apprise").propagate = False
    with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as said:
        ok = notifier.notify(title=title, body=body, notify_type=kind)
        detail = " ".join(said.getvalue().split())
    if not ok:
        raise ChannelError(redact.redact(
            "not delivered" + (f": {detail[:400]}" if detail else " (Apprise gave no reason)")))


# pings -----------------------------------------------------------------------------------------
def kuma(url: str) -> bool:
    """Whether `url` is an Uptime Kuma push URL (`…/api/push/<token>`)."""
    return "/api/push/" in urllib.parse.urlsplit(url).path


def ping_target(url: str, signal: Signal, message: str) -> tuple[str, bytes | None] | None:
    """The URL to call for `signal` and the body to POST (None: nothing to send)."""
    parts = urllib.parse.urlsplit(url)
    if kuma(url):
        if signal == "start":
            return None
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, v) for k, v in query if k not in ("status", "msg")]
        query += [("status", "up" if signal == "success" else "down"), ("msg", message[:200])]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query))), None
    path = parts.path.rstrip("/")
    if signal != "success":
        path += f"/{signal}"
    return urllib.parse.urlunsplit(parts._replace(path=path)), message.encode()[:10_000]


def send_ping(url: str, signal: Signal, message: str, timeout: float = PING_TIMEOUT) -> None:
    """Call the monitor for `signal`; ChannelError saying why not (never the URL itself)."""
    redact.register_url(url)
    target = ping_target(url, signal, message)
    if target is None:
        return
    address, body = target
    host = urllib.parse.urlsplit(url).netloc.rsplit("@", 1)[-1]
    request = urllib.request.Request(address, data=body, method="POST" if body is not None else "GET",
                                     headers={"User-Agent": "toybox-backupd"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(4096)
    except urllib.error.HTTPError as exc:
        raise ChannelError(redact.redact(f"the monitor at {host} answered HTTP {exc.code} "
                                         f"{exc.reason}")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        raise ChannelError(redact.redact(f"cannot reach the monitor at {host}: {reason}")) from None
