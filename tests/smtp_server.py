"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, optional STARTTLS or implicit TLS, AUTH.

    with SMTPServer(tls="starttls", auth=("mailer", "s3cret")) as smtp:
        settings = env.settings(**smtp.settings_values(to="a@example.org,b@example.org"))
        ...
        smtp.wait_for(1)
        message = smtp.messages[0].message        # email.message.EmailMessage
        smtp.stop(); ...; smtp.start()           # down and back up on the same port

- `tls`: None (plain), "starttls" (STARTTLS offered and required before MAIL/AUTH) or "ssl"
  (TLS from the first byte). The certificate is made at start-up by a throwaway CA for
  127.0.0.1 and localhost; `ca_file` is that CA's PEM (give it to SMTP_CA_FILE).
- `auth`: (user, password): AUTH LOGIN and PLAIN are offered (after TLS when TLS is on) and
  required; other credentials are refused with 535 and counted in `auth_failures`.
- Every accepted message is recorded in `messages` (envelope and raw bytes), across restarts.
- `reject_recipients`: addresses refused at RCPT TO with 550.

Nothing here talks to the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.policy
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"
TLSMode = Literal["starttls", "ssl"] | None


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    """One message as the server accepted it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any = None
    authenticated_as: str | None = None
    tls: bool = False

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


# certificates --------------------------------------------------------------------------------
def make_certificates(directory: Path, names: tuple[str, ...] = ("localhost",),
                      ips: tuple[str, ...] = (HOST,)) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed; returns (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    validity = (now - dt.timedelta(hours=1), now + dt.timedelta(days=2))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toybox-backupd test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_file, cert_file, key_file


# the server ----------------------------------------------------------------------------------
class _Handler:
    def __init__(self, server: SMTPServer):
        self.server = server

    async def handle_RCPT(self, smtp: SMTPProtocol, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() in {item.lower() for item in self.server.reject_recipients}:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not data:
            data = envelope.content
        auth = session.auth_data
        user = auth.login.decode() if isinstance(auth, LoginPassword) else None
        with self.server._lock:
            self.server.messages.append(Received(
                mail_from=envelope.mail_from or "", rcpt_tos=list(envelope.rcpt_tos), data=data,
                peer=session.peer, authenticated_as=user, tls=session.ssl is not None))
        return "250 2.0.0 OK queued"


class SMTPServer:
    """aiosmtpd in a thread on 127.0.0.1; a context manager; `stop()`/`start()` keep the port."""

    def __init__(self, *, tls: TLSMode = None, auth: tuple[str, str] | None = None,
                 port: int | None = None, cert_dir: Path | None = None):
        self.tls = tls
        self.auth = auth
        self.host = HOST
        self.port = port or free_port()
        self.messages: list[Received] = []
        self.auth_failures = 0
        self.reject_recipients: set[str] = set()
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: Path | None = None
        self._context: ssl.SSLContext | None = None
        if tls:
            if cert_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="tbt-smtp-")
                cert_dir = Path(self._tmp.name)
            ca_file, cert_file, key_file = make_certificates(cert_dir)
            self.ca_file = ca_file
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(cert_file, key_file)

    # life cycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> SMTPServer:
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {"server_hostname": "smtp.test", "ready_timeout": 10.0}
        if self.tls == "starttls":
            kwargs.update(tls_context=self._context, require_starttls=True)
        elif self.tls == "ssl":
            kwargs.update(ssl_context=self._context)
        if self.auth:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=self.tls is not None)
        controller = Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)
        deadline = time.monotonic() + 10
        while True:  # the port may linger for a moment after a stop
            try:
                controller.start()
                break
            except OSError:
                controller.stop(no_assert=True)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                controller = Controller(_Handler(self), hostname=self.host, port=self.port,
                                        **kwargs)
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # what tests use ----------------------------------------------------------------------
    def _authenticate(self, server: SMTPProtocol, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if (user, password) == self.auth:
                return AuthResult(success=True, auth_data=auth_data)
        with self._lock:
            self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    @property
    def security(self) -> str:
        return self.tls or "none"

    def settings_values(self, to: str = "ops@example.org,tech@example.org",
                        sender: str = "toybox-backupd <backups@example.org>",
                        password: str | None = None, **extra: str) -> dict[str, str]:
        """Environment values (SMTP_*, NOTIFY_EMAIL_TO) that point the product at this server."""
        values = {
            "NOTIFY_EMAIL_TO": to, "SMTP_HOST": self.host, "SMTP_PORT": str(self.port),
            "SMTP_SECURITY": self.security, "SMTP_FROM": sender, "SMTP_TIMEOUT": "5",
            "SMTP_CA_FILE": str(self.ca_file) if self.ca_file else "",
            "SMTP_USER": self.auth[0] if self.auth else "",
            "SMTP_PASSWORD": password if password is not None else (self.auth[1] if self.auth else ""),
        }
        values.update(extra)
        return values

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self._lock:
            raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()


@contextlib.contextmanager
def smtp_server(**kwargs: Any) -> Iterator[SMTPServer]:
    """`with smtp_server(tls="starttls", auth=("u", "p")) as smtp:` — stopped on exit."""
    server = SMTPServer(**kwargs)
    try:
        yield server.start()
    finally:
        server.close()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections but never says a word (to test timeouts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])
    finally:
        sock.close()
