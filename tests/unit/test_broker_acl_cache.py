"""The broker's cache of publish ACL decisions (server.py acl_publish_decision /
acl_receive_decisions, router._receive_allowed): used while the hook's
``acl_generation`` is unchanged, forgotten for the very next message once it
changes; never used for a hook without a generation."""

from __future__ import annotations

from broker_harness import RawClient, run_with_broker
from raftmq._codec import Puback, Publish, Suback, Subscribe

from raftmq.dynsec.model import DynsecState
from raftmq.dynsec.plugin import DynsecPlugin

SEND, RECEIVE = "publish_client_send", "publish_client_receive"


class _PolicyHook:
    """Allows what ``denied`` does not name; counts the publish checks."""

    def __init__(self) -> None:
        self.denied: set[tuple[str, str]] = set()  # (access, client id)
        self.calls: list[tuple[str, str, str]] = []
        self.generation = 0

    def authenticate(self, client_id, username, password) -> int:
        return 0

    def acl_check(self, client, access, topic, qos, retain) -> bool:
        if access in (SEND, RECEIVE):
            self.calls.append((client.client_id, access, topic))
        return (access, client.client_id) not in self.denied


class _GenerationHook(_PolicyHook):
    """The same, promising (like dynsec) that decisions change only with the generation."""

    @property
    def acl_generation(self) -> int:
        return self.generation


async def _pair(port):
    s = RawClient(5)
    await s.connect(port, "s")
    s.send(Subscribe(1, [("t/#", 0, False, False, 0)], None))
    await s.recv_type(Suback)
    p = RawClient(5)
    await p.connect(port, "p")
    return s, p


def test_decisions_cached_until_the_generation_changes():
    async def scenario(broker, port):
        hook = _GenerationHook()
        broker.auth = hook
        s, p = await _pair(port)
        for i in range(3):
            p.send(Publish("t/a", b"%d" % i, 0, False, False, 0, None))
            assert (await s.recv_type(Publish)).payload == b"%d" % i
        # Asked once per (connection, topic), not per message.
        assert hook.calls.count(("p", SEND, "t/a")) == 1
        assert hook.calls.count(("s", RECEIVE, "t/a")) == 1

        # A change of policy that comes with a new generation: in force at once.
        hook.denied.add((RECEIVE, "s"))
        hook.generation += 1
        p.send(Publish("t/a", b"denied", 0, False, False, 0, None))
        await s.no_packet()
        hook.denied.add((SEND, "p"))
        hook.generation += 1
        p.send(Publish("t/a", b"x", 1, False, False, 7, None))
        assert (await p.recv_type(Puback)).reason_code == 0x87

        hook.denied.clear()
        hook.generation += 1
        p.send(Publish("t/a", b"again", 0, False, False, 0, None))
        assert (await s.recv_type(Publish)).payload == b"again"

    run_with_broker(scenario)


def test_hook_without_generation_is_asked_every_time():
    async def scenario(broker, port):
        hook = _PolicyHook()
        broker.auth = hook
        s, p = await _pair(port)
        for i in range(2):
            p.send(Publish("t/a", b"%d" % i, 0, False, False, 0, None))
            assert (await s.recv_type(Publish)).payload == b"%d" % i
        assert hook.calls.count(("p", SEND, "t/a")) == 2
        assert hook.calls.count(("s", RECEIVE, "t/a")) == 2
        hook.denied.add((RECEIVE, "s"))  # no generation to bump: must still apply
        p.send(Publish("t/a", b"denied", 0, False, False, 0, None))
        await s.no_packet()

    run_with_broker(scenario)


DOCUMENT = {
    "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                         "subscribe": False, "unsubscribe": False},
    "clients": [],
    "groups": [{"groupname": "anon", "roles": [{"rolename": "r"}], "clients": []}],
    "anonymousGroup": "anon",
    "roles": [{"rolename": "r", "acls": [
        {"acltype": t, "topic": "t/#", "allow": True}
        for t in ("publishClientSend", "publishClientReceive", "subscribePattern")
    ]}],
}


def test_dynsec_acl_change_applies_to_the_next_message_on_warm_caches():
    async def scenario(broker, port):
        plugin = DynsecPlugin(broker, DynsecState.from_document(DOCUMENT), allow_anonymous=True)
        broker.auth = plugin
        s, p = await _pair(port)
        for i in range(2):  # warm both caches
            p.send(Publish("t/a", b"%d" % i, 0, False, False, 0, None))
            assert (await s.recv_type(Publish)).payload == b"%d" % i
        # Applied without the kicks a $CONTROL request would also do: the
        # connections stay, so only the ACL decides.
        plugin.apply({"commands": [{"command": "removeRoleACL", "rolename": "r",
                                    "acltype": "publishClientReceive", "topic": "t/#"}]})
        p.send(Publish("t/a", b"denied", 0, False, False, 0, None))
        await s.no_packet()
        plugin.apply({"commands": [{"command": "removeRoleACL", "rolename": "r",
                                    "acltype": "publishClientSend", "topic": "t/#"}]})
        p.send(Publish("t/a", b"x", 1, False, False, 3, None))
        assert (await p.recv_type(Puback)).reason_code == 0x87

    run_with_broker(scenario)


def test_qos1_receive_decisions_follow_the_generation():
    async def scenario(broker, port):
        hook = _GenerationHook()
        broker.auth = hook
        s = RawClient(5)
        await s.connect(port, "s")
        s.send(Subscribe(1, [("t/#", 1, False, False, 0)], None))
        await s.recv_type(Suback)
        p = RawClient(5)
        await p.connect(port, "p")
        for pid in (1, 2):
            p.send(Publish("t/q", b"%d" % pid, 1, False, False, pid, None))
            await p.recv_type(Puback)
            got = await s.recv_type(Publish)
            assert got.payload == b"%d" % pid
            s.send(Puback(got.packet_id, 0, None))
        assert hook.calls.count(("s", RECEIVE, "t/q")) == 1
        hook.denied.add((RECEIVE, "s"))
        hook.generation += 1
        p.send(Publish("t/q", b"denied", 1, False, False, 3, None))
        await p.recv_type(Puback)
        await s.no_packet()

    run_with_broker(scenario)
