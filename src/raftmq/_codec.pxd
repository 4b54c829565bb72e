# What the protocol core (ext/connection.pyx) uses of the codec on every message:
# the packet classes it reads field by field, the parser it feeds once per read
# and the PUBLISH encoder of the QoS 0 fan-out -- declared here so that those
# are C struct members and C calls there, not attribute lookups and Python
# calls.  The rest of ext/codec.pyx is its own.

from libc.stdint cimport uint8_t

from buf cimport Reader, Writer


cdef class Packet:
    cdef int _encode_body(self, Writer* w, int version) except -1


cdef class Publish(Packet):
    cdef public object topic
    cdef public object payload
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public object properties


cdef class Parser:
    # Fed once per read by the protocol core: ``feed`` is called as a C method.
    cdef public int protocol_version
    cdef public Py_ssize_t max_packet_size
    cdef public bint is_server
    cdef public object error     # the MQTTError that broke the stream; later feed() calls raise it
    cdef bytearray _buf          # bytes of an incomplete frame, kept across feed() calls
    cdef Py_ssize_t _need        # total size of the incomplete frame once its header is known
    cdef bytes _topic_raw        # the previous PUBLISH's topic name as sent, and decoded
    cdef object _topic

    cpdef list feed(self, data)
    cdef Py_ssize_t _parse_frames(self, const uint8_t* p, Py_ssize_t n, list out) except -1
    cdef int _check_header(self, uint8_t first) except -1
    cdef object _parse_packet(self, uint8_t first, Reader* r)
    cdef object _parse_connect(self, Reader* r)
    cdef object _parse_connack(self, Reader* r)
    cdef object _parse_publish(self, uint8_t first, Reader* r)
    cdef object _parse_puback(self, int ptype, Reader* r)
    cdef object _parse_subscribe(self, Reader* r)
    cdef object _parse_suback(self, int ptype, Reader* r)
    cdef object _parse_unsubscribe(self, Reader* r)
    cdef object _parse_reason_only(self, int ptype, Reader* r)


# A PUBLISH straight from its fields: the QoS 0 fan-out calls it as C.
cdef bytes _encode_publish(object topic, object payload, int qos, bint retain, bint dup,
                           int packet_id, object properties, int version)
