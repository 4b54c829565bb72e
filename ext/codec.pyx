# cython: language_level=3
"""MQTT 3.1 / 3.1.1 / 5.0 codec: packet objects, an incremental parser, encoders.

Theory of operation
-------------------
Bytes from a socket go into ``Parser.feed(data)``, which returns the list of
every complete packet they finish. Framing is resumable: the fixed header (one
type/flags byte and a Variable Byte Integer remaining length, 1.5.5) is read
first; if the whole frame is not there yet, the bytes are kept in ``_buf`` and
``_need`` remembers how long the frame is, so later ``feed`` calls only append
until the frame is complete (no re-parse per chunk). A frame larger than
``max_packet_size`` is refused (0x95) as soon as its header is read, before its
body is buffered.

Each complete frame body is parsed by one ``_parse_<packet>`` method from a
bounded ``Reader`` (pointer + remaining length, ext/buf.pxd): every read checks
the bound, so a frame can never be read past. Validation is strict and cites
the OASIS standard ([MQTT-x.y.z-n] of MQTT 5.0 unless noted): any violation
raises ``MQTTError(reason_code, message)`` with the MQTT 5 reason code the
receiver must use (0x81 Malformed Packet, 0x82 Protocol Error, 0x84
Unsupported Protocol Version, 0x95 Packet Too Large). Semantic checks on topics
(wildcards in a PUBLISH topic, filter syntax) are left to the broker; see
raftmq._trie.valid_topic_name / valid_topic_filter.

Error contract of ``feed``: the first invalid packet raises MQTTError at once;
packets of the same call that were complete before it are attached to the
exception as ``.packets`` (the caller may act on them, e.g. publish what came
before the garbage, or ignore them: the connection is closed anyway). The error
is kept in ``Parser.error`` and every later ``feed`` raises it again.

Encoding builds each packet in one PyMem buffer that reserves room for the
fixed header in front, so the remaining length is back-filled without copying
the body twice; ``encode_publish`` and ``encode_ack`` are allocation-minimal
fast paths for the broker's fan-out that build no packet object.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint8_t
from libc.string cimport memchr, memcmp, memcpy

from buf cimport Reader, Writer, put_u16, put_u32, put_varint, varint_size


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)


# --------------------------------------------------------------------------
# Constants

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

# The MQTT 5 reason codes the codec itself raises.
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
PACKET_TOO_LARGE = 0x95

MAX_REMAINING_LENGTH = 268435455

cdef enum:
    T_CONNECT = 1
    T_CONNACK = 2
    T_PUBLISH = 3
    T_PUBACK = 4
    T_PUBREC = 5
    T_PUBREL = 6
    T_PUBCOMP = 7
    T_SUBSCRIBE = 8
    T_SUBACK = 9
    T_UNSUBSCRIBE = 10
    T_UNSUBACK = 11
    T_PINGREQ = 12
    T_PINGRESP = 13
    T_DISCONNECT = 14
    T_AUTH = 15
    T_WILL = 0          # pseudo packet type: the Will Properties of a CONNECT

cdef enum:
    RC_MALFORMED = 0x81
    RC_PROTOCOL = 0x82
    RC_VERSION = 0x84
    RC_TOO_LARGE = 0x95

# Packets a server receives (from clients) and packets a client receives.
cdef unsigned int FROM_CLIENT = (
    (1 << T_CONNECT) | (1 << T_PUBLISH) | (1 << T_PUBACK) | (1 << T_PUBREC) | (1 << T_PUBREL)
    | (1 << T_PUBCOMP) | (1 << T_SUBSCRIBE) | (1 << T_UNSUBSCRIBE) | (1 << T_PINGREQ)
    | (1 << T_DISCONNECT) | (1 << T_AUTH))
cdef unsigned int FROM_SERVER = (
    (1 << T_CONNACK) | (1 << T_PUBLISH) | (1 << T_PUBACK) | (1 << T_PUBREC) | (1 << T_PUBREL)
    | (1 << T_PUBCOMP) | (1 << T_SUBACK) | (1 << T_UNSUBACK) | (1 << T_PINGRESP)
    | (1 << T_DISCONNECT) | (1 << T_AUTH))


class MQTTError(Exception):
    """A packet broke the MQTT standard.

    ``reason_code`` is the MQTT 5 reason code the receiver answers with
    (0x81 malformed, 0x82 protocol error, 0x84 unsupported protocol version,
    0x95 packet too large); ``str(e)`` says what was wrong. ``packets`` holds
    the packets parsed before the error in the same ``Parser.feed`` call.
    """

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.packets = []

    def __repr__(self) -> str:
        return f"MQTTError(0x{self.reason_code:02X}, {str(self)!r})"


cdef inline int _fail(int code, str msg) except -1:
    raise MQTTError(code, msg)


# --------------------------------------------------------------------------
# Properties (MQTT 5.0 §2.2.2.2): id -> (name, data type, packets allowed in)

cdef enum:
    P_BYTE = 1
    P_U16 = 2
    P_U32 = 3
    P_VARINT = 4
    P_STR = 5
    P_BIN = 6
    P_PAIR = 7

cdef enum:
    NPROPS = 43

cdef int PROP_TYPE[NPROPS]
cdef unsigned int PROP_ALLOWED[NPROPS]
cdef bint PROP_BOOL[NPROPS]          # value must be 0 or 1, else Protocol Error
cdef list PROP_NAME = [None] * NPROPS
cdef dict PROP_ID = {}

cdef unsigned int _WILL = 1 << T_WILL
cdef unsigned int _PUB = 1 << T_PUBLISH
cdef unsigned int _CON = 1 << T_CONNECT
cdef unsigned int _CAK = 1 << T_CONNACK
cdef unsigned int _DIS = 1 << T_DISCONNECT
cdef unsigned int _AUT = 1 << T_AUTH
cdef unsigned int _ACKS = ((1 << T_PUBACK) | (1 << T_PUBREC) | (1 << T_PUBREL) | (1 << T_PUBCOMP)
                           | (1 << T_SUBACK) | (1 << T_UNSUBACK))
cdef unsigned int _ALL = 0xFFFF & ~((1 << T_PINGREQ) | (1 << T_PINGRESP))

_PROPERTY_TABLE = (
    (0x01, "payload_format_indicator", P_BYTE, _PUB | _WILL),
    (0x02, "message_expiry_interval", P_U32, _PUB | _WILL),
    (0x03, "content_type", P_STR, _PUB | _WILL),
    (0x08, "response_topic", P_STR, _PUB | _WILL),
    (0x09, "correlation_data", P_BIN, _PUB | _WILL),
    (0x0B, "subscription_identifier", P_VARINT, _PUB | (1 << T_SUBSCRIBE)),
    (0x11, "session_expiry_interval", P_U32, _CON | _CAK | _DIS),
    (0x12, "assigned_client_identifier", P_STR, _CAK),
    (0x13, "server_keep_alive", P_U16, _CAK),
    (0x15, "authentication_method", P_STR, _CON | _CAK | _AUT),
    (0x16, "authentication_data", P_BIN, _CON | _CAK | _AUT),
    (0x17, "request_problem_information", P_BYTE, _CON),
    (0x18, "will_delay_interval", P_U32, _WILL),
    (0x19, "request_response_information", P_BYTE, _CON),
    (0x1A, "response_information", P_STR, _CAK),
    (0x1C, "server_reference", P_STR, _CAK | _DIS),
    (0x1F, "reason_string", P_STR, _CAK | _ACKS | _DIS | _AUT),
    (0x21, "receive_maximum", P_U16, _CON | _CAK),
    (0x22, "topic_alias_maximum", P_U16, _CON | _CAK),
    (0x23, "topic_alias", P_U16, _PUB),
    (0x24, "maximum_qos", P_BYTE, _CAK),
    (0x25, "retain_available", P_BYTE, _CAK),
    (0x26, "user_property", P_PAIR, _ALL),
    (0x27, "maximum_packet_size", P_U32, _CON | _CAK),
    (0x28, "wildcard_subscription_available", P_BYTE, _CAK),
    (0x29, "subscription_identifier_available", P_BYTE, _CAK),
    (0x2A, "shared_subscription_available", P_BYTE, _CAK),
)

cdef int _i
for _i in range(NPROPS):
    PROP_TYPE[_i] = 0
    PROP_ALLOWED[_i] = 0
    PROP_BOOL[_i] = False
for _pid, _pname, _ptype, _pallowed in _PROPERTY_TABLE:
    PROP_TYPE[_pid] = _ptype
    PROP_ALLOWED[_pid] = _pallowed
    PROP_NAME[_pid] = _pname
    PROP_ID[_pname] = _pid
    PROP_BOOL[_pid] = _pname in (
        "payload_format_indicator", "request_problem_information",
        "request_response_information", "maximum_qos", "retain_available",
        "wildcard_subscription_available", "subscription_identifier_available",
        "shared_subscription_available")

PROPERTY_NAMES = {pid: name for pid, name, _t, _a in _PROPERTY_TABLE}

cdef enum:
    PID_SUBSCRIPTION_IDENTIFIER = 0x0B
    PID_RECEIVE_MAXIMUM = 0x21
    PID_TOPIC_ALIAS = 0x23
    PID_USER_PROPERTY = 0x26
    PID_MAXIMUM_PACKET_SIZE = 0x27


# --------------------------------------------------------------------------
# Bounded readers

cdef inline int rd_u8(Reader* r) except -1:
    if r.n < 1:
        _fail(RC_MALFORMED, "packet shorter than its contents")
    cdef int v = r.p[0]
    r.n -= 1
    r.p += 1
    return v


cdef inline int rd_u16(Reader* r) except -1:
    if r.n < 2:
        _fail(RC_MALFORMED, "packet shorter than its contents")
    cdef int v = (r.p[0] << 8) | r.p[1]
    r.n -= 2
    r.p += 2
    return v


cdef inline long long rd_u32(Reader* r) except -1:
    if r.n < 4:
        _fail(RC_MALFORMED, "packet shorter than its contents")
    cdef long long v = ((<long long>r.p[0] << 24) | (r.p[1] << 16) | (r.p[2] << 8) | r.p[3])
    r.n -= 4
    r.p += 4
    return v


cdef inline int rd_varint(Reader* r) except -1:
    """Variable Byte Integer (1.5.5): at most 4 bytes, else Malformed."""
    cdef int value = 0
    cdef int shift = 0
    cdef int b
    while shift < 28:
        b = rd_u8(r)
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value
        shift += 7
    return _fail(RC_MALFORMED, "variable byte integer longer than 4 bytes")


cdef object _decode_utf8(const uint8_t* s, Py_ssize_t n):
    # [MQTT-1.5.4-2] no U+0000; [MQTT-1.5.4-1] well-formed UTF-8 without
    # surrogates (Python's strict decoder refuses encoded surrogates too).
    if n and memchr(s, 0, n) != NULL:
        _fail(RC_MALFORMED, "UTF-8 string contains U+0000 [MQTT-1.5.4-2]")
    try:
        return PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    except UnicodeDecodeError:
        _fail(RC_MALFORMED, "ill-formed UTF-8 string [MQTT-1.5.4-1]")


cdef inline const uint8_t* rd_str_bytes(Reader* r, Py_ssize_t* n) except NULL:
    """The bytes of a UTF-8 string field (length in ``n``), not decoded yet."""
    n[0] = rd_u16(r)
    if r.n < n[0]:
        _fail(RC_MALFORMED, "string longer than the packet")
    cdef const uint8_t* s = r.p
    r.p += n[0]
    r.n -= n[0]
    return s


cdef inline object rd_str(Reader* r):
    cdef Py_ssize_t n
    cdef const uint8_t* s = rd_str_bytes(r, &n)
    return _decode_utf8(s, n)


cdef inline bytes rd_bin(Reader* r):
    cdef Py_ssize_t n = rd_u16(r)
    if r.n < n:
        _fail(RC_MALFORMED, "binary data longer than the packet")
    r.p += n
    r.n -= n
    return PyBytes_FromStringAndSize(<const char*>(r.p - n), n)


cdef inline int rd_end(Reader* r) except -1:
    if r.n != 0:
        _fail(RC_MALFORMED, "remaining length longer than the packet's contents")
    return 0


cdef object rd_props(Reader* r, int ptype):
    """Property Length + properties (2.2.2) allowed in packet type ``ptype``."""
    cdef Py_ssize_t plen = rd_varint(r)
    cdef Reader pr
    cdef int pid, kind
    cdef object value, name
    cdef dict props
    if plen > r.n:
        _fail(RC_MALFORMED, "property length beyond the packet")
    if plen == 0:
        return None
    pr.p = r.p
    pr.n = plen
    r.p += plen
    r.n -= plen
    props = {}
    while pr.n > 0:
        pid = rd_varint(&pr)
        if pid >= NPROPS or PROP_TYPE[pid] == 0:
            _fail(RC_MALFORMED, f"unknown property identifier 0x{pid:02X}")
        if not (PROP_ALLOWED[pid] & (1u << ptype)):
            _fail(RC_MALFORMED, f"property {PROP_NAME[pid]} not allowed in this packet [2.2.2.2]")
        kind = PROP_TYPE[pid]
        if kind == P_BYTE:
            value = rd_u8(&pr)
        elif kind == P_U16:
            value = rd_u16(&pr)
        elif kind == P_U32:
            value = rd_u32(&pr)
        elif kind == P_VARINT:
            value = rd_varint(&pr)
        elif kind == P_STR:
            value = rd_str(&pr)
        elif kind == P_BIN:
            value = rd_bin(&pr)
        else:
            value = (rd_str(&pr), rd_str(&pr))
        name = PROP_NAME[pid]
        if PROP_BOOL[pid] and value > 1:
            _fail(RC_PROTOCOL, f"{name} must be 0 or 1")
        if value == 0 and (pid == PID_RECEIVE_MAXIMUM or pid == PID_TOPIC_ALIAS
                           or pid == PID_MAXIMUM_PACKET_SIZE
                           or pid == PID_SUBSCRIPTION_IDENTIFIER):
            # 3.1.2.11.3 / 3.2.2.3.3 receive maximum, [MQTT-3.3.2-8] topic alias,
            # 3.1.2.11.4 maximum packet size, 3.8.2.1.2 subscription identifier
            _fail(RC_PROTOCOL, f"{name} of 0")
        if pid == PID_USER_PROPERTY:
            lst = props.get(name)
            if lst is None:
                props[name] = [value]
            else:
                lst.append(value)
        elif pid == PID_SUBSCRIPTION_IDENTIFIER and ptype == T_PUBLISH:
            # A PUBLISH to a subscriber carries one per matching subscription (3.3.2.3.8).
            lst = props.get(name)
            if lst is None:
                props[name] = [value]
            else:
                lst.append(value)
        elif name in props:
            _fail(RC_PROTOCOL, f"property {name} included more than once [2.2.2.2]")
        else:
            props[name] = value
    if "authentication_data" in props and "authentication_method" not in props:
        # 3.1.2.11.10: Authentication Data without an Authentication Method.
        _fail(RC_PROTOCOL, "authentication_data without authentication_method")
    return props


# --------------------------------------------------------------------------
# Writer (PyMem buffer with 5 bytes reserved in front for the fixed header)

cdef enum:
    HEADROOM = 5     # room for the largest fixed header: 1 + 4 bytes


cdef int wb_init(Writer* w, Py_ssize_t cap) except -1:
    w.data = <uint8_t*>PyMem_Malloc(cap + HEADROOM)
    if w.data == NULL:
        raise MemoryError()
    w.len = HEADROOM
    w.cap = cap + HEADROOM
    return 0


cdef int wb_grow(Writer* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    cdef uint8_t* data
    if cap < w.len + extra:
        cap = w.len + extra
    data = <uint8_t*>PyMem_Realloc(w.data, cap)
    if data == NULL:
        raise MemoryError()
    w.data = data
    w.cap = cap
    return 0


cdef inline int wb_need(Writer* w, Py_ssize_t extra) except -1:
    if w.len + extra > w.cap:
        wb_grow(w, extra)
    return 0


cdef inline int wb_u8(Writer* w, int v) except -1:
    if v < 0 or v > 0xFF:
        raise ValueError(f"byte value out of range: {v}")
    wb_need(w, 1)
    w.data[w.len] = v
    w.len += 1
    return 0


cdef inline int wb_u16(Writer* w, long v) except -1:
    if v < 0 or v > 0xFFFF:
        raise ValueError(f"two byte integer out of range: {v}")
    wb_need(w, 2)
    put_u16(w.data + w.len, v)
    w.len += 2
    return 0


cdef inline int wb_u32(Writer* w, long long v) except -1:
    if v < 0 or v > 0xFFFFFFFF:
        raise ValueError(f"four byte integer out of range: {v}")
    wb_need(w, 4)
    put_u32(w.data + w.len, <unsigned long>v)
    w.len += 4
    return 0


cdef inline int wb_varint(Writer* w, long long v) except -1:
    if v < 0 or v > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {v}")
    wb_need(w, 4)
    w.len = put_varint(w.data + w.len, v) - w.data
    return 0


cdef inline int wb_raw(Writer* w, const void* p, Py_ssize_t n) except -1:
    wb_need(w, n)
    memcpy(w.data + w.len, p, n)
    w.len += n
    return 0


cdef int wb_str(Writer* w, object s) except -1:
    """UTF-8 Encoded String (1.5.4): two-byte length + bytes. Accepts str or bytes."""
    cdef Py_ssize_t n
    cdef const char* p
    if isinstance(s, str):
        p = PyUnicode_AsUTF8AndSize(s, &n)
    elif isinstance(s, bytes):
        p = PyBytes_AS_STRING(s)
        n = PyBytes_GET_SIZE(s)
    else:
        raise TypeError(f"expected str, got {type(s).__name__}")
    if n > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    wb_u16(w, n)
    return wb_raw(w, p, n)


cdef int wb_bin(Writer* w, object b) except -1:
    """Binary Data (1.5.6): two-byte length + bytes."""
    cdef Py_buffer view
    if isinstance(b, str):
        return wb_str(w, b)
    PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
    try:
        if view.len > 0xFFFF:
            raise ValueError("binary data longer than 65535 bytes")
        wb_u16(w, view.len)
        wb_raw(w, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef int _write_prop(Writer* w, int pid, object value) except -1:
    cdef int kind = PROP_TYPE[pid]
    wb_varint(w, pid)
    if kind == P_BYTE:
        wb_u8(w, value)
    elif kind == P_U16:
        wb_u16(w, value)
    elif kind == P_U32:
        wb_u32(w, value)
    elif kind == P_VARINT:
        wb_varint(w, value)
    elif kind == P_STR:
        wb_str(w, value)
    elif kind == P_BIN:
        wb_bin(w, value)
    else:
        k, v = value
        wb_str(w, k)
        wb_str(w, v)
    return 0


cdef int wb_props(Writer* w, object props) except -1:
    """Property Length + properties from a dict keyed by property name."""
    cdef Writer tmp
    cdef int pid
    if not props:
        return wb_u8(w, 0)
    tmp.data = NULL
    try:
        wb_init(&tmp, 64)
        tmp.len = 0
        for name, value in (<dict?>props).items():
            pid = PROP_ID.get(name, 0)
            if pid == 0:
                raise ValueError(f"unknown MQTT property {name!r}")
            if pid == PID_USER_PROPERTY or (pid == PID_SUBSCRIPTION_IDENTIFIER
                                            and isinstance(value, (list, tuple))):
                for item in value:
                    _write_prop(&tmp, pid, item)
            else:
                _write_prop(&tmp, pid, value)
        wb_varint(w, tmp.len)
        wb_raw(w, tmp.data, tmp.len)
    finally:
        PyMem_Free(tmp.data)
    return 0


cdef bytes wb_finish(Writer* w, int first):
    """Back-fill the fixed header in front of the body; return the whole packet."""
    cdef Py_ssize_t body = w.len - HEADROOM
    cdef Py_ssize_t hlen
    cdef uint8_t* start
    if body > MAX_REMAINING_LENGTH:
        raise ValueError("packet larger than the MQTT maximum")
    hlen = 1 + varint_size(body)
    start = w.data + HEADROOM - hlen
    start[0] = first
    put_varint(start + 1, body)
    return PyBytes_FromStringAndSize(<const char*>start, hlen + body)


cdef bytes _encode(Packet pkt, int first, int version, Py_ssize_t cap):
    cdef Writer w
    w.data = NULL
    if version != 3 and version != 4 and version != 5:
        raise ValueError(f"unknown MQTT protocol version {version}")
    try:
        wb_init(&w, cap)
        pkt._encode_body(&w, version)
        return wb_finish(&w, first)
    finally:
        PyMem_Free(w.data)


cdef inline object _norm(object props):
    # Properties are None when absent or empty; {} compares equal to None.
    return props if props else None


# --------------------------------------------------------------------------
# Packets

@cython.no_gc
cdef class Packet:
    """Base of every MQTT control packet; ``type`` is its packet type constant.

    Packets are not tracked by the cyclic garbage collector (``no_gc``): their
    fields are strings, bytes, ints and plain containers of those, which never
    lead back to a packet, and the broker allocates one per message.
    """

    _fields = ()
    type = 0

    cdef int _encode_body(self, Writer* w, int version) except -1:
        return 0

    def encode(self, int protocol_version) -> bytes:
        """The whole packet, fixed header included, as ``protocol_version`` (3, 4, 5) writes it."""
        return _encode(self, self.type << 4, protocol_version, 16)

    def __eq__(self, other):
        if type(self) is not type(other):
            return NotImplemented
        for f in self._fields:
            a = getattr(self, f)
            b = getattr(other, f)
            if f.endswith("properties"):
                a = _norm(a)
                b = _norm(b)
            if a != b:
                return False
        return True

    def __ne__(self, other):
        eq = self.__eq__(other)
        if eq is NotImplemented:
            return eq
        return not eq

    __hash__ = None

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"

    def __reduce__(self):
        return (_rebuild, (type(self), {f: getattr(self, f) for f in self._fields}))


def _rebuild(cls, fields):
    return cls(**fields)


@cython.no_gc
cdef class Connect(Packet):
    """CONNECT (3.1). ``protocol_version`` 3 (name "MQIsdp"), 4 or 5 ("MQTT");
    a will is present iff ``will_topic`` is not None; ``password`` is bytes;
    ``bridge`` is the top bit of the protocol level that Mosquitto bridges set."""
    cdef public object protocol_name
    cdef public int protocol_version
    cdef public bint clean_start
    cdef public int keepalive
    cdef public object client_id
    cdef public object will_topic
    cdef public object will_payload
    cdef public int will_qos
    cdef public bint will_retain
    cdef public object will_properties
    cdef public object username
    cdef public object password
    cdef public object properties
    cdef public bint bridge

    _fields = ("protocol_name", "protocol_version", "clean_start", "keepalive", "client_id",
               "will_topic", "will_payload", "will_qos", "will_retain", "will_properties",
               "username", "password", "properties", "bridge")
    type = CONNECT

    def __init__(self, protocol_name="MQTT", int protocol_version=4, bint clean_start=True,
                 int keepalive=60, client_id="", will_topic=None, will_payload=None,
                 int will_qos=0, bint will_retain=False, will_properties=None, username=None,
                 password=None, properties=None, bint bridge=False):
        self.protocol_name = protocol_name
        self.protocol_version = protocol_version
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.client_id = client_id
        self.will_topic = will_topic
        self.will_payload = will_payload
        self.will_qos = will_qos
        self.will_retain = will_retain
        self.will_properties = will_properties
        self.username = username
        self.password = password
        self.properties = properties
        self.bridge = bridge

    def encode(self, int protocol_version) -> bytes:
        """Encoded in the format of ``protocol_version``, which is also the level byte written.

        The protocol name is ``self.protocol_name``, except that the default
        "MQTT" becomes "MQIsdp" for version 3."""
        return _encode(self, T_CONNECT << 4, protocol_version, 64)

    cdef int _encode_body(self, Writer* w, int version) except -1:
        cdef int flags = 0
        name = self.protocol_name
        if version == 3 and name == "MQTT":
            name = "MQIsdp"
        wb_str(w, name)
        wb_u8(w, version | (0x80 if self.bridge else 0))
        if self.clean_start:
            flags |= 0x02
        if self.will_topic is not None:
            flags |= 0x04 | ((self.will_qos & 3) << 3)
            if self.will_retain:
                flags |= 0x20
        if self.password is not None:
            flags |= 0x40
        if self.username is not None:
            flags |= 0x80
        wb_u8(w, flags)
        wb_u16(w, self.keepalive)
        if version == 5:
            wb_props(w, self.properties)
        wb_str(w, self.client_id)
        if self.will_topic is not None:
            if version == 5:
                wb_props(w, self.will_properties)
            wb_str(w, self.will_topic)
            wb_bin(w, self.will_payload if self.will_payload is not None else b"")
        if self.username is not None:
            wb_str(w, self.username)
        if self.password is not None:
            wb_bin(w, self.password)
        return 0


@cython.no_gc
cdef class Connack(Packet):
    """CONNACK (3.2). For 3.1/3.1.1 ``reason_code`` is the return code 0-5."""
    cdef public bint session_present
    cdef public int reason_code
    cdef public object properties

    _fields = ("session_present", "reason_code", "properties")
    type = CONNACK

    def __init__(self, bint session_present=False, int reason_code=0, properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = properties

    cdef int _encode_body(self, Writer* w, int version) except -1:
        wb_u8(w, 1 if self.session_present else 0)
        wb_u8(w, self.reason_code)
        if version == 5:
            wb_props(w, self.properties)
        return 0


@cython.no_gc
cdef class Publish(Packet):
    """PUBLISH (3.3). ``topic`` is str ("" with a topic alias in 5.0), ``payload`` bytes.
    Its fields are declared in src/raftmq/_codec.pxd (the protocol core reads them)."""

    _fields = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")
    type = PUBLISH

    def __init__(self, topic="", payload=b"", int qos=0, bint retain=False, bint dup=False,
                 int packet_id=0, properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties

    def encode(self, int protocol_version) -> bytes:
        return _encode_publish(self.topic, self.payload, self.qos, self.retain, self.dup,
                               self.packet_id, self.properties, protocol_version)


@cython.no_gc
cdef class _PubAckBase(Packet):
    cdef public int packet_id
    cdef public int reason_code
    cdef public object properties

    _fields = ("packet_id", "reason_code", "properties")

    def __init__(self, int packet_id=0, int reason_code=0, properties=None):
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties

    def encode(self, int protocol_version) -> bytes:
        return _encode_ack(self.type, self.packet_id, self.reason_code, self.properties,
                           protocol_version)


@cython.no_gc
cdef class Puback(_PubAckBase):
    """PUBACK (3.4)."""
    type = PUBACK


@cython.no_gc
cdef class Pubrec(_PubAckBase):
    """PUBREC (3.5)."""
    type = PUBREC


@cython.no_gc
cdef class Pubrel(_PubAckBase):
    """PUBREL (3.6)."""
    type = PUBREL


@cython.no_gc
cdef class Pubcomp(_PubAckBase):
    """PUBCOMP (3.7)."""
    type = PUBCOMP


@cython.no_gc
cdef class Subscribe(Packet):
    """SUBSCRIBE (3.8). ``subscriptions``: list of
    (topic_filter, qos, no_local, retain_as_published, retain_handling)."""
    cdef public int packet_id
    cdef public list subscriptions
    cdef public object properties

    _fields = ("packet_id", "subscriptions", "properties")
    type = SUBSCRIBE

    def __init__(self, int packet_id=0, subscriptions=None, properties=None):
        self.packet_id = packet_id
        self.subscriptions = list(subscriptions) if subscriptions is not None else []
        self.properties = properties

    def encode(self, int protocol_version) -> bytes:
        return _encode(self, (T_SUBSCRIBE << 4) | 0x02, protocol_version, 64)

    cdef int _encode_body(self, Writer* w, int version) except -1:
        cdef int opts
        wb_u16(w, self.packet_id)
        if version == 5:
            wb_props(w, self.properties)
        for sub in self.subscriptions:
            if len(sub) == 2:
                filt, qos = sub
                nl = rap = False
                rh = 0
            else:
                filt, qos, nl, rap, rh = sub
            wb_str(w, filt)
            opts = qos
            if version == 5:
                opts |= (4 if nl else 0) | (8 if rap else 0) | (rh << 4)
            wb_u8(w, opts)
        return 0


@cython.no_gc
cdef class Suback(Packet):
    """SUBACK (3.9). ``reason_codes``: one per subscription (3.1.1: 0, 1, 2 or 0x80)."""
    cdef public int packet_id
    cdef public list reason_codes
    cdef public object properties

    _fields = ("packet_id", "reason_codes", "properties")
    type = SUBACK

    def __init__(self, int packet_id=0, reason_codes=None, properties=None):
        self.packet_id = packet_id
        self.reason_codes = list(reason_codes) if reason_codes is not None else []
        self.properties = properties

    cdef int _encode_body(self, Writer* w, int version) except -1:
        wb_u16(w, self.packet_id)
        if version == 5:
            wb_props(w, self.properties)
        for rc in self.reason_codes:
            wb_u8(w, rc)
        return 0


@cython.no_gc
cdef class Unsubscribe(Packet):
    """UNSUBSCRIBE (3.10)."""
    cdef public int packet_id
    cdef public list topic_filters
    cdef public object properties

    _fields = ("packet_id", "topic_filters", "properties")
    type = UNSUBSCRIBE

    def __init__(self, int packet_id=0, topic_filters=None, properties=None):
        self.packet_id = packet_id
        self.topic_filters = list(topic_filters) if topic_filters is not None else []
        self.properties = properties

    def encode(self, int protocol_version) -> bytes:
        return _encode(self, (T_UNSUBSCRIBE << 4) | 0x02, protocol_version, 64)

    cdef int _encode_body(self, Writer* w, int version) except -1:
        wb_u16(w, self.packet_id)
        if version == 5:
            wb_props(w, self.properties)
        for filt in self.topic_filters:
            wb_str(w, filt)
        return 0


@cython.no_gc
cdef class Unsuback(Packet):
    """UNSUBACK (3.11). 3.1.1 has no payload: ``reason_codes`` is ignored there."""
    cdef public int packet_id
    cdef public list reason_codes
    cdef public object properties

    _fields = ("packet_id", "reason_codes", "properties")
    type = UNSUBACK

    def __init__(self, int packet_id=0, reason_codes=None, properties=None):
        self.packet_id = packet_id
        self.reason_codes = list(reason_codes) if reason_codes is not None else []
        self.properties = properties

    cdef int _encode_body(self, Writer* w, int version) except -1:
        wb_u16(w, self.packet_id)
        if version == 5:
            wb_props(w, self.properties)
            for rc in self.reason_codes:
                wb_u8(w, rc)
        return 0


@cython.no_gc
cdef class Pingreq(Packet):
    """PINGREQ (3.12)."""
    type = PINGREQ

    def __init__(self):
        pass


@cython.no_gc
cdef class Pingresp(Packet):
    """PINGRESP (3.13)."""
    type = PINGRESP

    def __init__(self):
        pass


@cython.no_gc
cdef class Disconnect(Packet):
    """DISCONNECT (3.14). 3.1.1 has neither reason code nor properties."""
    cdef public int reason_code
    cdef public object properties

    _fields = ("reason_code", "properties")
    type = DISCONNECT

    def __init__(self, int reason_code=0, properties=None):
        self.reason_code = reason_code
        self.properties = properties

    cdef int _encode_body(self, Writer* w, int version) except -1:
        if version == 5 and (self.reason_code != 0 or self.properties):
            # 3.14.2.1: reason and property length may be omitted when 0 / none.
            wb_u8(w, self.reason_code)
            if self.properties:
                wb_props(w, self.properties)
        return 0


@cython.no_gc
cdef class Auth(Packet):
    """AUTH (3.15), MQTT 5.0 only."""
    cdef public int reason_code
    cdef public object properties

    _fields = ("reason_code", "properties")
    type = AUTH

    def __init__(self, int reason_code=0, properties=None):
        self.reason_code = reason_code
        self.properties = properties

    def encode(self, int protocol_version) -> bytes:
        if protocol_version != 5:
            raise ValueError("AUTH exists only in MQTT 5.0")
        return _encode(self, T_AUTH << 4, protocol_version, 16)

    cdef int _encode_body(self, Writer* w, int version) except -1:
        if self.reason_code != 0 or self.properties:
            # 3.15.2.1: may be omitted when the reason is 0 and there are no properties.
            wb_u8(w, self.reason_code)
            if self.properties:
                wb_props(w, self.properties)
        return 0


# --------------------------------------------------------------------------
# Fast encoders for the broker's fan-out: no packet object is built.

cdef bytes _encode_props_bytes(object props):
    cdef Writer w
    w.data = NULL
    try:
        wb_init(&w, 64)
        w.len = 0
        wb_props(&w, props)
        return PyBytes_FromStringAndSize(<const char*>w.data, w.len)
    finally:
        PyMem_Free(w.data)


cdef bytes _encode_publish(object topic, object payload, int qos, bint retain, bint dup,
                           int packet_id, object properties, int version):
    cdef const char* tp
    cdef Py_ssize_t tlen, body, total
    cdef Py_buffer pview
    cdef bytes props_bytes = None
    cdef bytes out
    cdef uint8_t* p
    cdef bint have_view = False
    cdef const char* pp
    cdef Py_ssize_t plen
    if qos < 0 or qos > 2:
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
    if qos and (packet_id <= 0 or packet_id > 0xFFFF):
        raise ValueError(f"QoS {qos} PUBLISH needs a packet id in 1..65535, not {packet_id}")
    if version != 3 and version != 4 and version != 5:
        raise ValueError(f"unknown MQTT protocol version {version}")
    if isinstance(topic, str):
        tp = PyUnicode_AsUTF8AndSize(topic, &tlen)
    elif isinstance(topic, bytes):
        tp = PyBytes_AS_STRING(topic)
        tlen = PyBytes_GET_SIZE(topic)
    else:
        raise TypeError("topic must be str or bytes")
    if tlen > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    if isinstance(payload, bytes):
        pp = PyBytes_AS_STRING(payload)
        plen = PyBytes_GET_SIZE(payload)
    else:
        if isinstance(payload, str):
            payload = (<str>payload).encode()
        PyObject_GetBuffer(payload, &pview, PyBUF_SIMPLE)
        have_view = True
        pp = <const char*>pview.buf
        plen = pview.len
    try:
        body = 2 + tlen + plen
        if qos:
            body += 2
        if version == 5:
            if properties:
                props_bytes = _encode_props_bytes(properties)
                body += PyBytes_GET_SIZE(props_bytes)
            else:
                body += 1
        if body > MAX_REMAINING_LENGTH:
            raise ValueError("packet larger than the MQTT maximum")
        total = 1 + varint_size(body) + body
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        p[0] = (T_PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        p = put_varint(p + 1, body)
        p = put_u16(p, tlen)
        memcpy(p, tp, tlen)
        p += tlen
        if qos:
            p = put_u16(p, packet_id)
        if version == 5:
            if props_bytes is not None:
                memcpy(p, PyBytes_AS_STRING(props_bytes), PyBytes_GET_SIZE(props_bytes))
                p += PyBytes_GET_SIZE(props_bytes)
            else:
                p[0] = 0
                p += 1
        memcpy(p, pp, plen)
        return out
    finally:
        if have_view:
            PyBuffer_Release(&pview)


cdef bytes _encode_ack(int ptype, int packet_id, int reason_code, object properties,
                       int version):
    cdef bytes out
    cdef uint8_t* p
    cdef int first = (ptype << 4) | (0x02 if ptype == T_PUBREL else 0)
    cdef Writer w
    if packet_id < 0 or packet_id > 0xFFFF:
        raise ValueError(f"packet id out of range: {packet_id}")
    if version != 3 and version != 4 and version != 5:
        raise ValueError(f"unknown MQTT protocol version {version}")
    if version != 5 or (reason_code == 0 and not properties):
        # 3.4.2.1: reason code and property length may be omitted when 0 / none.
        out = PyBytes_FromStringAndSize(NULL, 4)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        p[0] = first
        p[1] = 2
        put_u16(p + 2, packet_id)
        return out
    if not properties:
        if reason_code < 0 or reason_code > 0xFF:
            raise ValueError(f"reason code out of range: {reason_code}")
        out = PyBytes_FromStringAndSize(NULL, 5)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        p[0] = first
        p[1] = 3
        put_u16(p + 2, packet_id)
        p[4] = reason_code
        return out
    w.data = NULL
    try:
        wb_init(&w, 32)
        wb_u16(&w, packet_id)
        wb_u8(&w, reason_code)
        wb_props(&w, properties)
        return wb_finish(&w, first)
    finally:
        PyMem_Free(w.data)


def encode_publish(topic, payload, int qos, bint retain, bint dup, int packet_id,
                   properties, int protocol_version) -> bytes:
    """A PUBLISH packet straight from its fields (no Publish object)."""
    return _encode_publish(topic, payload, qos, retain, dup, packet_id, properties,
                           protocol_version)


def encode_ack(int packet_type, int packet_id, int reason_code=0, int protocol_version=4,
               properties=None) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP (short form when reason 0 and no properties)."""
    if packet_type < T_PUBACK or packet_type > T_PUBCOMP:
        raise ValueError(f"not an acknowledgement packet type: {packet_type}")
    return _encode_ack(packet_type, packet_id, reason_code, properties, protocol_version)


def encode_puback(int packet_id, int reason_code=0, int protocol_version=4,
                  properties=None) -> bytes:
    return _encode_ack(T_PUBACK, packet_id, reason_code, properties, protocol_version)


def encode_pubrec(int packet_id, int reason_code=0, int protocol_version=4,
                  properties=None) -> bytes:
    return _encode_ack(T_PUBREC, packet_id, reason_code, properties, protocol_version)


def encode_pubrel(int packet_id, int reason_code=0, int protocol_version=4,
                  properties=None) -> bytes:
    return _encode_ack(T_PUBREL, packet_id, reason_code, properties, protocol_version)


def encode_pubcomp(int packet_id, int reason_code=0, int protocol_version=4,
                   properties=None) -> bytes:
    return _encode_ack(T_PUBCOMP, packet_id, reason_code, properties, protocol_version)


PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"


def valid_utf8(data) -> bool:
    """True if ``data`` is well-formed UTF-8 (e.g. a payload with payload format indicator 1)."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------
# Parser

cdef class Parser:
    """Incremental MQTT parser for one connection (see the module docstring).

    ``is_server`` True parses what clients send and refuses server-only
    packets; False parses what servers send (for test clients and load
    generators, which must set ``protocol_version`` before feeding).
    ``protocol_version`` is 0 until a CONNECT is parsed, then 3, 4 or 5; it is
    set as soon as the CONNECT's protocol level is read and valid, so a broker
    can answer a CONNECT that is malformed further on with a CONNACK of the
    right version.  ``max_packet_size`` bounds the total packet size (fixed
    header included, as MQTT 5's Maximum Packet Size does).
    """

    # (Its fields and methods are declared in src/raftmq/_codec.pxd.)

    def __init__(self, Py_ssize_t max_packet_size=268435455, bint is_server=True):
        self.max_packet_size = max_packet_size
        self.is_server = is_server
        self.protocol_version = 0
        self._buf = bytearray()
        self._need = 0
        self.error = None
        self._topic_raw = None
        self._topic = None

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete packet."""
        return len(self._buf)

    cpdef list feed(self, data):
        """Parse ``data`` (bytes, bytearray, memoryview); return the complete packets."""
        cdef Py_buffer view
        cdef Py_ssize_t used
        cdef list out = []
        if self.error is not None:
            raise self.error
        if len(self._buf) == 0:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                used = self._parse_frames(<const uint8_t*>view.buf, view.len, out)
                if used < view.len:
                    self._buf += (<const char*>view.buf)[used:view.len]
            except MQTTError as e:
                e.packets = out
                self.error = e
                raise
            finally:
                PyBuffer_Release(&view)
            return out
        self._buf += data
        if len(self._buf) < self._need:
            return out
        PyObject_GetBuffer(self._buf, &view, PyBUF_SIMPLE)
        try:
            used = self._parse_frames(<const uint8_t*>view.buf, view.len, out)
        except MQTTError as e:
            e.packets = out
            self.error = e
            raise
        finally:
            PyBuffer_Release(&view)
        del self._buf[:used]
        return out

    cdef Py_ssize_t _parse_frames(self, const uint8_t* p, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t rl, hlen, total, k
        cdef uint8_t first, b
        cdef Reader r
        self._need = 0
        while pos < n:
            first = p[pos]
            self._check_header(first)
            # Remaining Length: Variable Byte Integer of at most 4 bytes (2.1.4, 1.5.5).
            rl = 0
            hlen = 0
            k = 0
            while k < 4:
                if pos + 1 + k >= n:
                    return pos          # header incomplete
                b = p[pos + 1 + k]
                rl |= (<Py_ssize_t>(b & 0x7F)) << (7 * k)
                k += 1
                if b < 0x80:
                    hlen = 1 + k
                    break
            if hlen == 0:
                _fail(RC_MALFORMED, "remaining length longer than 4 bytes [1.5.5]")
            total = hlen + rl
            if total > self.max_packet_size:
                _fail(RC_TOO_LARGE, f"packet of {total} bytes exceeds the maximum of "
                                    f"{self.max_packet_size} (Maximum Packet Size, 3.1.2.11.4)")
            if n - pos < total:
                self._need = total
                return pos
            r.p = p + pos + hlen
            r.n = rl
            out.append(self._parse_packet(first, &r))
            pos += total
        return pos

    cdef int _check_header(self, uint8_t first) except -1:
        """Checks on the first byte alone, done before the body arrives."""
        cdef int ptype = first >> 4
        cdef int flags = first & 0x0F
        cdef int qos
        if ptype == 0 or (ptype == T_AUTH and self.protocol_version not in (0, 5)):
            _fail(RC_MALFORMED, f"reserved packet type {ptype}")
        if self.is_server:
            if self.protocol_version == 0 and ptype != T_CONNECT:
                _fail(RC_PROTOCOL, "first packet is not CONNECT [MQTT-3.1.0-1]")
            if ptype == T_CONNECT and self.protocol_version != 0:
                _fail(RC_PROTOCOL, "second CONNECT [MQTT-3.1.0-2]")
            if not (FROM_CLIENT & (1u << ptype)):
                _fail(RC_PROTOCOL, f"a client may not send packet type {ptype}")
        else:
            if self.protocol_version == 0:
                _fail(RC_PROTOCOL, "client-side parser needs protocol_version set")
            if not (FROM_SERVER & (1u << ptype)):
                _fail(RC_PROTOCOL, f"a server may not send packet type {ptype}")
        if ptype == T_PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                _fail(RC_MALFORMED, "PUBLISH with QoS 3 [MQTT-3.3.1-4]")
            if qos == 0 and (flags & 0x08):
                _fail(RC_MALFORMED, "PUBLISH with DUP and QoS 0 [MQTT-3.3.1-2]")
        elif ptype == T_PUBREL or ptype == T_SUBSCRIBE or ptype == T_UNSUBSCRIBE:
            if flags != 0x02:
                _fail(RC_MALFORMED, "reserved fixed header flags must be 0010 [MQTT-2.1.3-1]")
        elif flags != 0:
            _fail(RC_MALFORMED, "reserved fixed header flags must be 0000 [MQTT-2.1.3-1]")
        return 0

    cdef object _parse_packet(self, uint8_t first, Reader* r):
        cdef int ptype = first >> 4
        if ptype == T_PUBLISH:
            return self._parse_publish(first, r)
        if ptype == T_PUBACK or ptype == T_PUBREC or ptype == T_PUBREL or ptype == T_PUBCOMP:
            return self._parse_puback(ptype, r)
        if ptype == T_PINGREQ or ptype == T_PINGRESP:
            rd_end(r)
            return Pingreq.__new__(Pingreq) if ptype == T_PINGREQ else Pingresp.__new__(Pingresp)
        if ptype == T_CONNECT:
            return self._parse_connect(r)
        if ptype == T_CONNACK:
            return self._parse_connack(r)
        if ptype == T_SUBSCRIBE:
            return self._parse_subscribe(r)
        if ptype == T_SUBACK or ptype == T_UNSUBACK:
            return self._parse_suback(ptype, r)
        if ptype == T_UNSUBSCRIBE:
            return self._parse_unsubscribe(r)
        return self._parse_reason_only(ptype, r)   # DISCONNECT, AUTH

    cdef object _parse_connect(self, Reader* r):
        cdef Connect c = Connect.__new__(Connect)
        cdef int level, flags
        name = rd_str(r)
        level = rd_u8(r)
        # Mosquitto bridges (try_private) set the top bit of the level: accept it.
        c.bridge = (level & 0x80) != 0
        level &= 0x7F
        if not ((name == "MQTT" and (level == 4 or level == 5))
                or (name == "MQIsdp" and level == 3)):
            _fail(RC_VERSION, f"unsupported protocol {name!r} level {level} [MQTT-3.1.2-2]")
        self.protocol_version = level
        flags = rd_u8(r)
        if flags & 0x01:
            _fail(RC_MALFORMED, "CONNECT reserved flag set [MQTT-3.1.2-3]")
        c.protocol_name = name
        c.protocol_version = level
        c.clean_start = (flags & 0x02) != 0
        c.will_qos = (flags >> 3) & 3
        c.will_retain = (flags & 0x20) != 0
        if flags & 0x04:
            if c.will_qos == 3:
                _fail(RC_MALFORMED, "will QoS 3 [MQTT-3.1.2-12]")
        else:
            if c.will_qos != 0:
                _fail(RC_MALFORMED, "will QoS without will flag [MQTT-3.1.2-11]")
            if c.will_retain:
                _fail(RC_MALFORMED, "will retain without will flag [MQTT-3.1.2-13]")
        if level != 5 and (flags & 0x40) and not (flags & 0x80):
            _fail(RC_MALFORMED, "password without user name (3.1.1 [MQTT-3.1.2-22])")
        c.keepalive = rd_u16(r)
        c.properties = rd_props(r, T_CONNECT) if level == 5 else None
        c.client_id = rd_str(r)
        c.will_properties = None
        c.will_topic = None
        c.will_payload = None
        if flags & 0x04:
            if level == 5:
                c.will_properties = rd_props(r, T_WILL)
            c.will_topic = rd_str(r)
            c.will_payload = rd_bin(r)
        c.username = rd_str(r) if flags & 0x80 else None
        c.password = rd_bin(r) if flags & 0x40 else None
        rd_end(r)
        return c

    cdef object _parse_connack(self, Reader* r):
        cdef Connack c = Connack.__new__(Connack)
        cdef int flags = rd_u8(r)
        if flags & 0xFE:
            _fail(RC_MALFORMED, "CONNACK reserved flags set [MQTT-3.2.2-1]")
        c.session_present = flags & 1
        c.reason_code = rd_u8(r)
        c.properties = None
        if self.protocol_version == 5 and r.n:
            c.properties = rd_props(r, T_CONNACK)
        rd_end(r)
        return c

    cdef object _parse_publish(self, uint8_t first, Reader* r):
        cdef Publish pkt = Publish.__new__(Publish)
        cdef int qos = (first >> 1) & 3
        # A publisher usually sends to one topic again and again: the topic of
        # the previous PUBLISH is kept, raw and decoded, and reused when the
        # bytes are the same -- no decode and no new str, whose hash (the
        # router's lookups) is then computed once, not per message.
        cdef Py_ssize_t n
        cdef const uint8_t* raw = rd_str_bytes(r, &n)
        cached = self._topic_raw
        if cached is not None and PyBytes_GET_SIZE(cached) == n and \
                memcmp(PyBytes_AS_STRING(cached), raw, n) == 0:
            pkt.topic = self._topic
        else:
            pkt.topic = _decode_utf8(raw, n)  # (checked: only valid bytes are kept)
            self._topic_raw = PyBytes_FromStringAndSize(<const char*>raw, n)
            self._topic = pkt.topic
        pkt.qos = qos
        pkt.retain = first & 1
        pkt.dup = (first & 0x08) != 0
        if qos:
            pkt.packet_id = rd_u16(r)
            if pkt.packet_id == 0:
                _fail(RC_PROTOCOL, "QoS > 0 PUBLISH with packet id 0 [MQTT-2.2.1-3]")
        else:
            pkt.packet_id = 0
        if self.protocol_version == 5:
            props = rd_props(r, T_PUBLISH)
            if props is not None and self.is_server and "subscription_identifier" in props:
                _fail(RC_PROTOCOL, "PUBLISH from a client with a subscription identifier "
                                   "[MQTT-3.3.4-6]")
            pkt.properties = props
        else:
            pkt.properties = None
        pkt.payload = PyBytes_FromStringAndSize(<const char*>r.p, r.n)
        r.p += r.n
        r.n = 0
        return pkt

    cdef object _parse_puback(self, int ptype, Reader* r):
        cdef _PubAckBase a
        if ptype == T_PUBACK:
            a = Puback.__new__(Puback)
        elif ptype == T_PUBREC:
            a = Pubrec.__new__(Pubrec)
        elif ptype == T_PUBREL:
            a = Pubrel.__new__(Pubrel)
        else:
            a = Pubcomp.__new__(Pubcomp)
        a.packet_id = rd_u16(r)
        if a.packet_id == 0:
            _fail(RC_PROTOCOL, "packet id 0 [MQTT-2.2.1-3]")
        a.reason_code = 0
        a.properties = None
        if self.protocol_version == 5 and r.n:
            # 3.4.2.1: reason code and properties are optional.
            a.reason_code = rd_u8(r)
            if r.n:
                a.properties = rd_props(r, ptype)
        rd_end(r)
        return a

    cdef object _parse_subscribe(self, Reader* r):
        cdef Subscribe s = Subscribe.__new__(Subscribe)
        cdef int opts, qos, rh
        cdef bint v5 = self.protocol_version == 5
        cdef list subs = []
        s.packet_id = rd_u16(r)
        if s.packet_id == 0:
            _fail(RC_PROTOCOL, "SUBSCRIBE with packet id 0 [MQTT-2.2.1-3]")
        s.properties = rd_props(r, T_SUBSCRIBE) if v5 else None
        while r.n:
            filt = rd_str(r)
            opts = rd_u8(r)
            qos = opts & 3
            if qos == 3:
                # 5.0 3.8.3.1: a Maximum QoS of 3 is a Protocol Error;
                # 3.1.1 [MQTT-3-8.3-4]: malformed.
                _fail(RC_PROTOCOL if v5 else RC_MALFORMED, "subscription QoS 3")
            if v5:
                if opts & 0xC0:
                    _fail(RC_MALFORMED, "subscription options reserved bits set [MQTT-3.8.3-5]")
                rh = (opts >> 4) & 3
                if rh == 3:
                    _fail(RC_PROTOCOL, "retain handling 3 [3.8.3.1]")
                if (opts & 4) and filt.startswith("$share/"):
                    _fail(RC_PROTOCOL, "no local on a shared subscription [MQTT-3.8.3-4]")
                subs.append((filt, qos, (opts & 4) != 0, (opts & 8) != 0, rh))
            else:
                if opts & 0xFC:
                    _fail(RC_MALFORMED, "subscription reserved bits set (3.1.1 [MQTT-3-8.3-4])")
                subs.append((filt, qos, False, False, 0))
        if not subs:
            _fail(RC_PROTOCOL, "SUBSCRIBE without topic filters [MQTT-3.8.3-2]")
        s.subscriptions = subs
        return s

    cdef object _parse_suback(self, int ptype, Reader* r):
        cdef Packet pkt
        cdef Suback sa
        cdef Unsuback ua
        cdef int pid = rd_u16(r)
        cdef list codes
        if pid == 0:
            _fail(RC_PROTOCOL, "packet id 0 [MQTT-2.2.1-3]")
        props = rd_props(r, ptype) if self.protocol_version == 5 else None
        codes = [r.p[i] for i in range(r.n)]
        r.p += r.n
        r.n = 0
        if ptype == T_SUBACK:
            sa = Suback.__new__(Suback)
            sa.packet_id = pid
            sa.properties = props
            sa.reason_codes = codes
            return sa
        if self.protocol_version != 5 and codes:
            _fail(RC_MALFORMED, "3.1.1 UNSUBACK has no payload")
        ua = Unsuback.__new__(Unsuback)
        ua.packet_id = pid
        ua.properties = props
        ua.reason_codes = codes
        return ua

    cdef object _parse_unsubscribe(self, Reader* r):
        cdef Unsubscribe u = Unsubscribe.__new__(Unsubscribe)
        cdef list filters = []
        u.packet_id = rd_u16(r)
        if u.packet_id == 0:
            _fail(RC_PROTOCOL, "UNSUBSCRIBE with packet id 0 [MQTT-2.2.1-3]")
        u.properties = rd_props(r, T_UNSUBSCRIBE) if self.protocol_version == 5 else None
        while r.n:
            filters.append(rd_str(r))
        if not filters:
            _fail(RC_PROTOCOL, "UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]")
        u.topic_filters = filters
        return u

    cdef object _parse_reason_only(self, int ptype, Reader* r):
        """DISCONNECT and AUTH: optional reason code and properties (3.14.2, 3.15.2)."""
        cdef int rc = 0
        props = None
        if self.protocol_version == 5 and r.n:
            rc = rd_u8(r)
            if r.n:
                props = rd_props(r, ptype)
        rd_end(r)
        if ptype == T_DISCONNECT:
            d = Disconnect.__new__(Disconnect)
            (<Disconnect>d).reason_code = rc
            (<Disconnect>d).properties = props
            return d
        a = Auth.__new__(Auth)
        (<Auth>a).reason_code = rc
        (<Auth>a).properties = props
        return a
