"""raftmq._codec under hypothesis: parse(encode(p)) == p for generated packets of
every type, version and property; random and mutated bytes only ever raise
MQTTError (no other exception, no crash, no hang); how bytes are split across
feed() calls never changes the outcome."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raftmq._codec import MQTTError, Parser

from raftmq import _codec as c

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

CONNECT_BYTES = {
    3: c.Connect(protocol_name="MQIsdp", protocol_version=3, client_id="f").encode(3),
    4: c.Connect(client_id="f").encode(4),
    5: c.Connect(protocol_version=5, client_id="f").encode(5),
}

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
BIN = st.binary(max_size=16)
U16 = st.integers(0, 0xFFFF)
U16_NZ = st.integers(1, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
BOOL_BYTE = st.integers(0, 1)
PACKET_ID = st.integers(1, 0xFFFF)
REASON = st.integers(0, 0xFF)

PROPERTY_VALUES = {
    "payload_format_indicator": BOOL_BYTE,
    "message_expiry_interval": U32,
    "content_type": TEXT,
    "response_topic": TEXT,
    "correlation_data": BIN,
    "session_expiry_interval": U32,
    "assigned_client_identifier": TEXT,
    "server_keep_alive": U16,
    "authentication_method": TEXT,
    "authentication_data": BIN,
    "request_problem_information": BOOL_BYTE,
    "will_delay_interval": U32,
    "request_response_information": BOOL_BYTE,
    "response_information": TEXT,
    "server_reference": TEXT,
    "reason_string": TEXT,
    "receive_maximum": U16_NZ,
    "topic_alias_maximum": U16,
    "topic_alias": U16_NZ,
    "maximum_qos": BOOL_BYTE,
    "retain_available": BOOL_BYTE,
    "user_property": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    "wildcard_subscription_available": BOOL_BYTE,
    "subscription_identifier_available": BOOL_BYTE,
    "shared_subscription_available": BOOL_BYTE,
}

WILL = ["payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
        "correlation_data", "will_delay_interval", "user_property"]
ALLOWED = {
    "connect": ["session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information",
                "receive_maximum", "topic_alias_maximum", "user_property",
                "maximum_packet_size"],
    "connack": ["session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum", "topic_alias_maximum",
                "maximum_qos", "retain_available", "user_property", "maximum_packet_size",
                "wildcard_subscription_available", "subscription_identifier_available",
                "shared_subscription_available"],
    "publish": ["payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "topic_alias", "user_property"],
    "ack": ["reason_string", "user_property"],
    "subscribe": ["user_property"],
    "unsubscribe": ["user_property"],
    "disconnect": ["session_expiry_interval", "server_reference", "reason_string",
                   "user_property"],
    "auth": ["authentication_method", "authentication_data", "reason_string", "user_property"],
}


@st.composite
def properties(draw, names, extra=None):
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    result = {name: draw(PROPERTY_VALUES[name]) for name in chosen}
    if "authentication_data" in result:  # needs a method (3.1.2.11.10)
        result["authentication_method"] = draw(TEXT)
    if extra:
        result.update(draw(extra))
    return result or None


def props_for(version, kind):
    return properties(ALLOWED[kind]) if version == 5 else st.none()


@st.composite
def connect(draw, version):
    will = draw(st.booleans())
    username = draw(st.none() | TEXT)
    if version < 5 and username is None:
        password = None  # 3.1.1 [MQTT-3.1.2-22]
    else:
        password = draw(st.none() | BIN)
    return c.Connect(
        protocol_name="MQIsdp" if version == 3 else "MQTT", protocol_version=version,
        clean_start=draw(st.booleans()), keepalive=draw(U16), client_id=draw(TEXT),
        will_topic=draw(TEXT) if will else None, will_payload=draw(BIN) if will else None,
        will_qos=draw(st.integers(0, 2)) if will else 0,
        will_retain=draw(st.booleans()) if will else False,
        will_properties=draw(properties(WILL)) if will and version == 5 else None,
        username=username, password=password, properties=draw(props_for(version, "connect")),
        bridge=draw(st.booleans()))


@st.composite
def publish(draw, version, to_client):
    qos = draw(st.integers(0, 2))
    props = draw(props_for(version, "publish"))
    if version == 5 and to_client and draw(st.booleans()):
        props = dict(props or {})
        props["subscription_identifier"] = draw(
            st.lists(st.integers(1, 268435455), min_size=1, max_size=3))
    return c.Publish(topic=draw(TEXT), payload=draw(st.binary(max_size=64)), qos=qos,
                     retain=draw(st.booleans()), dup=draw(st.booleans()) if qos else False,
                     packet_id=draw(PACKET_ID) if qos else 0, properties=props)


@st.composite
def ack(draw, version, cls):
    return cls(packet_id=draw(PACKET_ID), reason_code=draw(REASON) if version == 5 else 0,
               properties=draw(props_for(version, "ack")))


FILTER = TEXT.filter(lambda f: not f.startswith("$share/"))


@st.composite
def subscribe(draw, version):
    subs = []
    for _ in range(draw(st.integers(1, 4))):
        if version == 5:
            subs.append((draw(FILTER), draw(st.integers(0, 2)), draw(st.booleans()),
                         draw(st.booleans()), draw(st.integers(0, 2))))
        else:
            subs.append((draw(FILTER), draw(st.integers(0, 2)), False, False, 0))
    props = draw(props_for(version, "subscribe"))
    if version == 5 and draw(st.booleans()):
        props = dict(props or {})
        props["subscription_identifier"] = draw(st.integers(1, 268435455))
    return c.Subscribe(packet_id=draw(PACKET_ID), subscriptions=subs, properties=props)


def client_packets(version):
    """Packets a client sends (parsed by a server-side Parser)."""
    options = [
        publish(version, False),
        *(ack(version, cls) for cls in (c.Puback, c.Pubrec, c.Pubrel, c.Pubcomp)),
        subscribe(version),
        st.builds(c.Unsubscribe, packet_id=PACKET_ID,
                  topic_filters=st.lists(TEXT, min_size=1, max_size=4),
                  properties=props_for(version, "unsubscribe")),
        st.just(c.Pingreq()),
        disconnect(version),
    ]
    if version == 5:
        options.append(st.builds(c.Auth, reason_code=REASON, properties=props_for(5, "auth")))
    return st.one_of(options)


def disconnect(version):
    if version == 5:
        return st.builds(c.Disconnect, reason_code=REASON, properties=props_for(5, "disconnect"))
    return st.just(c.Disconnect())


def server_packets(version):
    """Packets a server sends (parsed by a client-side Parser)."""
    options = [
        st.builds(c.Connack, session_present=st.booleans(), reason_code=REASON,
                  properties=props_for(version, "connack")),
        publish(version, True),
        *(ack(version, cls) for cls in (c.Puback, c.Pubrec, c.Pubrel, c.Pubcomp)),
        st.builds(c.Suback, packet_id=PACKET_ID,
                  reason_codes=st.lists(REASON, min_size=1, max_size=4),
                  properties=props_for(version, "ack")),
        st.builds(c.Unsuback, packet_id=PACKET_ID,
                  reason_codes=st.lists(REASON, min_size=1, max_size=4) if version == 5
                  else st.just([]),
                  properties=props_for(version, "ack")),
        st.just(c.Pingresp()),
        disconnect(version),
    ]
    if version == 5:
        options.append(st.builds(c.Auth, reason_code=REASON, properties=props_for(5, "auth")))
    return st.one_of(options)


VERSIONS = st.sampled_from([3, 4, 5])


def server_parser(version):
    p = Parser()
    p.feed(CONNECT_BYTES[version])
    return p


def client_parser(version):
    p = Parser(is_server=False)
    p.protocol_version = version
    return p


# ---------------------------------------------------------------------------
# Round trips


@SETTINGS
@given(st.data())
def test_connect_round_trip(data):
    version = data.draw(VERSIONS)
    packet = data.draw(connect(version))
    p = Parser()
    assert p.feed(packet.encode(version)) == [packet]
    assert p.protocol_version == version


@SETTINGS
@given(st.data())
def test_client_packets_round_trip(data):
    version = data.draw(VERSIONS)
    packets = data.draw(st.lists(client_packets(version), min_size=1, max_size=5))
    wire = b"".join(x.encode(version) for x in packets)
    assert server_parser(version).feed(wire) == packets


@SETTINGS
@given(st.data())
def test_server_packets_round_trip(data):
    version = data.draw(VERSIONS)
    packets = data.draw(st.lists(server_packets(version), min_size=1, max_size=5))
    wire = b"".join(x.encode(version) for x in packets)
    assert client_parser(version).feed(wire) == packets
    publishes = [x for x in packets if isinstance(x, c.Publish)]
    for x in publishes:  # the fan-out fast path writes the same bytes
        assert c.encode_publish(x.topic, x.payload, x.qos, x.retain, x.dup, x.packet_id,
                                x.properties, version) == x.encode(version)


# ---------------------------------------------------------------------------
# Garbage in: only MQTTError, and the split of the input never matters


def outcome(parser, chunks):
    got = []
    try:
        for chunk in chunks:
            got += parser.feed(chunk)
    except MQTTError as e:
        assert isinstance(e.reason_code, int) and 0x80 <= e.reason_code <= 0xA2
        return got + e.packets, e.reason_code
    return got, None


def split(data, cuts):
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


@SETTINGS
@given(VERSIONS, st.booleans(), st.binary(max_size=200), st.lists(st.integers(0, 200),
                                                                  max_size=6))
def test_random_bytes_raise_only_mqtt_error(version, server_side, data, cuts):
    make = server_parser if server_side else client_parser
    whole = outcome(make(version), [data])
    chunked = outcome(make(version), split(data, cuts))
    assert whole == chunked


@SETTINGS
@given(VERSIONS, st.binary(max_size=120))
def test_random_bytes_before_connect(version, data):
    outcome(Parser(), [data])
    outcome(Parser(max_packet_size=16), [data])


@st.composite
def mutated(draw, packets_strategy):
    version = draw(VERSIONS)
    packets = draw(st.lists(packets_strategy(version), min_size=1, max_size=3))
    wire = bytearray(b"".join(x.encode(version) for x in packets))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(0, len(wire) - 1)))
        if action == "flip" and wire:
            wire[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=3))
        elif action == "delete" and wire:
            del wire[pos]
        elif wire:
            wire[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0xC0, 0xED]))
    return version, bytes(wire)


@SETTINGS
@given(mutated(client_packets), st.lists(st.integers(0, 300), max_size=5))
def test_mutated_client_packets(case, cuts):
    version, wire = case
    whole = outcome(server_parser(version), [wire])
    assert whole == outcome(server_parser(version), split(wire, cuts))
    for packet in whole[0]:  # whatever parsed must encode again
        packet.encode(version)


@SETTINGS
@given(mutated(server_packets), st.lists(st.integers(0, 300), max_size=5))
def test_mutated_server_packets(case, cuts):
    version, wire = case
    whole = outcome(client_parser(version), [wire])
    assert whole == outcome(client_parser(version), split(wire, cuts))


@SETTINGS
@given(st.data())
def test_mutated_connect(data):
    version = data.draw(VERSIONS)
    wire = bytearray(data.draw(connect(version)).encode(version))
    pos = data.draw(st.integers(0, len(wire) - 1))
    wire[pos] = data.draw(st.integers(0, 255))
    got, code = outcome(Parser(), [bytes(wire)])
    if code is None and got:
        assert isinstance(got[0], c.Connect)
