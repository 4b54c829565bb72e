# The codec's packet classes that the protocol core (ext/connection.pyx) reads
# field by field on every message: declared here so their fields are C struct
# members there, not attribute lookups.  The rest of ext/codec.pyx is its own.

from buf cimport Writer


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
