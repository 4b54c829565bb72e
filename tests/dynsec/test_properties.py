"""Properties over random command sequences (hypothesis): the replicated document
path (apply_change on the JSON document, as the state machine does) and the
in-memory path (a worker's DynsecState) never diverge, and a document always
survives load -> dump unchanged."""

from __future__ import annotations

import json

from helpers import example_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftmq.dynsec.commands import apply, apply_change, prepare_request
from raftmq.dynsec.jsontext import dumps
from raftmq.dynsec.model import ACL_TYPES, DynsecState

NAMES = st.sampled_from(["alice", "bob", "carol", "dave", "anon", "devices", "reader", "sensor-writer", "x", ""])
TOPICS = st.sampled_from(["a/#", "a/+", "sensors/secret", "#", "a/#/b", "$SYS/#"])
PRIO = st.one_of(st.none(), st.integers(-3, 3))


def _cmd(name: str, **fields) -> dict:
    return {"command": name, **{k: v for k, v in fields.items() if v is not None}}


COMMAND = st.one_of(
    st.builds(lambda u, p: _cmd("createClient", username=u, password=p), NAMES, st.one_of(st.none(), st.text(max_size=5))),
    st.builds(lambda u: _cmd("deleteClient", username=u), NAMES),
    st.builds(lambda g: _cmd("createGroup", groupname=g), NAMES),
    st.builds(lambda g: _cmd("deleteGroup", groupname=g), NAMES),
    st.builds(lambda r: _cmd("createRole", rolename=r), NAMES),
    st.builds(lambda r: _cmd("deleteRole", rolename=r), NAMES),
    st.builds(lambda u, r, p: _cmd("addClientRole", username=u, rolename=r, priority=p), NAMES, NAMES, PRIO),
    st.builds(lambda u, r: _cmd("removeClientRole", username=u, rolename=r), NAMES, NAMES),
    st.builds(lambda g, u, p: _cmd("addGroupClient", groupname=g, username=u, priority=p), NAMES, NAMES, PRIO),
    st.builds(lambda g, u: _cmd("removeGroupClient", groupname=g, username=u), NAMES, NAMES),
    st.builds(lambda g, r, p: _cmd("addGroupRole", groupname=g, rolename=r, priority=p), NAMES, NAMES, PRIO),
    st.builds(lambda r, t, f, a, p: _cmd("addRoleACL", rolename=r, acltype=t, topic=f, allow=a, priority=p),
              NAMES, st.sampled_from(ACL_TYPES), TOPICS, st.booleans(), PRIO),
    st.builds(lambda r, t, f: _cmd("removeRoleACL", rolename=r, acltype=t, topic=f),
              NAMES, st.sampled_from(ACL_TYPES), TOPICS),
    st.builds(lambda g: _cmd("setAnonymousGroup", groupname=g), NAMES),
    st.builds(lambda u, c: _cmd("setClientId", username=u, clientid=c), NAMES, st.sampled_from(["", "c1"])),
    st.builds(lambda u: _cmd("disableClient", username=u), NAMES),
    st.builds(lambda g, us: _cmd("modifyGroup", groupname=g, clients=[{"username": u} for u in us]),
              NAMES, st.lists(NAMES, max_size=3)),
    st.builds(lambda u, gs: _cmd("modifyClient", username=u, groups=[{"groupname": g} for g in gs]),
              NAMES, st.lists(NAMES, max_size=3)),
    st.builds(lambda r, fs: _cmd("modifyRole", rolename=r, acls=[
        {"acltype": "publishClientSend", "topic": f, "allow": True} for f in fs]), NAMES, st.lists(TOPICS, max_size=3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(COMMAND, min_size=1, max_size=4), min_size=1, max_size=6))
def test_document_path_and_memory_path_agree(requests: list[list[dict]]) -> None:
    worker = example_state()
    document = worker.to_document()
    for commands in requests:
        change = prepare_request(json.dumps({"commands": commands}).encode()).change
        change = json.loads(dumps(change))  # through the log as JSON
        document = apply_change(document, change)
        apply(worker, change)
        assert worker.to_document() == document
        assert DynsecState.from_document(document).to_document() == document
        # links stay consistent on both sides
        for group in worker.groups.values():
            for username, priority in group.clients.items():
                assert worker.clients[username].groups[group.name] == priority
        for client in worker.clients.values():
            assert all(r in worker.roles for r in client.roles)
            assert all(client.username in worker.groups[g].clients for g in client.groups)
        assert worker.anonymous_group is None or worker.anonymous_group in worker.groups
