"""TLS listeners: the ``SSLContext`` of a ``[[listener]]`` with ``certfile``,
and the client certificate as the user name.

The keys are mosquitto.conf's (config.Listener): ``certfile``/``keyfile`` (the
server's chain and key), ``cafile``/``capath`` (the CAs client certificates
are verified against), ``require_certificate``, ``use_identity_as_username``
/ ``use_subject_as_username``, ``tls_version`` (the lowest version accepted)
and ``ciphers``.  TLS 1.2 is the floor by default; SSLv3, TLS 1.0 and 1.1 are
never offered.

As in Mosquitto, ``require_certificate = false`` asks the client for no
certificate at all (verify mode none), and with ``use_identity_as_username``
(the certificate's CN) or ``use_subject_as_username`` (its subject, RFC 2253
as OpenSSL prints it: ``CN=alice,O=Example,C=DE``) the certificate names the
user: the CONNECT's user name and password are ignored, the password check
(the auth hook's ``authenticate``, dynsec's) is skipped, and ACL checks (dynsec
roles) see that user name.  A CONNECT over a connection whose certificate has
no CN is refused with "bad user name or password" (5.0 0x86, 3.1.1 code 4).
The connection carries the result as ``cert_identity`` (handlers/connect.py):
None = the listener does not use the certificate, "" = refuse, else the name.

TLS is terminated by the stream layer (broker/streams.py) with an
``ssl.SSLObject`` over memory BIOs rather than by uvloop's ``create_server(ssl=)``:
uvloop drops a failed server-side handshake without a word (an ``OSError``
is only logged in debug mode), and a worker must be able to relay the
decrypted stream to the sibling that owns the client id (workers/relay.py).
A failed handshake is logged once, on one line, and concerns that client only.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from typing import Any

log = logging.getLogger("raftmq.broker")

# How long a client may take for its TLS handshake (Mosquitto has no bound of its own).
HANDSHAKE_TIMEOUT = 10.0

_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL's short names (what X509_NAME_print_ex with XN_FLAG_RFC2253 writes);
# an attribute not listed keeps Python's long name.
_SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "streetAddress": "street", "domainComponent": "DC", "userId": "UID",
    "emailAddress": "emailAddress", "serialNumber": "serialNumber", "surname": "SN",
    "givenName": "GN", "title": "title", "initials": "initials", "pseudonym": "pseudonym",
}


class TLSConfigError(Exception):
    """A TLS listener's files or settings cannot make a context; names the key."""


def server_context(listener: Any, where: str = "<config>") -> ssl.SSLContext:
    """The server-side context of a TLS listener (TLSConfigError naming the key)."""
    label = f"{where}: listener {listener.host}:{listener.port}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS.get(listener.tls_version or "tlsv1.2",
                                            ssl.TLSVersion.TLSv1_2)
    # Fresh keys per session, no compression (CRIME), the server's cipher order,
    # no client-initiated TLS 1.2 renegotiation (a cheap way to make a server work).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE \
        | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(listener.certfile, listener.keyfile)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{label}: invalid value for 'listener.certfile'/'listener.keyfile': "
                             f"{exc.reason or exc} (not a certificate and its key?)") from exc
    except OSError as exc:
        raise TLSConfigError(f"{label}: cannot read 'listener.certfile'/'listener.keyfile': "
                             f"{exc.strerror or exc}") from exc
    if listener.cafile is not None or listener.capath is not None:
        try:
            context.load_verify_locations(cafile=listener.cafile, capath=listener.capath)
        except (ssl.SSLError, OSError) as exc:
            key = "cafile" if listener.cafile is not None else "capath"
            raise TLSConfigError(f"{label}: invalid value for 'listener.{key}': "
                                 f"{getattr(exc, 'reason', None) or exc}") from exc
    if listener.ciphers is not None:
        try:
            context.set_ciphers(listener.ciphers)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"{label}: invalid value for 'listener.ciphers': "
                                 f"no cipher matches {listener.ciphers!r}") from exc
    # Mosquitto: require_certificate false = no certificate is asked for.
    context.verify_mode = ssl.CERT_REQUIRED if listener.require_certificate else ssl.CERT_NONE
    return context


def check_listeners(config: Any) -> list[str]:
    """Build every TLS listener's context once (in the supervisor, before any
    child starts): the errors, each naming its key.  Warns (log) about a key
    file that other users may read."""
    problems = []
    for listener in getattr(config, "listeners", ()):
        if not listener.tls:
            continue
        try:
            server_context(listener, getattr(config, "source", "<config>"))
        except TLSConfigError as exc:
            problems.append(str(exc))
            continue
        try:
            mode = os.stat(listener.keyfile).st_mode
        except OSError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("Warning: listener %s:%d: keyfile %s can be read by other users "
                        "(mode %o); chmod 600 it.", listener.host, listener.port,
                        listener.keyfile, stat.S_IMODE(mode))
    return problems


def rfc2253(subject: tuple) -> str:
    """``getpeercert()['subject']`` as OpenSSL's RFC 2253 string (last RDN first)."""
    rdns = []
    for rdn in reversed(subject):
        rdns.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}"
                             for name, value in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def cert_identity(ssl_object: Any, listener: Any) -> str | None:
    """What the connection's ``cert_identity`` is (see the module doc): None when
    the listener does not use the certificate as the user name; "" when it
    does and there is no usable certificate (the CONNECT will be refused)."""
    if not (listener.use_identity_as_username or listener.use_subject_as_username):
        return None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return ""
    subject = cert.get("subject", ())
    if listener.use_subject_as_username:
        return rfc2253(subject)
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                # An embedded NUL would make the name differ from what the CA signed.
                return "" if "\0" in value else value
    return ""
