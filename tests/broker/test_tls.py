"""TLS listeners (``certfile``/``keyfile``/``cafile``, ``require_certificate``,
``use_identity_as_username``, ``use_subject_as_username``, ``tls_version``):
real brokers, real ``mosquitto_pub``/``mosquitto_sub`` and paho over TLS, and
Mosquitto 2.0 with the same listener where the behaviour must match.

Certificates (a CA, a server certificate for 127.0.0.1, client certificates)
are made once per module by support/certs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.brokers import REPO
from support.certs import Certs, make_certs
from support.helpers import assert_serves, raw, unique, wait_for
from support.listeners import ListenerBroker, ListenerPaho, client_context, tls_raw, tls_socket
from support.mqttraw import CONNACK, PUBLISH, SUBACK, Closed, connect

pytestmark = pytest.mark.timeout(90)

PUB = shutil.which("mosquitto_pub") or "mosquitto_pub"
SUB = shutil.which("mosquitto_sub") or "mosquitto_sub"
KINDS = ["raftmq", "mosquitto"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def start(tmp_path: Path):
    started: list[ListenerBroker] = []

    def make(kind: str, listeners: dict, **kw) -> ListenerBroker:
        if kind == "mosquitto" and not os.path.exists("/usr/sbin/mosquitto"):
            pytest.skip("mosquitto is not installed")
        b = ListenerBroker(kind, tmp_path / f"{kind}{len(started)}", listeners, **kw)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


def _tls(certs: Certs, **extra) -> dict:
    return {"certfile": certs.server_cert, "keyfile": certs.server_key, **extra}


def _mutual(certs: Certs, **extra) -> dict:
    return _tls(certs, cafile=certs.ca, require_certificate=True, **extra)


def _cli(certs: Certs, cert: tuple[Path, Path] | None) -> list[str]:
    args = ["--cafile", str(certs.ca)]
    if cert is not None:
        args += ["--cert", str(cert[0]), "--key", str(cert[1])]
    return args


# --------------------------------------------------------------------------- mosquitto clients


@pytest.mark.parametrize("kind", KINDS)
def test_mosquitto_clients_over_tls_meet_a_plain_client(start, certs, kind):
    b = start(kind, {"tls": _mutual(certs)})
    port = b.ports["tls"]
    topic = unique("tls/")
    alice = _cli(certs, (certs.client_cert, certs.client_key))
    # plain -> TLS: a retained message (no race with the subscription).
    subprocess.run([PUB, "-h", b.host, "-p", str(b.port), "-t", topic, "-m", "from-plain", "-r",
                    "-q", "1"], check=True, timeout=10)
    r = subprocess.run([SUB, "-h", b.host, "-p", str(port), *alice, "-t", topic, "-C", "1", "-v",
                        "-W", "10"], capture_output=True, text=True, timeout=15)
    assert r.stdout.splitlines() == [f"{topic} from-plain"], r.stderr
    # TLS -> plain.
    with ListenerPaho(b.host, b.port) as plain:
        plain.subscribe(topic + "/up", 1)
        subprocess.run([PUB, "-h", b.host, "-p", str(port), *alice, "-t", topic + "/up",
                        "-m", "from-tls", "-q", "1"], check=True, timeout=10)
        msg = plain.get(5)
        assert (msg.topic, msg.payload) == (topic + "/up", b"from-tls")


@pytest.mark.parametrize("kind", KINDS)
def test_require_certificate_refuses_clients_without_a_good_one(start, certs, kind):
    b = start(kind, {"tls": _mutual(certs)})
    port = b.ports["tls"]
    for cert in (None, (certs.rogue_cert, certs.rogue_key)):
        r = subprocess.run([PUB, "-h", b.host, "-p", str(port), *_cli(certs, cert), "-t", "x",
                            "-m", "y"], capture_output=True, text=True, timeout=10)
        assert r.returncode != 0, (cert, r.stdout, r.stderr)
    # With a certificate from the CA: accepted.
    r = subprocess.run([PUB, "-h", b.host, "-p", str(port),
                        *_cli(certs, (certs.client_cert, certs.client_key)), "-t", "x", "-m", "y"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert_serves(b)
    if kind == "raftmq":
        # One line per refused client, written by whichever worker accepted it.
        def failures() -> list[str]:
            return re.findall(r"TLS handshake failed \((.*?)\)", b.log_path.read_text())

        wait_for(lambda: len(failures()) >= 2, 3)
        assert len(failures()) == 2, failures()
        assert "Traceback" not in b.log_path.read_text()


def test_tls_listener_without_client_certificates(start, certs):
    b = start("raftmq", {"tls": _tls(certs)})
    port = b.ports["tls"]
    topic = unique("tls/")
    with ListenerPaho(b.host, port, tls={"ca_certs": certs.ca}) as sub, \
            ListenerPaho(b.host, b.port) as pub:
        sub.subscribe(topic, 1)
        pub.publish(topic, b"x" * 300_000, qos=1)  # many TLS records
        msg = sub.get(5)
        assert (msg.topic, len(msg.payload)) == (topic, 300_000)
        pub.publish(topic + "/2", b"ignored")
    # A client certificate is not asked for (as Mosquitto): sent or not, all the same.
    c = tls_raw(b.host, port, client_context(certs, (certs.client_cert, certs.client_key)))
    assert c.connect(unique("c")).reason == 0
    c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_plain_mqtt_on_a_tls_port_is_closed_and_disturbs_nobody(start, certs, kind):
    b = start(kind, {"tls": _tls(certs)})
    bystander = tls_raw(b.host, b.ports["tls"], client_context(certs))
    assert bystander.connect(unique("by")).reason == 0
    with socket.create_connection((b.host, b.ports["tls"]), timeout=5) as s:
        s.sendall(connect(unique("plain")))
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionError, TimeoutError):
            pass
        assert CONNACK << 4 not in data[:1]  # no MQTT answer (a TLS alert at most)
    bystander.subscribe(1, [(unique("t/"), 0)])  # still served
    bystander.close()
    assert_serves(b)


@pytest.mark.parametrize(("floor", "client_max", "ok"), [
    (None, ssl.TLSVersion.TLSv1_1, False),
    (None, ssl.TLSVersion.TLSv1_2, True),
    ("tlsv1.3", ssl.TLSVersion.TLSv1_2, False),
    ("tlsv1.3", ssl.TLSVersion.TLSv1_3, True),
])
def test_tls_version_floor(start, certs, floor, client_max, ok):
    extra = {"tls_version": floor} if floor else {}
    b = start("raftmq", {"tls": _tls(certs, **extra)})
    ctx = client_context(certs)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = client_max
    if client_max == ssl.TLSVersion.TLSv1_1:
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer 1.1 at all
        except ssl.SSLError:
            pass
    if ok:
        c = tls_raw(b.host, b.ports["tls"], ctx)
        assert c.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                    ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[client_max]
        assert c.connect(unique("v")).reason == 0
        c.close()
    else:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_socket(b.host, b.ports["tls"], ctx).close()
        assert_serves(b)


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", ["use_identity_as_username", "use_subject_as_username"])
def test_certificate_names_the_user(start, certs, kind, key):
    """The CONNECT's user name is replaced (and its password not checked): the
    log line shows the certificate's name, as Mosquitto's does."""
    b = start(kind, {"tls": _mutual(certs, **{key: True})}, options={"allow_anonymous": False})
    client_id = unique("id")
    c = tls_raw(b.host, b.ports["tls"], client_context(certs, (certs.client_cert, certs.client_key)))
    ack = c.connect(client_id, username="mallory", password=b"wrong")
    assert ack.reason == 0
    c.close()
    want = "alice" if key == "use_identity_as_username" else "CN=alice,O=raftmq tests,C=DE"
    text = b.log_path.read_text(errors="replace")
    assert re.search(rf"as {client_id} \(p2, c1, k\d+, u'{re.escape(want)}'\)", text), text[-2000:]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [4, 5])
def test_identity_without_a_common_name_is_refused(start, certs, kind, version):
    b = start(kind, {"tls": _mutual(certs, use_identity_as_username=True)})
    c = tls_raw(b.host, b.ports["tls"], client_context(certs, (certs.nocn_cert, certs.nocn_key)),
                version=version)
    ack = c.connect(unique("nocn"), username="u", password=b"p")
    assert ack.reason == (0x86 if version == 5 else 4)  # bad user name or password
    c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_identity_user_gets_its_dynsec_roles(start, certs, kind):
    """alice (from her certificate, no password) gets sensor-writer's ACLs:
    subscribe and publish under sensors/, nothing else; the password clients
    of the plain listener are checked as before."""
    sys.path.insert(0, str(REPO / "tests" / "dynsec"))
    from captures import example_document

    b = start(kind, {"tls": _mutual(certs, use_identity_as_username=True)},
              options={"allow_anonymous": False}, dynsec=example_document())
    alice = tls_raw(b.host, b.ports["tls"], client_context(certs, (certs.client_cert, certs.client_key)),
                    version=5)
    assert alice.connect(unique("alice")).reason == 0  # no user name, no password
    granted = alice.subscribe(1, [("sensors/#", 1), ("other/#", 1)])
    assert granted.type == SUBACK and granted.codes == [1, 0x87]
    alice.publish("sensors/t1", b"reading", qos=1, pid=3)
    alice.publish("other/t1", b"dropped", qos=1, pid=4)
    seen = []
    while True:
        try:
            seen.append(alice.recv(1.5))
        except TimeoutError:
            break
    assert [(p.topic, p.payload) for p in seen if p.type == PUBLISH] == [("sensors/t1", b"reading")]
    alice.close()
    # The plain listener still checks passwords: a user name without one is refused.
    c = raw(b, 5)
    assert c.connect(unique("nopw"), username="alice").reason in (0x86, 0x87)
    c.close()


# --------------------------------------------------------------------------- configuration


def _serve(tmp_path: Path, listener: str, extra: str = "") -> subprocess.CompletedProcess:
    conf = tmp_path / "raftmq.toml"
    conf.write_text(f"{extra}[[listener]]\nhost = \"127.0.0.1\"\nport = 0\n{listener}")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--data-dir",
                           str(tmp_path / "data"), "--workers", "1"], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize(("listener", "message"), [
    ('keyfile = "{key}"\n', "'listener.keyfile': keyfile without certfile"),
    ('certfile = "{cert}"\n', "'listener.certfile': certfile without keyfile"),
    ('certfile = "{cert}"\nkeyfile = "/nonexistent/server.key"\n',
     "'listener.keyfile': cannot read /nonexistent/server.key"),
    ('certfile = "{cert}"\nkeyfile = "{key}"\nrequire_certificate = true\n',
     "'listener.require_certificate': needs cafile or capath"),
    ('cafile = "{ca}"\n', "'listener.cafile': needs certfile and keyfile"),
    ('certfile = "{cert}"\nkeyfile = "{key}"\ncafile = "{ca}"\nuse_identity_as_username = true\n',
     "'listener.use_identity_as_username': needs require_certificate"),
    ('certfile = "{cert}"\nkeyfile = "{key}"\ntls_version = "tlsv1.1"\n',
     "'listener.tls_version'"),
    ('protocol = "mqtts"\n', "'listener.protocol'"),
    ('certfile = "{cert}"\nkeyfile = "{otherkey}"\n', "'listener.certfile'/'listener.keyfile'"),
    ('certfile = "{cert}"\nkeyfile = "{key}"\nciphers = "NO-SUCH-CIPHER"\n', "'listener.ciphers'"),
])
def test_bad_tls_settings_stop_the_start(tmp_path, certs, listener, message):
    text = listener.format(cert=certs.server_cert, key=certs.server_key, ca=certs.ca,
                           otherkey=certs.client_key)
    r = _serve(tmp_path, text)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr, r.stderr[-2000:]


def test_world_readable_keyfile_is_warned_about(tmp_path, certs):
    key = tmp_path / "open.key"
    key.write_bytes(certs.server_key.read_bytes())
    os.chmod(key, 0o644)
    # An invalid second listener stops the start right after the TLS check.
    r = _serve(tmp_path, f'certfile = "{certs.server_cert}"\nkeyfile = "{key}"\n'
               "[[listener]]\nport = 0\ncertfile = \"/nonexistent\"\n")
    assert "can be read by other users" not in r.stderr  # (config error first: nothing built)
    conf = tmp_path / "ok.toml"
    conf.write_text(f'[[listener]]\nhost = "127.0.0.1"\nport = 0\ncertfile = "{certs.server_cert}"\n'
                    f'keyfile = "{key}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "raftmq", "serve", "-c", str(conf), "--data-dir",
                             str(tmp_path / "data"), "--workers", "1"], stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            if "can be read by other users" in line or "running" in line:
                break
        assert f"keyfile {key} can be read by other users (mode 644)" in seen, seen
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_closed_stream_on_refusal_is_not_a_tls_error(start, certs):
    """A refused CONNECT over TLS gets its CONNACK through TLS, then close_notify."""
    b = start("raftmq", {"tls": _tls(certs)}, options={"allow_anonymous": False})
    c = tls_raw(b.host, b.ports["tls"], client_context(certs))
    assert c.connect(unique("anon")).reason == 5  # not authorised (3.1.1)
    with pytest.raises(Closed):
        c.recv(3)


def test_capath_verifies_client_certificates(start, certs, tmp_path):
    """``capath``: a directory of CA certificates named by hash (``openssl rehash``)."""
    capath = tmp_path / "capath"
    capath.mkdir()
    shutil.copyfile(certs.ca, capath / "ca.pem")
    subprocess.run(["openssl", "rehash", str(capath)], check=True, capture_output=True, timeout=30)
    b = start("raftmq", {"tls": _tls(certs, capath=capath, require_certificate=True)})
    good = tls_raw(b.host, b.ports["tls"], client_context(certs, (certs.client_cert, certs.client_key)))
    assert good.connect(unique("capath")).reason == 0
    good.close()
    with pytest.raises((ssl.SSLError, ConnectionError, Closed)):
        rogue = tls_raw(b.host, b.ports["tls"],
                        client_context(certs, (certs.rogue_cert, certs.rogue_key)))
        rogue.connect(unique("rogue"))  # (TLS 1.3: the refusal shows on the first read)
