# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Frames between the workers of one node (raftmq.workers.mesh), compiled:
every message that crosses workers is encoded once and decoded once here.

    frame   := u32 length of what follows | u8 kind | body      (little endian)
    FWD     := u64 seq | u16 sender length | u16 assignment length
               | sender | assignment | message
    message := u16 topic length | topic | u8 qos + retain << 2 | u64 expiry (ms)
               | u32 properties length | properties | payload

``message`` is the layout of raftmq.state.entries.encode_message, so a frame's
tail can be handed to decode_message unchanged.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

DEF HEADER = 5
DEF FWD_FIXED = 12  # seq + two lengths
DEF MSG_FIXED = 15  # topic length + flags + expiry + properties length


cdef inline uint8_t* _put16(uint8_t* p, Py_ssize_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    return p + 2


cdef inline uint8_t* _put32(uint8_t* p, Py_ssize_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF
    return p + 4


cdef inline uint8_t* _put64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF
    return p + 8


cdef inline uint8_t* _copy(uint8_t* p, bytes b) noexcept:
    cdef Py_ssize_t n = len(b)
    if n:
        memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline Py_ssize_t _get16(const uint8_t* p) noexcept nogil:
    return p[0] | (p[1] << 8)


cdef inline Py_ssize_t _get32(const uint8_t* p) noexcept nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<Py_ssize_t>p[3] << 24)


cdef inline uint64_t _get64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


def fwd_frame(int kind, uint64_t seq, bytes sender, bytes assign, bytes topic, bytes payload,
              int qos, bint retain, bytes props, uint64_t expiry_at) -> bytes:
    """One FWD / FWD_SHARED frame (``topic`` already UTF-8)."""
    cdef Py_ssize_t n = (HEADER + FWD_FIXED + len(sender) + len(assign) + MSG_FIXED + len(topic)
                         + len(props) + len(payload))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    p = _put32(p, n - 4)
    p[0] = kind
    p += 1
    p = _put64(p, seq)
    p = _put16(p, len(sender))
    p = _put16(p, len(assign))
    p = _copy(p, sender)
    p = _copy(p, assign)
    p = _put16(p, len(topic))
    p = _copy(p, topic)
    p[0] = (qos & 3) | (4 if retain else 0)
    p += 1
    p = _put64(p, expiry_at)
    p = _put32(p, len(props))
    p = _copy(p, props)
    _copy(p, payload)
    return out


def split_frames(bytearray buf, int fwd_kind, int fwd_shared_kind):
    """The whole frames at the start of ``buf``: ``(frames, bytes consumed)``.

    A FWD / FWD_SHARED frame comes as ``(kind, seq, sender or None, assignment
    bytes or None, topic, payload, qos, retain, properties bytes or None,
    expiry)``; any other as ``(kind, body)``.  A FWD frame whose lengths do not
    fit its frame raises ValueError."""
    cdef const char* cbase = <char*>buf
    cdef const uint8_t* base = <const uint8_t*>cbase
    cdef Py_ssize_t end = len(buf)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t length, stop, p, slen, alen, tlen, plen
    cdef int kind, flags
    cdef list frames = []
    while end - pos >= HEADER:
        length = _get32(base + pos)
        stop = pos + 4 + length
        if length < 1 or stop > end:
            if length < 1:
                raise ValueError("empty frame")
            break
        kind = base[pos + 4]
        p = pos + HEADER
        if kind == fwd_kind or kind == fwd_shared_kind:
            if stop - p < FWD_FIXED + MSG_FIXED:
                raise ValueError("short FWD frame")
            seq = _get64(base + p)
            slen = _get16(base + p + 8)
            alen = _get16(base + p + 10)
            p += FWD_FIXED
            if p + slen + alen + MSG_FIXED > stop:
                raise ValueError("bad FWD lengths")
            sender = cbase[p:p + slen].decode("utf-8", "surrogatepass") if slen else None
            p += slen
            assign = cbase[p:p + alen] if alen else None
            p += alen
            tlen = _get16(base + p)
            p += 2
            if p + tlen + 13 > stop:
                raise ValueError("bad FWD topic length")
            topic = cbase[p:p + tlen].decode("utf-8")
            p += tlen
            flags = base[p]
            expiry = _get64(base + p + 1)
            plen = _get32(base + p + 9)
            p += 13
            if p + plen > stop:
                raise ValueError("bad FWD properties length")
            props = cbase[p:p + plen] if plen else None
            p += plen
            payload = cbase[p:stop]
            frames.append((kind, seq, sender, assign, topic, payload, flags & 3,
                           bool(flags & 4), props, expiry))
        else:
            frames.append((kind, cbase[p:stop]))
        pos = stop
    return frames, pos
