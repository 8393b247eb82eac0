"""Settings: the `.env` file and the environment, validated once at start-up.

Every variable name here is part of the product's interface (see `.env.example`).
A bad value is reported with one line per problem, naming the variable; secrets are never
echoed. A bad schedule turns off only its own job (jobs.Job.problem); any other bad value keeps
`run` from scheduling anything (daemon/unusable.py: it stays up and says so).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from . import redact
from .basics import ToyboxError

SCHEDULE_VARS = ("PGDUMP_SCHEDULE", "VOLUME_FULL_SCHEDULE", "VOLUME_DIFF_SCHEDULE")
CommaList = Annotated[list[str], NoDecode]
_EMAIL = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")
_SECRET_FIELDS = ("postgres_password", "smtp_password", "aws_secret_access_key")


class SettingsError(ToyboxError):
    """The configuration is unusable; `problems` holds one line per problem.

    `fallback`: the same settings with each bad value replaced by its default (None if even
    that fails), so that the daemon can still say so by email; never used to run a backup.
    """

    def __init__(self, problems: list[str], fallback: Settings | None = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.fallback = fallback


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# crontab(5)'s nicknames (@reboot has no place in a daemon's schedule)
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def cron_fields(expr: str) -> str:
    """The 5 fields of a schedule: a nickname (`@daily`) spelled out, else `expr` itself."""
    return CRON_ALIASES.get(expr.lower(), expr)
def split_urls(value: str) -> list[str]:
    """NOTIFY_URLS: URLs separated by commas or white space."""
    return [part for part in re.split(r"[\s,]+", value) if part]


def validate_cron(expr: str) -> str:
    """A standard 5-field crontab(5) expression, a nickname (`@daily`), or empty (job off)."""
    expr = " ".join(expr.split())
    if not expr:
        return ""
    if expr.startswith("@"):
        if expr.lower() not in CRON_ALIASES:
            raise ValueError(f"{expr!r} is not a crontab nickname (one of "
                             f"{', '.join(CRON_ALIASES)})")
        return expr.lower()
    if len(expr.split(" ")) != 5:
        raise ValueError(f"{expr!r} is not a 5-field crontab expression (minute hour day month weekday)")
    try:
        CronSim(expr, datetime(2026, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"{expr!r} is not a valid crontab expression: {exc}") from None
    return expr


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)I?B?\s*$", re.I)


def parse_size(text: str) -> int:
    """"1GB", "512MB", "1073741824" → bytes (binary units: 1GB = 1024³ bytes, as PostgreSQL)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 1GB, 512MB)")
    return int(match.group(1)) * 1024 ** "BKMGT".index((match.group(2) or "B").upper())


def cron_problem(expr: str) -> str | None:
    """Why `expr` is not a usable schedule (None: it is)."""
    try:
        validate_cron(expr)
    except ValueError as exc:
        return str(exc)
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    # schedules and retention
    tz: str = Field("UTC", alias="TZ")
    pgdump_schedule: str = Field("0 17 * * *", alias="PGDUMP_SCHEDULE")
    pgdump_keep_days: int = Field(7, ge=1, alias="PGDUMP_KEEP_DAYS")
    pgdump_format: Literal["custom", "plain"] = Field("custom", alias="PGDUMP_FORMAT")
    volume_full_schedule: str = Field("30 17 * * 0", alias="VOLUME_FULL_SCHEDULE")
    volume_diff_schedule: str = Field("45 17 * * *", alias="VOLUME_DIFF_SCHEDULE")
    volume_keep_days: int = Field(14, ge=1, alias="VOLUME_KEEP_DAYS")
    backup_volumes: CommaList = Field(default_factory=list, alias="BACKUP_VOLUMES")
    volume_compression: Literal["zstd", "gzip", "none"] = Field("zstd", alias="VOLUME_COMPRESSION")
    volume_compression_level: int | None = Field(None, alias="VOLUME_COMPRESSION_LEVEL")
    stop_during_backup: CommaList = Field(default_factory=list, alias="STOP_DURING_BACKUP")
    helper_image: str | None = Field(None, alias="HELPER_IMAGE")
    helper_keep_seconds: int = Field(300, ge=0, alias="HELPER_KEEP_SECONDS")
    catch_up: bool = Field(True, alias="CATCH_UP")
    pgdump_time_limit_min: int = Field(60, ge=1, alias="PGDUMP_TIME_LIMIT_MIN")
    volume_full_time_limit_min: int = Field(240, ge=1, alias="VOLUME_FULL_TIME_LIMIT_MIN")
    volume_diff_time_limit_min: int = Field(120, ge=1, alias="VOLUME_DIFF_TIME_LIMIT_MIN")
    restore_time_limit_min: int = Field(240, ge=1, alias="RESTORE_TIME_LIMIT_MIN")
    disk_margin_percent: int = Field(20, ge=0, alias="DISK_MARGIN_PERCENT")

    # point in time (WAL streaming and online base backups)
    pitr: bool = Field(False, alias="PITR")
    pitr_base_schedule: str = Field("0 3 * * *", alias="PITR_BASE_SCHEDULE")
    pitr_keep_days: int = Field(7, ge=1, alias="PITR_KEEP_DAYS")
    pitr_alert_minutes: int = Field(10, ge=1, alias="PITR_ALERT_MINUTES")
    pitr_max_slot_wal: int = Field(1024**3, ge=64 * 1024**2, alias="PITR_MAX_SLOT_WAL")
    pitr_base_time_limit_min: int = Field(240, ge=1, alias="PITR_BASE_TIME_LIMIT_MIN")

    # where things live
    backup_dir: Path = Field(Path("/backups"), alias="BACKUP_DIR")
    backup_file_mode: Literal["0600", "0640"] = Field("0600", alias="BACKUP_FILE_MODE")
    state_dir: Path = Field(Path("/var/lib/toybox-backupd"), alias="STATE_DIR")

    # email
    notify_email_to: CommaList = Field(default_factory=list, alias="NOTIFY_EMAIL_TO")
    notify_on: Literal["all", "failure"] = Field("all", alias="NOTIFY_ON")
    smtp_host: str | None = Field(None, alias="SMTP_HOST")
    smtp_port: int = Field(587, ge=1, le=65535, alias="SMTP_PORT")
    smtp_user: str | None = Field(None, alias="SMTP_USER")
    smtp_password: SecretStr | None = Field(None, alias="SMTP_PASSWORD")
    smtp_password_file: Path | None = Field(None, alias="SMTP_PASSWORD_FILE")
    smtp_from: str | None = Field(None, alias="SMTP_FROM")
    smtp_security: Literal["starttls", "ssl", "none"] = Field("starttls", alias="SMTP_SECURITY")
    smtp_timeout: int = Field(30, ge=1, alias="SMTP_TIMEOUT")
    smtp_ca_file: Path | None = Field(None, alias="SMTP_CA_FILE")
    backup_host_name: str | None = Field(None, alias="BACKUP_HOST_NAME")

    # chat and ping channels (through the same outbox as email)
    notify_urls: SecretStr | None = Field(None, alias="NOTIFY_URLS")
    ping_url: SecretStr | None = Field(None, alias="PING_URL")
    ping_url_logical: SecretStr | None = Field(None, alias="PING_URL_LOGICAL")
    ping_url_full: SecretStr | None = Field(None, alias="PING_URL_FULL")
    ping_url_diff: SecretStr | None = Field(None, alias="PING_URL_DIFF")

    # database
    postgres_host: str = Field("postgres", alias="POSTGRES_HOST")
    postgres_port: int = Field(5432, ge=1, le=65535, alias="POSTGRES_PORT")
    postgres_db: str = Field("", alias="POSTGRES_DB")
    postgres_user: str = Field("postgres", alias="POSTGRES_USER", min_length=1)
    postgres_password: SecretStr | None = Field(None, alias="POSTGRES_PASSWORD")
    postgres_password_file: Path | None = Field(None, alias="POSTGRES_PASSWORD_FILE")
    pg_container: str | None = Field(None, alias="PG_CONTAINER")

    # off-site copies
    offsite_url: str = Field("", alias="OFFSITE_URL")
    s3_endpoint_url: str | None = Field(None, alias="S3_ENDPOINT_URL", validation_alias=AliasChoices(
        "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"))
    s3_region: str | None = Field(None, alias="S3_REGION",
                                  validation_alias=AliasChoices("S3_REGION", "AWS_REGION"))
    s3_part_size_mb: int = Field(16, ge=5, le=5120, alias="S3_PART_SIZE_MB")
    aws_access_key_id: str | None = Field(None, alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, alias="AWS_SECRET_ACCESS_KEY")
    aws_secret_access_key_file: Path | None = Field(None, alias="AWS_SECRET_ACCESS_KEY_FILE")
    offsite_keep_days: int | None = Field(None, ge=1, alias="OFFSITE_KEEP_DAYS")
    offsite_max_lag_hours: int = Field(36, ge=0, alias="OFFSITE_MAX_LAG_HOURS")
    offsite_age_recipients: CommaList = Field(default_factory=list, alias="OFFSITE_AGE_RECIPIENTS")
    age_identity_file: Path | None = Field(None, alias="AGE_IDENTITY_FILE")
    offsite_signing_key_file: Path | None = Field(None, alias="OFFSITE_SIGNING_KEY_FILE")
    offsite_verify_keys: CommaList = Field(default_factory=list, alias="OFFSITE_VERIFY_KEYS")
    offsite_trust_unsigned: bool = Field(False, alias="OFFSITE_TRUST_UNSIGNED")

    # metrics
    metrics_port: int | None = Field(None, ge=1, le=65535, alias="METRICS_PORT")

    # logs
    log_format: Literal["console", "json"] = Field("console", alias="LOG_FORMAT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="LOG_LEVEL")

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' own sources, or (load_given) another process's environment and
        env file text in place of this process's."""
        given = _GIVEN.get()
        if given is None:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        environ, text = given
        return (init_settings, _GivenEnv(settings_cls, environ), _GivenDotEnv(settings_cls, text),
                file_secret_settings)

    @field_validator("pitr_max_slot_wal", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("pgdump_schedule", "volume_full_schedule", "volume_diff_schedule",
                     "pitr_base_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        # a bad schedule does not stop start-up: it turns its own job off, and the daemon,
        # `check` and `healthcheck` say so (jobs.Job.problem)
        value = " ".join(value.split())
        return validate_cron(value) if cron_problem(value) is None else value

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        value = value.strip()
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Asia/Tokyo, UTC)") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("offsite_url")
    @classmethod
    def _offsite_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if not bucket:
                raise ValueError(f"{value!r} names no bucket (s3://bucket/prefix)")
            return value.rstrip("/")
        if value.startswith("file:///"):
            return value.rstrip("/") if value != "file:///" else value
        raise ValueError(f"{value!r}: use s3://bucket/prefix or file:///absolute/directory")

    @field_validator("offsite_age_recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        if any(item.upper().startswith("AGE-SECRET-KEY-") or "PRIVATE KEY" in item
               for item in value):
            raise ValueError("holds a private key (an age identity): put only public keys "
                             "(age1…) here, and keep the identity off this host")
        bad = [item for item in value if not item.startswith(("age1", "ssh-ed25519 ", "ssh-rsa "))]
        if bad:
            raise ValueError(f"not an age recipient (age1…, or an ssh-ed25519/ssh-rsa public "
                             f"key): {', '.join(bad)}")
        return value

    @field_validator("offsite_verify_keys")
    @classmethod
    def _verify_keys(cls, value: list[str]) -> list[str]:
        if any("PRIVATE KEY" in item for item in value):
            raise ValueError("holds a private key: put only verify keys (ed25519:…, as "
                             "`toybox-backupd check` prints them) here")
        bad = [item[:24] for item in value if not item.startswith("ed25519:")]
        if bad:
            raise ValueError(f"not a verify key (ed25519:…): {', '.join(bad)}")
        return value

    @field_validator("backup_volumes", "stop_during_backup", "notify_email_to",
                     "offsite_age_recipients", "offsite_verify_keys", mode="before")
    @classmethod
    def _comma(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("notify_email_to")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        bad = [address for address in value if not _EMAIL.match(address)]
        if bad:
            raise ValueError(f"not an email address: {', '.join(bad)}")
        return value

    @field_validator("notify_urls", "ping_url", "ping_url_logical", "ping_url_full",
                     "ping_url_diff")
    @classmethod
    def _urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        urls = split_urls(value.get_secret_value())
        redact.register_url(*urls)
        bad = sum(1 for url in urls if "://" not in url)
        if bad:
            raise ValueError(f"{bad} of the {len(urls)} entries are not URLs (scheme://…); "
                             "separate URLs with commas or spaces")
        return value

    @field_validator("smtp_from")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        if value and ("\n" in value or "\r" in value):
            raise ValueError("must be a single line")
        return value

    @field_validator(
        "smtp_host", "smtp_user", "pg_container", "helper_image", "volume_compression_level",
        "smtp_password", "postgres_password", "smtp_password_file", "postgres_password_file",
        "smtp_ca_file", "s3_endpoint_url", "s3_region", "aws_access_key_id",
        "aws_secret_access_key", "aws_secret_access_key_file", "offsite_keep_days",
        "age_identity_file", "offsite_signing_key_file", "backup_host_name", "notify_urls",
        "ping_url", "ping_url_logical", "ping_url_full", "ping_url_diff", "metrics_port", mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _secret_files(self) -> Settings:
        problems: list[str] = []
        for name in _SECRET_FIELDS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            var = f"{name.upper()}_FILE"
            if getattr(self, name) is not None:
                problems.append(f"{var}: set only one of {name.upper()} and {var}")
                continue
            try:
                secret = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                problems.append(f"{var}: cannot read {path}: {exc.strerror or exc}")
                continue
            setattr(self, name, SecretStr(secret))
        if problems:
            raise ValueError("\n".join(problems))
        redact.register(self.postgres_password_value, self.smtp_password_value,
                        self.aws_secret_access_key_value)
        return self

    # convenience -----------------------------------------------------------------------
    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @property
    def postgres_password_value(self) -> str | None:
        return self.postgres_password.get_secret_value() if self.postgres_password else None

    @property
    def smtp_password_value(self) -> str | None:
        return self.smtp_password.get_secret_value() if self.smtp_password else None

    @property
    def aws_secret_access_key_value(self) -> str | None:
        secret = self.aws_secret_access_key
        return secret.get_secret_value() if secret else None

    @property
    def notify_url_list(self) -> list[str]:
        """The Apprise URLs of NOTIFY_URLS (secrets: they hold tokens)."""
        return split_urls(self.notify_urls.get_secret_value()) if self.notify_urls else []

    def ping_url_for(self, job: str) -> tuple[str, str] | None:
        """(variable, URL) that `job` pings: PING_URL_<JOB>, else PING_URL; None if neither."""
        for var in (f"PING_URL_{job.upper()}", "PING_URL"):
            try:
                secret = self.value(var)
            except KeyError:
                continue
            if secret is not None:
                return var, secret.get_secret_value()
        return None

    def weak_secrets(self) -> list[str]:
        """Lines naming each secret that is too short or too common to be one (or masked)."""
        lines = []
        for var, value in (("POSTGRES_PASSWORD", self.postgres_password_value),
                           ("SMTP_PASSWORD", self.smtp_password_value),
                           ("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key_value)):
            if redact.weak(value):
                lines.append(f"{var} is weak (shorter than {redact.MIN_LENGTH} characters or a "
                             "common word): it cannot be masked in logs without mangling other "
                             "text, so it is not; choose a long random one")
        return lines

    def value(self, var: str) -> Any:
        """The value of the setting whose variable is `var` (e.g. "PGDUMP_SCHEDULE")."""
        for name, field in type(self).model_fields.items():
            if field.alias == var:
                return getattr(self, name)
        raise KeyError(f"no setting {var}")

    def schedule_problems(self) -> list[str]:
        """One line per schedule that is not a crontab(5) expression (its job is off)."""
        lines = []
        for var in SCHEDULE_VARS:
            why = cron_problem(str(self.value(var)))
            if why:
                lines.append(f"{var}: {why}")
        return lines

    def compression_level(self) -> int:
        if self.volume_compression_level is not None:
            return self.volume_compression_level
        return {"zstd": 3, "gzip": 6, "none": 0}[self.volume_compression]

    def problems(self) -> list[str]:
        """Cross-field problems that do not belong to one variable's value."""
        problems = []
        if self.pgdump_schedule and not self.postgres_db.strip():
            problems.append("POSTGRES_DB: required while the logical tier is on (PGDUMP_SCHEDULE "
                            "is set); for volume backups only, set PGDUMP_SCHEDULE= (empty)")
        if self.notify_email_to and not self.smtp_host:
            problems.append("SMTP_HOST: required when NOTIFY_EMAIL_TO is set")
        if self.notify_email_to and not self.smtp_from:
            problems.append("SMTP_FROM: required when NOTIFY_EMAIL_TO is set")
        if self.smtp_user and self.smtp_password is None:
            problems.append("SMTP_PASSWORD: required when SMTP_USER is set (or SMTP_PASSWORD_FILE)")
        if (self.volume_full_schedule or self.volume_diff_schedule) and not self.backup_volumes:
            problems.append(
                "BACKUP_VOLUMES: empty, so the full and differential jobs have nothing to archive "
                "(name the volumes, or set VOLUME_FULL_SCHEDULE= and VOLUME_DIFF_SCHEDULE= to turn them off)"
            )
        if self.pitr and not self.pg_container:
            problems.append("PG_CONTAINER: required with PITR=on (the WAL streamer and base "
                            "backups run from the database container's image, beside it)")
        if self.pitr and not self.postgres_db.strip():
            problems.append("POSTGRES_DB: required with PITR=on (the database `restore db --at` "
                            "brings back, and the name of its WAL archive)")
        problems += self._offsite_problems()
        level = self.volume_compression_level
        if level is not None:
            allowed = {"zstd": (1, 22), "gzip": (1, 9), "none": (0, 0)}[self.volume_compression]
            if not allowed[0] <= level <= allowed[1]:
                problems.append(
                    f"VOLUME_COMPRESSION_LEVEL: {level} is outside {allowed[0]}..{allowed[1]} "
                    f"for {self.volume_compression}"
                )
        return problems


    def _offsite_problems(self) -> list[str]:
        problems = []
        if not self.offsite_url:
            return problems
        if self.offsite_url.startswith("s3://") and (
                bool(self.aws_access_key_id) != bool(self.aws_secret_access_key)):
            problems.append("AWS_SECRET_ACCESS_KEY: set both AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or neither, to use the host's role)")
        if self.offsite_url.startswith("file://") and not self.offsite_url[7:].startswith("/"):
            problems.append("OFFSITE_URL: a directory target needs an absolute path: file:///mnt/nas")
        key = self.offsite_signing_key_file
        if key is not None and key.absolute().is_relative_to(self.state_dir.absolute()):
            problems.append(f"OFFSITE_SIGNING_KEY_FILE: {key} is inside STATE_DIR, which is "
                            "rebuildable and lost with the host: keep the key like "
                            "AGE_IDENTITY_FILE (e.g. /run/secrets/signing-key, mounted read-only)")
        return problems

    def offsite_keep(self, tier_days: int) -> int:
        """Days an off-site copy is kept: OFFSITE_KEEP_DAYS, else the tier's local keep days."""
        return self.offsite_keep_days or tier_days


def _field_var(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "settings"
    name = str(loc[0])
    field = Settings.model_fields.get(name)
    if field is not None and field.alias:
        return field.alias
    return name.upper()


def load(env_file: str | os.PathLike[str] | None = ".env", *, strict: bool = True) -> Settings:
    """Load and validate; raise SettingsError with one line per problem.

    With `strict`, cross-field problems (Settings.problems) are errors too. A bad schedule is
    not an error here: it turns its job off (jobs.Job.problem), but when something else is
    wrong it is listed with the rest, so that one round of edits fixes everything.
    """
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = _describe(exc)
        fallback = _fallback(env_file, exc)
        if fallback is not None:  # what else is wrong, named once per variable
            named = {line.split(":", 1)[0] for line in problems}
            problems += [line for line in fallback.problems() + fallback.schedule_problems()
                         if line.split(":", 1)[0] not in named]
        raise SettingsError(problems, fallback) from None
    if strict and (problems := settings.problems()):
        raise SettingsError(problems + settings.schedule_problems(), settings)
    return settings


def _fallback(env_file: str | os.PathLike[str] | None, exc: ValidationError) -> Settings | None:
    """The settings with every value named in `exc` at its default (None if still unusable)."""
    defaults: dict[str, Any] = {}
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error.get("loc", ()))
        fields = [f for name, f in Settings.model_fields.items() if loc and loc[0] in (name, f.alias)]
        if not fields or fields[0].alias is None or fields[0].is_required():
            return None
        defaults[fields[0].alias] = fields[0].get_default(call_default_factory=True)
    try:
        return Settings(_env_file=env_file, **defaults)  # type: ignore[call-arg]
    except ValidationError:
        return None


# another process's settings (a command handing its backup to the daemon) -----------------------
_GIVEN: ContextVar[tuple[Mapping[str, str], str | None] | None] = ContextVar("given", default=None)


class _GivenEnv(EnvSettingsSource):
    """The environment variables another process sent, read as this process reads its own."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        self._given = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


class _GivenDotEnv(DotEnvSettingsSource):
    """The text of another process's env file (None: it had none), read as a file is."""

    def __init__(self, settings_cls: type[BaseSettings], text: str | None):
        self._text = text
        super().__init__(settings_cls, env_file=None)

    def _read_env_files(self) -> Mapping[str, str | None]:
        if self._text is None:
            return {}
        values = dotenv_values(stream=io.StringIO(self._text))
        return parse_env_vars(values, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


def load_given(environ: Mapping[str, str], env_text: str | None) -> Settings:
    """The settings another process loads with `load(its env file, strict=False)`, from its
    environment variables `environ` and the text of its env file (None: no such file); raises
    SettingsError as `load` does. This process's own environment plays no part."""
    token = _GIVEN.set((environ, env_text))
    try:
        return load(None, strict=False)
    finally:
        _GIVEN.reset(token)


def variable_names() -> list[str]:
    """Every setting's variable name (the environment's are matched regardless of case), and
    the standard names also read (AWS_REGION for S3_REGION)."""
    names = [field.alias or name.upper() for name, field in Settings.model_fields.items()]
    for field in Settings.model_fields.values():
        if isinstance(field.validation_alias, AliasChoices):
            names += [str(choice) for choice in field.validation_alias.choices if choice not in names]
    return names


def differences(ours: Settings, our_cwd: str, theirs: Settings, their_cwd: str) -> list[str]:
    """The variables whose values differ between two settings; a relative path is taken from
    its own side's working directory."""
    def values(settings: Settings, cwd: str) -> dict[str, Any]:
        return {name: os.path.normpath(os.path.join(cwd, value)) if isinstance(value, Path)
                else value for name, value in settings.model_dump().items()}

    mine, other = values(ours, our_cwd), values(theirs, their_cwd)
    return [field.alias or name.upper() for name, field in Settings.model_fields.items()
            if mine[name] != other[name]]


def where(env_file: str | os.PathLike[str] | None) -> str:
    """Where the settings came from, as the operator knows it: the file if there is one, else
    the environment (which docker compose fills from `.env` through env_file)."""
    if env_file is not None and Path(env_file).is_file():
        return f"{env_file} and the environment"
    if os.environ.get("TOYBOX_ENV_FILE") == str(env_file):  # the sidecar image
        return "the environment: .env beside docker-compose.yml (env_file)"
    return "the environment" + (f" ({env_file} does not exist)" if env_file else "")


def _describe(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        var = _field_var(tuple(error.get("loc", ())))
        message = str(error.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "required, but not set"
        elif error.get("type") == "int_parsing":
            message = "must be a whole number"
        for part in message.split("\n"):
            part = part.strip()
            if ":" in part and part.split(":", 1)[0].isupper() and part.split(":", 1)[0].endswith("_FILE"):
                lines.append(redact.redact(part))
            else:
                lines.append(redact.redact(f"{var}: {part}"))
    return lines


# docs/configuration.md's settings table is generated from here (python -m toybox_backupd.core.settings)
DESCRIPTIONS: dict[str, str] = {
    "TZ": "IANA time zone the schedules, file names and emails use",
    "PGDUMP_SCHEDULE": "crontab(5) schedule of the logical dump (or `@daily`, `@weekly`...); "
                       "empty turns it off",
    "PGDUMP_KEEP_DAYS": "days logical dumps are kept (the newest is always kept)",
    "PGDUMP_FORMAT": "`custom` (pg_restore, single tables) or `plain` (`.sql.gz`)",
    "VOLUME_FULL_SCHEDULE": "crontab(5) schedule of the full volume archives; empty turns it off",
    "VOLUME_DIFF_SCHEDULE": "crontab(5) schedule of the differential archives; empty turns it off",
    "VOLUME_KEEP_DAYS": "days volume archives are kept (fulls a kept differential needs stay)",
    "BACKUP_VOLUMES": "comma-separated Docker volume names to archive",
    "VOLUME_COMPRESSION": "`zstd`, `gzip` or `none`",
    "VOLUME_COMPRESSION_LEVEL": "compression level (default 3 for zstd, 6 for gzip)",
    "STOP_DURING_BACKUP": "containers (names or compose services) stopped while their volume is "
                          "read, besides those labelled `toybox-backupd.stop-during-backup=true`",
    "HELPER_IMAGE": "image of the helper containers that read and write volumes (needs GNU tar); "
                    "default: the sidecar's own image",
    "HELPER_KEEP_SECONDS": "the daemon keeps its helper container this long after a volume run "
                           "and reuses it for the next one (a `docker exec` instead of a start); "
                           "0: a new helper every run",
    "CATCH_UP": "run a job missed while the daemon was down, once, at start",
    "PGDUMP_TIME_LIMIT_MIN": "time limit of a logical run, minutes",
    "VOLUME_FULL_TIME_LIMIT_MIN": "time limit of a full run, minutes",
    "VOLUME_DIFF_TIME_LIMIT_MIN": "time limit of a differential run, minutes",
    "RESTORE_TIME_LIMIT_MIN": "time limit of a restore, minutes (what it replaces is kept when "
                              "it is stopped)",
    "DISK_MARGIN_PERCENT": "a run is refused early unless BACKUP_DIR has the last artifact's size "
                           "plus this margin free",
    "PITR": "point-in-time recovery: stream the WAL (pg_receivewal) and take online base "
            "backups (pg_basebackup) beside the database container (needs PG_CONTAINER; see "
            "Point-in-time recovery)",
    "PITR_BASE_SCHEDULE": "crontab(5) schedule of the online base backup (with PITR)",
    "PITR_KEEP_DAYS": "days base backups are kept, with the WAL they need (the newest is always "
                      "kept)",
    "PITR_ALERT_MINUTES": "the WAL streamer down this long: healthcheck fails and an email goes "
                          "out",
    "PITR_MAX_SLOT_WAL": "WAL the database may keep for the streamer's replication slot (`1GB`, "
                         "`512MB`); past it the slot is dropped (an alert, then a base backup) "
                         "so the database's disk never fills",
    "PITR_BASE_TIME_LIMIT_MIN": "time limit of a base backup run, minutes",
    "BACKUP_DIR": "where backups are written (plain files; OFFSITE_URL copies them off the host)",
    "BACKUP_FILE_MODE": "`0600` (files only the sidecar's user reads, directories 0700) or "
                        "`0640` (also its group: directories 0750; see Backup files)",
    "STATE_DIR": "SQLite history and catalog, lock file",
    "NOTIFY_EMAIL_TO": "comma-separated recipients of the run reports; empty: no email",
    "NOTIFY_ON": "`all` (every run) or `failure`",
    "SMTP_HOST": "mail server (required with NOTIFY_EMAIL_TO)",
    "SMTP_PORT": "mail server port",
    "SMTP_USER": "SMTP login; empty: no AUTH",
    "SMTP_PASSWORD": "SMTP password (secret)",
    "SMTP_PASSWORD_FILE": "file holding SMTP_PASSWORD (Docker secrets)",
    "SMTP_FROM": "sender address (required with NOTIFY_EMAIL_TO)",
    "SMTP_SECURITY": "`starttls`, `ssl` (implicit TLS) or `none`",
    "SMTP_TIMEOUT": "seconds before an SMTP conversation is given up (retried later)",
    "SMTP_CA_FILE": "extra CA bundle to trust for the mail server's certificate",
    "BACKUP_HOST_NAME": "the host's name in emails; empty: the Docker host's name (from the "
                        "engine), so it survives recreating the sidecar",
    "NOTIFY_URLS": "Apprise URLs (Slack, Teams, Discord, ntfy, Telegram, Matrix, `json://` "
                   "webhooks…), separated by commas or spaces: each gets a short message per run "
                   "(per NOTIFY_ON), retried like email (secret: they hold tokens)",
    "PING_URL": "dead-man's-switch URL (healthchecks.io, Uptime Kuma push): scheduled runs "
                "call `/start`, then the URL on success or `/fail` on failure (secret)",
    "PING_URL_LOGICAL": "PING_URL for the logical job only (overrides PING_URL)",
    "PING_URL_FULL": "PING_URL for the full job only (overrides PING_URL)",
    "PING_URL_DIFF": "PING_URL for the diff job only (overrides PING_URL)",
    "POSTGRES_HOST": "database host as seen from the sidecar",
    "POSTGRES_PORT": "database port",
    "POSTGRES_DB": "the database to back up (required while PGDUMP_SCHEDULE is set)",
    "POSTGRES_USER": "database user (a superuser also saves role passwords)",
    "POSTGRES_PASSWORD": "database password (secret)",
    "POSTGRES_PASSWORD_FILE": "file holding POSTGRES_PASSWORD (Docker secrets)",
    "PG_CONTAINER": "database container name or compose service: pg_dump runs inside it, so its "
                    "version always matches the server; it must run the server at POSTGRES_HOST "
                    "(checked before every backup and restore); empty: the local pg_dump over "
                    "the network",
    "OFFSITE_URL": "where every restore point is also copied: `s3://bucket/prefix` "
                   "(S3-compatible) or `file:///mnt/nas/toybox` (a NAS or second disk); "
                   "empty: off (see Off-site copies)",
    "S3_ENDPOINT_URL": "S3 endpoint for a non-AWS store (MinIO, B2, R2, Wasabi, Garage, "
                       "SeaweedFS), e.g. `https://s3.eu-central-003.backblazeb2.com` (or the standard "
                       "`AWS_ENDPOINT_URL_S3`); empty: AWS",
    "S3_REGION": "S3 region (e.g. `eu-central-1`; or the standard `AWS_REGION`); empty: the "
                 "SDK's default",
    "S3_PART_SIZE_MB": "first part size of an S3 multipart upload (5..5120); parts double every "
                       "900 parts, so an object of up to 5 TiB fits in S3's 10,000 parts",
    "AWS_ACCESS_KEY_ID": "S3 access key id; empty: the SDK's usual sources (instance role, "
                         "~/.aws)",
    "AWS_SECRET_ACCESS_KEY": "S3 secret key (secret)",
    "AWS_SECRET_ACCESS_KEY_FILE": "file holding AWS_SECRET_ACCESS_KEY (Docker secrets)",
    "OFFSITE_KEEP_DAYS": "days off-site copies are kept (chain-aware; the newest good one "
                         "always stays); empty: each tier's local keep days",
    "OFFSITE_MAX_LAG_HOURS": "`healthcheck` fails when the newest off-site restore point is "
                             "older than this; 0: not checked",
    "OFFSITE_AGE_RECIPIENTS": "comma-separated age public keys (`age1…`): every object is "
                              "encrypted for them before it leaves the host; empty: not "
                              "encrypted",
    "AGE_IDENTITY_FILE": "age identity (private key) file, needed only to restore encrypted "
                         "off-site copies; keep it off this host too",
    "OFFSITE_SIGNING_KEY_FILE": "Ed25519 key file (`toybox-backupd keys new --out FILE`) that "
                                "signs every off-site manifest and WAL checksum; keep it like "
                                "the age identity, outside STATE_DIR; empty: copies unsigned",
    "OFFSITE_VERIFY_KEYS": "comma-separated verify keys (`ed25519:…`, printed by `check`) "
                           "whose signatures a restore accepts; the signing key's own is "
                           "always accepted; a new host needs only these",
    "OFFSITE_TRUST_UNSIGNED": "`true`: accept off-site manifests and WAL that carry no "
                              "signature (copies made before signing; like `--trust-unsigned`)",
    "METRICS_PORT": "port the daemon serves Prometheus metrics on (`/metrics`: last success, "
                    "duration and size per job, restore points, outbox, free space); empty: off",
    "LOG_FORMAT": "`console` (readable key=value lines) or `json` (one object a line)",
    "LOG_LEVEL": "`DEBUG`, `INFO`, `WARNING` or `ERROR`",
}


def markdown_table() -> str:
    """The settings table of docs/configuration.md, from the model itself."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        alias = field.alias or name.upper()
        if field.is_required():
            default = "*(required)*"
        else:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, list):
                value = ",".join(value)
            default = f"`{value}`" if value not in (None, "") else "*(empty)*"
        lines.append(f"| `{alias}` | {default} | {DESCRIPTIONS[alias]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())  # noqa: T201 - `python -m toybox_backupd.core.settings` makes the docs' settings table
