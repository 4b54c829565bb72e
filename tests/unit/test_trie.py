"""raftmq._trie: topic matching rules (MQTT 5.0 §4.7, §4.8.2), shared groups,
retained messages, and a naive reference matcher on generated filters/topics."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftmq._trie import (
    RetainedTrie,
    TopicTrie,
    parse_shared,
    valid_topic_filter,
    valid_topic_name,
)


def matches(topic_filter: str, topic: str) -> bool:
    """Reference: does ``topic_filter`` match ``topic``? Written straight from §4.7."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True  # covers the parent level too ("sport/#" matches "sport")
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def filters_of(trie: TopicTrie, topic: str) -> list[str]:
    normal, _shared = trie.match(topic)
    return sorted(f for _k, _v, f in normal)


# ---------------------------------------------------------------------------
# Spec examples, MQTT 5.0 §4.7.1.2 and §4.7.1.3

SPEC_CASES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("+/tennis/#", "sport/tennis", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a//b", False),
    ("a/b", "a/b/", False),
    ("a/b/", "a/b/", True),
    ("A", "a", False),  # case sensitive
    ("sport tennis", "sport tennis", True),
    # [MQTT-4.7.2-1] '$' topics and wildcards at the first level
    ("#", "$SYS/broker/uptime", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("+", "$SYS", False),
    ("a/#", "a/$x", True),  # only the first level is special
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_CASES)
def test_spec_examples(topic_filter, topic, expected):
    assert matches(topic_filter, topic) is expected  # the reference agrees with the spec
    trie = TopicTrie()
    trie.subscribe(topic_filter, "client", {"qos": 1})
    normal, shared = trie.match(topic)
    assert shared == []
    if expected:
        assert normal == [("client", {"qos": 1}, topic_filter)]
    else:
        assert normal == []


def test_overlapping_filters_give_one_entry_each():
    trie = TopicTrie()
    for f in ("a/b", "a/+", "a/#", "#", "+/b", "x/y"):
        trie.subscribe(f, "k", f.upper())
    normal, _ = trie.match("a/b")
    assert sorted(normal) == sorted([("k", f.upper(), f) for f in ("a/b", "a/+", "a/#", "#",
                                                                    "+/b")])


def test_subscribe_replaces_and_counts():
    trie = TopicTrie()
    assert len(trie) == 0
    assert trie.subscribe("a/b", "k1", 0) is True
    assert trie.subscribe("a/b", "k1", 1) is False  # replaced
    assert trie.subscribe("a/b", "k2", 2) is True
    assert len(trie) == 2
    assert sorted(trie.match("a/b")[0]) == [("k1", 1, "a/b"), ("k2", 2, "a/b")]
    assert trie.get("a/b", "k1") == 1
    assert trie.get("a/c", "k1", "none") == "none"


def test_unsubscribe():
    trie = TopicTrie()
    trie.subscribe("a/+", "k1", 0)
    trie.subscribe("a/+", "k2", 0)
    trie.subscribe("a/+/c", "k1", 0)
    assert trie.unsubscribe("a/+", "k1") is True
    assert trie.unsubscribe("a/+", "k1") is False
    assert trie.unsubscribe("a/#", "k1") is False
    assert trie.unsubscribe("nowhere/at/all", "k1") is False
    assert trie.match("a/x")[0] == [("k2", 0, "a/+")]
    assert trie.match("a/x/c")[0] == [("k1", 0, "a/+/c")]
    assert len(trie) == 2
    trie.unsubscribe("a/+", "k2")
    trie.unsubscribe("a/+/c", "k1")
    assert len(trie) == 0
    assert trie.match("a/x") == ([], [])
    assert trie.items() == []


def test_match_result_is_a_fresh_list():
    trie = TopicTrie()
    trie.subscribe("a", "k", 0)
    normal, _ = trie.match("a")
    normal.clear()
    assert trie.match("a")[0] == [("k", 0, "a")]


def test_shared_subscriptions():
    trie = TopicTrie()
    assert trie.subscribe("$share/g1/a/+", "k1", 1) is True
    assert trie.subscribe("$share/g1/a/+", "k2", 2) is True
    assert trie.subscribe("$share/g2/a/#", "k1", 3) is True
    # The same key may also hold a normal subscription on the same filter.
    assert trie.subscribe("a/+", "k1", 4) is True
    assert len(trie) == 4
    normal, shared = trie.match("a/b")
    assert normal == [("k1", 4, "a/+")]
    assert sorted((g, f, sorted(m)) for g, f, m in shared) == [
        ("g1", "a/+", [("k1", 1), ("k2", 2)]),
        ("g2", "a/#", [("k1", 3)]),
    ]
    assert trie.get("$share/g1/a/+", "k2") == 2
    assert trie.unsubscribe("$share/g1/a/+", "k1") is True
    assert trie.unsubscribe("$share/g1/a/+", "k1") is False
    assert trie.unsubscribe("$share/zz/a/+", "k2") is False
    _, shared = trie.match("a/b")
    assert sorted((g, f, m) for g, f, m in shared) == [("g1", "a/+", [("k2", 2)]),
                                                        ("g2", "a/#", [("k1", 3)])]
    assert sorted(trie.items()) == sorted([("a/+", "k1", 4), ("$share/g1/a/+", "k2", 2),
                                           ("$share/g2/a/#", "k1", 3)])


def test_shared_dollar_rule():
    trie = TopicTrie()
    trie.subscribe("$share/g/#", "k", 0)
    trie.subscribe("$share/g/$SYS/#", "k", 0)
    _, shared = trie.match("$SYS/x")
    assert [(g, f) for g, f, _m in shared] == [("g", "$SYS/#")]


@pytest.mark.parametrize(("name", "ok"), [
    ("a/b", True), ("/", True), ("a//b", True), ("$SYS/x", True), (" ", True), ("ü/€", True),
    ("", False), ("a/+", False), ("#", False), ("a/b#", False), ("a\x00b", False),
    ("x" * 65535, True), ("x" * 65536, False), ("é" * 32768, False),
])
def test_valid_topic_name(name, ok):
    assert valid_topic_name(name) is ok


@pytest.mark.parametrize(("topic_filter", "ok"), [
    ("#", True), ("+", True), ("a/#", True), ("+/+", True), ("/+", True), ("a/+/b", True),
    ("sport/tennis/#", True), ("a//b", True), ("$SYS/#", True),
    ("", False), ("a#", False), ("a/#/b", False), ("sport/tennis#", False), ("sport+", False),
    ("a/b+/c", False), ("+a", False), ("##", False), ("a\x00", False),
    ("$share/g/a/b", True), ("$share/g/#", True), ("$share/g//", True),
    ("$share/g", False), ("$share/g/", False), ("$share//a", False), ("$share/g+/a", False),
    ("$share/g#/a", False), ("$share/g/a#", False), ("$sharex/g/a", True),
    ("$share", True),  # not shared (no "$share/" prefix): a plain one-level filter
])
def test_valid_topic_filter(topic_filter, ok):
    assert valid_topic_filter(topic_filter) is ok


def test_parse_shared():
    assert parse_shared("$share/grp/a/b/#") == ("grp", "a/b/#")
    assert parse_shared("a/b") == (None, "a/b")
    assert parse_shared("$SYS/a") == (None, "$SYS/a")
    assert parse_shared("$share/only") == (None, "$share/only")


# ---------------------------------------------------------------------------
# Retained messages


def test_retained_set_get_delete():
    r = RetainedTrie()
    r.set("a/b", 1)
    r.set("a/b", 2)  # replaced
    r.set("a", 3)
    assert len(r) == 2
    assert r.get("a/b") == 2
    assert r.get("a/c") is None
    assert "a" in r
    assert r.delete("a/b") is True
    assert r.delete("a/b") is False
    assert r.delete("never") is False
    assert r.match_filter("#") == [("a", 3)]
    assert r.delete("a") is True
    assert len(r) == 0
    assert r.match_filter("#") == []


RETAINED = ["a", "a/b", "a/b/c", "a//c", "b/x", "$SYS/uptime", "$SYS/load/1", "/lead", "a/$x"]


@pytest.mark.parametrize("topic_filter", [
    "#", "+", "a/#", "a/+", "+/+", "+/b/#", "a/+/c", "$SYS/#", "$SYS/+", "+/uptime", "/+",
    "a/b", "nothing", "a/b/c/#", "+/#", "a//c", "$SYS",
])
def test_retained_match_filter(topic_filter):
    r = RetainedTrie()
    for i, t in enumerate(RETAINED):
        r.set(t, i)
    got = sorted(r.match_filter(topic_filter))
    assert got == sorted((t, i) for i, t in enumerate(RETAINED) if matches(topic_filter, t))


# ---------------------------------------------------------------------------
# Generated filters and topics against the reference

LEVELS = st.sampled_from(["a", "b", "", "$x", "sport", "c d"])
TOPICS = st.lists(st.sampled_from(["a", "b", "", "sport", "c d"]), min_size=1, max_size=4).map(
    "/".join) | st.lists(LEVELS, min_size=1, max_size=4).map(lambda ls: "$SYS/" + "/".join(ls))


@st.composite
def filters(draw):
    levels = draw(st.lists(LEVELS | st.just("+") | st.just("$SYS"), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter or "+"  # "" is not a filter [MQTT-4.7.3-1]


@settings(max_examples=150, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=12), st.lists(TOPICS, min_size=1, max_size=8))
def test_trie_matches_reference(filter_list, topics):
    trie = TopicTrie()
    for i, f in enumerate(filter_list):
        assert valid_topic_filter(f)
        trie.subscribe(f, i % 3, i)
    expected_subs = {}
    for i, f in enumerate(filter_list):
        expected_subs[(f, i % 3)] = i  # later subscribe replaces the value
    for topic in topics:
        normal, shared = trie.match(topic)
        assert shared == []
        expected = sorted((k, v, f) for (f, k), v in expected_subs.items() if matches(f, topic))
        assert sorted(normal) == expected
    assert len(trie) == len(expected_subs)


@settings(max_examples=150, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=12), st.data())
def test_trie_unsubscribe_matches_reference(filter_list, data):
    trie = TopicTrie()
    live = {}
    for i, f in enumerate(filter_list):
        trie.subscribe(f, i % 2, i)
        live[(f, i % 2)] = i
    for f, k in data.draw(st.lists(st.sampled_from(sorted(live)), max_size=len(live))):
        assert trie.unsubscribe(f, k) is ((f, k) in live)
        live.pop((f, k), None)
    assert len(trie) == len(live)
    for topic in ("a", "a/b", "", "/", "$SYS/a", "sport/a/b"):
        expected = sorted((k, v, f) for (f, k), v in live.items() if matches(f, topic))
        assert sorted(trie.match(topic)[0]) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(TOPICS, min_size=1, max_size=10), filters(), st.lists(TOPICS, max_size=4))
def test_retained_matches_reference(topics, topic_filter, deleted):
    r = RetainedTrie()
    for i, t in enumerate(topics):
        r.set(t, i)
    expected = {t: i for i, t in enumerate(topics)}
    for t in deleted:
        assert r.delete(t) is (t in expected)
        expected.pop(t, None)
    assert len(r) == len(expected)
    got = sorted(r.match_filter(topic_filter))
    assert got == sorted((t, v) for t, v in expected.items() if matches(topic_filter, t))


def test_deep_topics_do_not_exhaust_the_stack():
    # A client may subscribe to 30000 '+' levels and publish to 30000 levels:
    # matching must not recurse once per level.
    deep_filter = "/".join(["+"] * 30000)
    deep_topic = "/" * 29999
    trie = TopicTrie()
    trie.subscribe(deep_filter, "deep", 1)
    trie.subscribe("#", "all", 2)
    assert sorted(trie.match(deep_topic)[0]) == [("all", 2, "#"), ("deep", 1, deep_filter)]
    retained = RetainedTrie()
    retained.set(deep_topic, "v")
    assert retained.match_filter(deep_filter) == [(deep_topic, "v")]
    assert retained.match_filter("#") == [(deep_topic, "v")]
    assert retained.delete(deep_topic) is True


def test_remove_key():
    trie = TopicTrie()
    trie.subscribe("a/+", "gone", 1)
    trie.subscribe("a/#", "gone", 2)
    trie.subscribe("$share/g/a/b", "gone", 3)
    trie.subscribe("a/+", "stays", 4)
    assert trie.remove_key("gone") == 3
    assert trie.remove_key("gone") == 0
    assert len(trie) == trie.count() == 1
    assert trie.match("a/b") == ([("stays", 4, "a/+")], [])
