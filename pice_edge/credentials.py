"""One credentials story for every command that talks to the broker.

`pice-edge run`, `pice-edge doctor`, `pice-cloud serve`, `pice-cloud ask` and `pice-cloud fleet`
take the same flags, each defaulting to the same environment variable:

=================  ===========================  ==============================================
flag               environment variable         what
=================  ===========================  ==============================================
--username         PICE_BROKER_USERNAME         the broker account (default: see below)
--password-file    PICE_BROKER_PASSWORD_FILE    a file holding the password
(none)             PICE_BROKER_PASSWORD         the password itself (never on a command line:
                                                other users can read a process's arguments)
--ca-file          PICE_BROKER_CA_FILE          the CA that signed the broker's certificate
--cert-file        PICE_BROKER_CERT_FILE        this client's certificate (mutual TLS)
--key-file         PICE_BROKER_KEY_FILE         this client's key (mutual TLS)
=================  ===========================  ==============================================

With a password and no username, an edge logs in as its device id and the cloud as
``pice-cloud``: the accounts `tools/mosquitto/add_device.sh` creates and its ACL expects.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Final

from pydantic import SecretStr, ValidationError

from pice_edge.errors import ConfigError
from pice_edge.transport import BrokerSettings

#: The cloud's broker account in tools/mosquitto (ACL and add_device.sh).
CLOUD_USERNAME: Final = "pice-cloud"
#: Flag -> environment variable it defaults to.
ENVIRONMENT: Final = {
    "username": "PICE_BROKER_USERNAME",
    "password_file": "PICE_BROKER_PASSWORD_FILE",
    "ca_file": "PICE_BROKER_CA_FILE",
    "cert_file": "PICE_BROKER_CERT_FILE",
    "key_file": "PICE_BROKER_KEY_FILE",
}
PASSWORD_VARIABLE: Final = "PICE_BROKER_PASSWORD"


def add_credential_options(parser: argparse.ArgumentParser, *, default_username: str) -> None:
    """The broker credential flags; ``default_username`` is described in the help."""
    env = os.environ.get
    group = parser.add_argument_group("broker credentials (TLS and password)")
    group.add_argument("--username", default=env(ENVIRONMENT["username"]),
                       help=f"broker account (default ${ENVIRONMENT['username']}, else {default_username} when a "
                            "password is set)")
    group.add_argument("--password-file", default=env(ENVIRONMENT["password_file"]),
                       help=f"file holding the broker password (default ${ENVIRONMENT['password_file']}; "
                            f"or put the password itself in ${PASSWORD_VARIABLE})")
    group.add_argument("--ca-file", default=env(ENVIRONMENT["ca_file"]),
                       help=f"CA certificate that signed the broker's (TLS; default ${ENVIRONMENT['ca_file']})")
    group.add_argument("--cert-file", default=env(ENVIRONMENT["cert_file"]),
                       help=f"client certificate (mutual TLS; default ${ENVIRONMENT['cert_file']})")
    group.add_argument("--key-file", default=env(ENVIRONMENT["key_file"]),
                       help=f"client key (mutual TLS; default ${ENVIRONMENT['key_file']})")


def credential_fields(args: argparse.Namespace, *, default_username: str) -> dict[str, Any]:
    """The credential fields of `BrokerSettings` the flags and environment give (none: empty).

    Raises:
        ConfigError: the password file cannot be read.
    """
    password = os.environ.get(PASSWORD_VARIABLE) or None
    if getattr(args, "password_file", None):
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the broker password file {args.password_file}: {exc.strerror}") from exc
    fields: dict[str, Any] = {}
    username = getattr(args, "username", None) or (default_username if password else None)
    if username:
        fields["username"] = username
    if password:
        fields["password"] = SecretStr(password)
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(args, name, None):
            fields[name] = getattr(args, name)
    return fields


def broker_settings(args: argparse.Namespace, url: str, *, default_username: str) -> BrokerSettings:
    """`BrokerSettings` for ``url`` with the credentials of the flags and environment.

    Raises:
        ConfigError: a malformed URL, an unreadable password file, or a certificate without its key.
    """
    try:
        return BrokerSettings(url=url, **credential_fields(args, default_username=default_username))
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"broker settings: {message} (check --broker and the TLS options)") from None
