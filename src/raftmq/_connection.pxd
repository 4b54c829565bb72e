# The per-connection object of the protocol core (ext/connection.pyx).
#
# Its state is a C struct: the compiled read path and QoS 0 fan-out read and
# write these fields directly, and ``cdef public`` keeps every one of them a
# plain attribute for the Python side (handlers, the session machinery, the
# worker hand-off's ``AdoptedConnection``, tests).  raftmq.broker.protocol's
# ``Connection`` subclasses this with the methods that are not per message.


from raftmq._codec cimport Parser


cdef class Stats:
    # Counters bumped on the hot path (raftmq.broker.sys_topics re-exports it).
    cdef public long long bytes_received
    cdef public long long bytes_sent
    cdef public long long messages_received
    cdef public long long messages_sent
    cdef public long long publish_received
    cdef public long long publish_sent
    cdef public long long publish_dropped
    cdef public long long connections
    cdef public long long clients_maximum
    cdef public long long clients_expired
    cdef public long long clients_moved  # moved here from a sibling (workers/colocate.py)


cdef class BrokerCore


cdef class RouterCore:
    # What route reads per message of raftmq.broker.router.Router.
    cdef public BrokerCore broker
    cdef public dict sessions          # client id -> Session (the broker's)
    cdef public object trie            # TopicTrie of the subscriptions
    cdef public dict _matches          # topic -> trie.match(topic), bounded


cdef class BrokerCore:
    # The broker's state that every read and every turn touches (server.py's
    # Broker subclasses it; each field stays a plain attribute there).
    cdef public object loop
    cdef public object config
    cdef public Stats stats
    cdef public RouterCore router
    cdef public object mesh            # sibling workers (raftmq.workers), or None
    cdef public object handoff
    cdef public bint debug             # debug logging on (checked per PUBLISH)
    cdef public bint acl_enabled
    cdef public object acl_generation_source
    cdef public object acl_cache_generation
    # Write gathering (end_read, _flush).
    cdef public list _dirty            # connections with bytes queued
    cdef public bint _flush_scheduled
    cdef public bint _per_turn         # flush once per loop turn (else at the end of each read)
    cdef public bint _in_read
    cdef public long _reads
    cdef public long _sample_reads
    cdef public long _sample_flushes
    # Store batching (server.py commit / flush_ops).
    cdef public list pending_ops
    cdef public list _pending_actions
    cdef public long outstanding_batches
    cdef public list _last_batch_actions
    # Sessions (broker.sessions is the router's dict) and connected clients (attach_session).
    cdef public dict sessions
    cdef public long connected_count
    # Read per connect and close.
    cdef public object connections     # set of Connection
    cdef public object wills           # raftmq.broker.will.Wills
    cdef public object ha_refusal
    cdef public object _auth
    cdef public bint _stopping


cdef class Connection:
    cdef public BrokerCore broker
    cdef public object transport
    cdef object _tx_write              # transport.write, bound once (called per flush)
    cdef public Parser parser
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
    # The user name a TLS client certificate gives (use_identity_as_username /
    # use_subject_as_username, broker/tls.py): None when not in use; "" when
    # the certificate has no usable name.
    cdef public object cert_identity

    cdef int _write(self, object data) except -1


cdef class Session:
    # What the broker remembers of one client id (raftmq.broker.session
    # re-exports it and documents the fields); a C struct so that creating
    # and ending a clean client's session, once per connect, stays cheap.
    cdef public object client_id
    cdef public object protocol_version
    cdef public object expiry_interval
    cdef public object username
    cdef public dict subscriptions
    cdef public dict inflight
    cdef public object queue
    cdef public object qos2_in
    cdef public object will
    cdef public object conn
    cdef public double expire_at
    cdef public long long next_seq
    cdef public long _next_pid
    cdef public bint durable
    cdef public long unwritten


cdef class Subscription:
    # One subscription of one session (raftmq.broker.session re-exports it and
    # documents the fields); a C struct so that the fan-out reads a
    # subscriber's options per delivery without attribute lookups.
    cdef public str topic_filter
    cdef public int qos
    cdef public bint no_local
    cdef public bint retain_as_published
    cdef public int retain_handling
    cdef public long sub_id
    cdef public object share_group
    cdef public str match_filter
    cdef public bint durable


# Called from C within the module (and from Python: handlers/connect.py, logsetup).
cpdef handle_connect(BrokerCore broker, Connection conn, p)
cpdef info_line(logger, str text)
