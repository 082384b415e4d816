"""How every Kafka client of ours connects, and the environment settings every component shares.

Each component keeps a frozen dataclass that code builds directly and changes with
``dataclasses.replace`` (``KafkaConnection`` here, ``ProducerConfig``, ``AggregatorConfig``). The
environment is read only at the edge, by one pydantic-settings class per component
(``KafkaSettings`` and ``DeploymentSettings`` here, ``ProducerSettings``, ``AggregatorSettings``):
exact variable names, typed and bounded values, and an invalid value is a ``SettingsError`` whose
message is one line naming the variable. ``from_env`` on a dataclass is that class's ``read`` and
``config()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import Field, FilePath, SecretStr, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from schemas.topics import DEFAULT_PREFIX, TopicLayout
from transport.errors import TransportError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaConnection:
    """How every Kafka client of ours connects. Secrets are ``SecretStr``: they never print."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if "SSL" in self.security_protocol:
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=self.ssl_password.get_secret_value() if self.ssl_password else None,
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kwargs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaConnection:
        """``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``, ``KAFKA_SSL_*``
        (``KafkaSettings``); ``SettingsError`` for an invalid value."""
        return KafkaSettings.read(env).connection()


# -- settings from the environment ---------------------------------------------------------------


class SettingsError(TransportError, ValueError):
    """Settings that fail validation. ``problems`` pairs each culprit with what is wrong with it: the
    environment variable, or the field name for a value given in code or by a command-line flag.
    The message is all of them on one line; a secret's value is never in it."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {why}" if name else why for name, why in problems))


# The environment ``EnvSettings.read`` was given; None: the process's own.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("tokenguard_environ", default=None)


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, over ``os.environ`` or the mapping ``read`` was given.
    An empty variable counts as unset, except those a class lists in ``empty_is_a_value``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        keep: frozenset[str] = getattr(self.settings_cls, "empty_is_a_value", frozenset())
        return {name: value for name, value in self._environ.items() if value or name in keep}


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


class EnvSettings(BaseSettings):
    """Base of every component's settings: each field names its variable exactly (its
    ``validation_alias``: no prefix, case-sensitive); values passed by field name (flags, code) win
    over the environment; frozen; NaN and infinities refused."""

    model_config = SettingsConfigDict(
        frozen=True, case_sensitive=True, validate_by_name=True, validate_by_alias=True, extra="forbid",
        allow_inf_nan=False,
    )
    # Variables whose empty value means something (TOKENGUARD_SPOOL_DIR="": no spool).
    empty_is_a_value: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        return init_settings, _Environment(settings_cls, os.environ if environ is None else environ)

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """The settings in ``env`` (default: the process environment), with ``overrides`` (by field
        name; ``None`` is skipped) winning. ``SettingsError`` names each invalid value."""
        token = _ENVIRON.set(env)
        try:
            return cls(**{name: value for name, value in overrides.items() if value is not None})
        except ValidationError as exc:
            raise SettingsError(cls.problems(exc)) from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def problems(cls, exc: ValidationError) -> list[tuple[str, str]]:
        """Each error as (variable or field name, readable reason with the value unless secret)."""
        secret = {name for name, field in cls.model_fields.items() if _is_secret(field.annotation)}
        secret |= {str(cls.model_fields[name].validation_alias) for name in secret}
        found = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            why = error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            if name and name not in secret and isinstance(given, str | int | float) and str(given)[:20] not in why:
                why += f" (got {given!r:.80})"
            found.append((name, why))
        return found

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> its environment variable."""
        return {name: str(field.validation_alias) for name, field in cls.model_fields.items()}


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class KafkaSettings(EnvSettings):
    """``KAFKA_*``: how every client reaches the cluster. Passwords are ``SecretStr``."""

    bootstrap_servers: NonBlank = Field(KafkaConnection.bootstrap_servers, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    security_protocol: SecurityProtocol = Field("PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL")
    sasl_mechanism: SaslMechanism | None = Field(None, validation_alias="KAFKA_SASL_MECHANISM")
    sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    ssl_cafile: FilePath | None = Field(None, validation_alias="KAFKA_SSL_CAFILE")
    ssl_certfile: FilePath | None = Field(None, validation_alias="KAFKA_SSL_CERTFILE")
    ssl_keyfile: FilePath | None = Field(None, validation_alias="KAFKA_SSL_KEYFILE")
    ssl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SSL_PASSWORD")

    _upper_case = field_validator("security_protocol", "sasl_mechanism", mode="before")(_upper)

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Self:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs KAFKA_SASL_USERNAME "
                             "and KAFKA_SASL_PASSWORD")
        return self

    def connection(self) -> KafkaConnection:
        def path(value: object) -> str | None:
            return None if value is None else str(value)

        return KafkaConnection(
            bootstrap_servers=self.bootstrap_servers, security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism, sasl_username=self.sasl_username, sasl_password=self.sasl_password,
            ssl_cafile=path(self.ssl_cafile), ssl_certfile=path(self.ssl_certfile), ssl_keyfile=path(self.ssl_keyfile),
            ssl_password=self.ssl_password,
        )


# Kafka's own rule for topic names (the prefix starts every one of ours), with room for the suffixes.
TopicPrefix = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")]


class DeploymentSettings(KafkaSettings):
    """What every component of one deployment shares: the cluster, the topics and idempotence."""

    topic_prefix: TopicPrefix = Field(DEFAULT_PREFIX, validation_alias="TOKENGUARD_TOPIC_PREFIX")
    partitions: int = Field(TopicLayout.partitions, ge=1, le=10_000, validation_alias="TOKENGUARD_PARTITIONS")
    # Off for Kafka-compatible services without idempotent producers (Azure Event Hubs).
    idempotence: bool = Field(True, validation_alias="TOKENGUARD_IDEMPOTENCE")

    def layout(self) -> TopicLayout:
        return TopicLayout(prefix=self.topic_prefix, partitions=self.partitions)
