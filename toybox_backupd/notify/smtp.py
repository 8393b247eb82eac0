"""SMTP delivery: a connected, encrypted, logged-in client, and failures in plain words.

No secrets in any message: everything said goes through `redact`.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..core import redact
from ..core.basics import ToyboxError
from ..core.settings import Settings

PORT_HINT = "is SMTP_SECURITY right for this port (465 = ssl, 587 = starttls)?"


class NotifyError(ToyboxError):
    """An SMTP problem, already in words an operator can act on (no secrets)."""


def host_token() -> str:
    """This host's name, made safe for HELO and Message-IDs."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip(".-")
    return host or "localhost"


@dataclass
class Connection:
    client: smtplib.SMTP
    description: str  # "smtp.example.com:587 (STARTTLS, certificate verified, logged in as x)"

    def close(self) -> None:
        try:
            self.client.quit()
        except Exception:
            with contextlib.suppress(Exception):
                self.client.close()


@contextlib.contextmanager
def connection(settings: Settings) -> Iterator[Connection]:
    """`open_connection`, closed (QUIT) on the way out."""
    conn = open_connection(settings)
    try:
        yield conn
    finally:
        conn.close()


def _tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.smtp_ca_file:
        try:
            context.load_verify_locations(cafile=str(settings.smtp_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise NotifyError(f"SMTP_CA_FILE: cannot use {settings.smtp_ca_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


class _Opening:
    """The stages of opening a connection; `stage` names the one under way (for errors)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.where = f"{settings.smtp_host}:{settings.smtp_port}"
        self.stage = "connecting"
        self.parts: list[str] = []
        self.context = _tls_context(settings) if settings.smtp_security != "none" else None

    def connect(self) -> smtplib.SMTP:
        # the constructor connects and reads the greeting (SMTPConnectError unless 220)
        s = self.settings
        if s.smtp_security == "ssl":
            return smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, local_hostname=host_token(),
                                    timeout=s.smtp_timeout, context=self.context)
        return smtplib.SMTP(s.smtp_host, s.smtp_port, local_hostname=host_token(),
                            timeout=s.smtp_timeout)

    def secure(self, client: smtplib.SMTP) -> None:
        self.stage = "EHLO"
        client.ehlo_or_helo_if_needed()
        security = self.settings.smtp_security
        if security == "ssl":
            self.parts.append("SSL/TLS, certificate verified")
            return
        if security == "none":
            self.parts.append("no encryption")
            return
        self.stage = "STARTTLS"
        if not client.has_extn("starttls"):
            raise NotifyError(
                f"the server at {self.where} does not offer STARTTLS; use SMTP_SECURITY=ssl "
                "if it expects TLS from the start (usually port 465), or SMTP_SECURITY=none "
                "for a server on a trusted network")
        client.starttls(context=self.context)
        client.ehlo()
        self.parts.append("STARTTLS, certificate verified")

    def login(self, client: smtplib.SMTP) -> None:
        s = self.settings
        if not s.smtp_user:
            self.parts.append("no login")
            return
        self.stage = "AUTH"
        if not client.has_extn("auth"):
            raise NotifyError(
                f"the server at {self.where} does not offer AUTH (login) "
                + ("over an unencrypted connection; set SMTP_SECURITY=starttls or ssl"
                   if s.smtp_security == "none" else "; leave SMTP_USER empty if it needs no login"))
        client.login(s.smtp_user, s.smtp_password_value or "")
        self.parts.append(f"logged in as {s.smtp_user}")


def open_connection(settings: Settings) -> Connection:
    """A connected, greeted, encrypted (as configured) and logged-in SMTP client.

    Raises NotifyError saying which stage failed and why.
    """
    if not settings.smtp_host:
        raise NotifyError("SMTP_HOST is not set, so there is no mail server to send through")
    opening = _Opening(settings)
    client: smtplib.SMTP | None = None
    try:
        client = opening.connect()
        opening.secure(client)
        opening.login(client)
    except Exception as exc:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if isinstance(exc, NotifyError):
            raise
        raise NotifyError(describe_error(exc, settings, opening.stage)) from exc
    return Connection(client, f"{opening.where} ({', '.join(opening.parts)})")


def send(client: smtplib.SMTP, settings: Settings, recipients: list[str],
         message: bytes) -> dict[str, tuple[int, bytes]]:
    """Send one message; return the recipients the server refused (others were accepted)."""
    sender = email.utils.parseaddr(settings.smtp_from or "")[1]
    if not sender:
        raise NotifyError("SMTP_FROM is not set (the sender address)")
    if not recipients:
        raise NotifyError("the message has no recipients")
    try:
        return client.sendmail(sender, recipients, message)
    except Exception as exc:
        raise NotifyError(describe_error(exc, settings, "sending")) from exc


def reply(code: int, message: bytes | str) -> str:
    """An SMTP reply on one line: "535 5.7.8 Authentication failed"."""
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    return f"{code} {' '.join(text.split())}".strip()


def refused_text(refused: dict[str, tuple[int, bytes]]) -> str:
    """The refused recipients and the server's replies, on one line."""
    return "; ".join(f"{rcpt} ({reply(code, msg)})" for rcpt, (code, msg) in refused.items())


# failures in words ---------------------------------------------------------------------------
@dataclass
class _Said:
    settings: Settings
    where: str
    stage: str
    during: str


def _auth(exc: smtplib.SMTPAuthenticationError, c: _Said) -> str:
    return (f"authentication failed: the server at {c.where} refused SMTP_USER "
            f"{c.settings.smtp_user!r} with the configured SMTP_PASSWORD "
            f"({reply(exc.smtp_code, exc.smtp_error)}); check the user name and password")


def _recipients(exc: smtplib.SMTPRecipientsRefused, c: _Said) -> str:
    return (f"recipient refused: the server at {c.where} accepted none of the recipients: "
            f"{refused_text(exc.recipients)}")


def _sender(exc: smtplib.SMTPSenderRefused, c: _Said) -> str:
    return (f"sender refused: the server at {c.where} does not accept SMTP_FROM {exc.sender!r} "
            f"({reply(exc.smtp_code, exc.smtp_error)})")


def _disconnected(exc: smtplib.SMTPServerDisconnected, c: _Said) -> str:
    return (f"the server at {c.where} closed the connection unexpectedly{c.during}"
            + (f": {exc}" if str(exc) else "")
            + (f"; {PORT_HINT}" if c.stage in ("connecting", "EHLO") else ""))


def _ssl(exc: ssl.SSLError, c: _Said) -> str:
    hint = ""
    if "WRONG_VERSION_NUMBER" in str(exc).upper() or "wrong version" in str(exc).lower():
        hint = f"; the server does not speak TLS here: {PORT_HINT}"
    reason = str(exc.reason).replace("_", " ").lower() if exc.reason else str(exc)
    return f"TLS failed with {c.where}{c.during}: {reason}{hint}"


# the first matching type wins: subclasses before their bases
_WORDS: list[tuple[type[BaseException], Callable[[object, _Said], str]]] = [
    (NotifyError, lambda e, c: str(e)),
    (smtplib.SMTPAuthenticationError, _auth),  # type: ignore[list-item]
    (smtplib.SMTPRecipientsRefused, _recipients),  # type: ignore[list-item]
    (smtplib.SMTPSenderRefused, _sender),  # type: ignore[list-item]
    (smtplib.SMTPDataError, lambda e, c: f"message refused by the server at {c.where} "
                                         f"({reply(e.smtp_code, e.smtp_error)})"),  # type: ignore[attr-defined]
    (smtplib.SMTPNotSupportedError, lambda e, c: f"the server at {c.where} does not support "
                                                 f"what was asked{c.during}: {e}"),
    (smtplib.SMTPServerDisconnected, _disconnected),  # type: ignore[list-item]
    (smtplib.SMTPConnectError, lambda e, c: (
        f"the server at {c.where} refused the session: it greeted with "
        f"{reply(e.smtp_code, e.smtp_error)} instead of 220 (ready)")),  # type: ignore[attr-defined]
    (smtplib.SMTPResponseException, lambda e, c: (
        f"the server at {c.where} answered {reply(e.smtp_code, e.smtp_error)}"  # type: ignore[attr-defined]
        f"{c.during}")),
    (ssl.SSLCertVerificationError, lambda e, c: (
        f"TLS failed: the certificate of {c.where} is not trusted "
        f"({e.verify_message or e.reason}); check SMTP_HOST matches the certificate, "  # type: ignore[attr-defined]
        "or give its CA in SMTP_CA_FILE")),
    (ssl.SSLError, _ssl),  # type: ignore[list-item]
    (ConnectionRefusedError, lambda e, c: (
        f"connection refused by {c.where}: no mail server listens there "
        "(check SMTP_HOST and SMTP_PORT)")),
    (TimeoutError, lambda e, c: (
        f"timed out after {c.settings.smtp_timeout} s waiting for {c.where}{c.during} "
        "(SMTP_TIMEOUT); is the host reachable and the port right?")),
    (socket.gaierror, lambda e, c: (
        f"cannot resolve SMTP_HOST {c.settings.smtp_host!r}: "
        f"{e.strerror or e}")),  # type: ignore[attr-defined]
    (OSError, lambda e, c: f"network error talking to {c.where}{c.during}: "
                           f"{e.strerror or e}"),  # type: ignore[attr-defined]
]


def describe_error(exc: BaseException, settings: Settings, stage: str = "") -> str:
    """An SMTP/network failure in plain words (no secrets)."""
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, OSError):
        exc = exc.__context__  # smtplib hides a timeout or reset behind "unexpectedly closed"
    said = _Said(settings, f"{settings.smtp_host}:{settings.smtp_port}", stage,
                 f" (during {stage})" if stage and stage not in ("connecting", "sending") else "")
    for kind, words in _WORDS:
        if isinstance(exc, kind):
            return redact.redact(words(exc, said))
    return redact.redact(f"{exc.__class__.__name__} talking to {said.where}{said.during}: {exc}")
