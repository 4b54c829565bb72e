# The per-connection object of the protocol core (ext/connection.pyx).
#
# Its state is a C struct: the compiled read path and QoS 0 fan-out read and
# write these fields directly, and ``cdef public`` keeps every one of them a
# plain attribute for the Python side (handlers, the session machinery, the
# worker hand-off's ``AdoptedConnection``, tests).  raftmq.broker.protocol's
# ``Connection`` subclasses this with the methods that are not per message.


cdef class Connection:
    cdef public object broker
    cdef public object transport
    cdef public object parser
    cdef public int state              # NEW / CONNECTED / CLOSING
    cdef public list out               # bytes queued for this turn's single write
    cdef public bint dirty             # in the broker's dirty list this turn
    cdef public object session
    cdef public object client_id
    cdef public object username
    cdef public int version            # 3, 4 (3.1.1) or 5
    cdef public int keepalive
    cdef public object peer
    cdef public long long rx_bytes     # bytes received, for keepalive sweeps
    cdef public long long rx_seen
    cdef public double rx_seen_at
    cdef public double accepted_at
    cdef public object will
    cdef public bint graceful          # DISCONNECT 0x00 received: discard the will
    cdef public long client_receive_max
    cdef public long long client_max_packet
    cdef public long client_alias_max
    cdef public object alias_in
    cdef public dict alias_out
    cdef public long next_alias_out
    cdef public long qos1_in_pending   # QoS 1 PUBLISHes whose PUBACK waits for the store
    cdef public bint problem_info
    cdef public bint paused
    cdef public bint clean_start
    cdef public bint online            # CONNACK written: messages may be delivered
    cdef public bytes raw_head
    cdef public object acl_topic
    cdef public object acl_receive

    cdef int _write(self, object data) except -1
