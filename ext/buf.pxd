# Bounded byte reader and growable byte writer for the MQTT codec.
#
# In the manner of py-pgproto's frb.pxd: a reader is a (pointer, remaining
# length) struct advanced by inline helpers that check the bound before every
# read, so a truncated or lying packet can never read past its frame. The
# helpers that can fail return a C int and declare ``except -1``; the error
# itself (an MQTTError) is raised by the caller-supplied failure function in
# codec.pyx, so this file stays free of Python objects.

from libc.stdint cimport uint8_t


cdef struct Reader:
    const uint8_t* p     # next unread byte
    Py_ssize_t n         # bytes left in the frame (never negative)


cdef struct Writer:
    uint8_t* data        # PyMem buffer; the first 5 bytes are kept for the fixed header
    Py_ssize_t len       # bytes written so far (including the reserved header room)
    Py_ssize_t cap       # allocated size


cdef inline Py_ssize_t varint_size(Py_ssize_t v) noexcept nogil:
    """Bytes needed to encode ``v`` as an MQTT Variable Byte Integer (1.5.5)."""
    if v < 128:
        return 1
    if v < 16384:
        return 2
    if v < 2097152:
        return 3
    return 4


cdef inline uint8_t* put_varint(uint8_t* p, Py_ssize_t v) noexcept nogil:
    """Write ``v`` (< 268435456) as a Variable Byte Integer at ``p``; return the end."""
    cdef uint8_t b
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            p[0] = b | 0x80
            p += 1
        else:
            p[0] = b
            return p + 1


cdef inline uint8_t* put_u16(uint8_t* p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF
    return p + 2


cdef inline uint8_t* put_u32(uint8_t* p, unsigned long v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF
    return p + 4
