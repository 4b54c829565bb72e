"""The N worker processes of one node acting as one broker.

Each worker runs a whole ``Broker`` (raftmq.broker) on its own uvloop and binds
every listener with SO_REUSEPORT, so the kernel spreads new TCP connections
over the workers.  Three things make them one broker:

- ``ownership``: every client id belongs to exactly one worker (a stable hash
  of the id).  A worker that accepts a connection whose CONNECT names a client
  id owned by a sibling hands the socket over (``handoff``) before doing
  anything else with it, so a client's session -- connected or offline, with
  its queue, in-flight messages, will and takeover -- only ever lives in one
  process.  No session directory, no session migration, no race between two
  workers resuming the same session.
- ``mesh``: a unix-socket link between every pair of workers carries the
  messages a worker's clients publish to the siblings that hold a matching
  subscription (each sibling once, in order), the subscription interest that
  lets a worker know which siblings need what, shared-subscription member
  choice, and the counters for node-wide ``$SYS`` totals.
- acknowledgements: a PUBACK / PUBREC / SUBACK leaves a worker only once the
  siblings have processed (and committed) what was forwarded before it, so
  nothing acknowledged depends on a message still in transit between workers.
"""
