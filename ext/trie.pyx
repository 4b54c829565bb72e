# cython: language_level=3
"""Topic tries: subscriptions (TopicTrie) and retained messages (RetainedTrie).

Topic names and filters are split on '/' into levels (MQTT 5.0 §4.7.1); an
empty level is a real level ("a//b" has three). A subscription lives on the
node reached by walking its filter's levels, with '+' and '#' stored as
ordinary child names. ``TopicTrie.match(topic)`` walks the topic's levels once,
following at each node the exact child, the '+' child, and collecting the '#'
child ('#' also matches its parent level, "sport/#" matches "sport"
[MQTT-4.7.1-2]). Topics starting with '$' are not matched by filters whose
first level is a wildcard [MQTT-4.7.2-1].

Shared subscriptions ``$share/<name>/<filter>`` (§4.8.2) live on the node of
``<filter>`` in a per-name group; ``match`` returns each matching group with
all its members and the broker picks one.

Retained messages (§3.3.1.3) are kept in a second trie keyed by topic name;
``RetainedTrie.match_filter(filter)`` walks the filter over it when a
subscription is made.

The syntax checks of §4.7 (``valid_topic_name``, ``valid_topic_filter``) are
here too, because the broker runs them where it uses the tries.
"""

SHARE_PREFIX = "$share/"


# --------------------------------------------------------------------------
# Syntax (MQTT 5.0 §4.7, §4.8.2)

cdef bint _valid_levels(str s, bint allow_wildcards):
    cdef Py_ssize_t n = len(s)
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    if n == 0:
        return False          # [MQTT-4.7.3-1] at least one character
    if "\x00" in s:
        return False          # [MQTT-4.7.3-2]
    if n > 16383 and len(s.encode("utf-8", "surrogatepass")) > 65535:
        return False          # [MQTT-4.7.3-3] (at most 4 bytes per character)
    for i in range(n):
        c = s[i]
        if c == u'+' or c == u'#':
            if not allow_wildcards:
                return False  # [MQTT-4.7.0-1] no wildcards in topic names
            # A wildcard occupies a whole level [MQTT-4.7.1-2], [MQTT-4.7.1-3] ...
            if i > 0 and s[i - 1] != u'/':
                return False
            if i + 1 < n and s[i + 1] != u'/':
                return False
            # ... and '#' is the last character [MQTT-4.7.1-2].
            if c == u'#' and i != n - 1:
                return False
    return True


def valid_topic_name(s: str) -> bool:
    """A PUBLISH topic name: non-empty, no wildcard, no U+0000 (§4.7)."""
    if not isinstance(s, str):
        return False
    return _valid_levels(s, False)


def parse_shared(topic_filter: str) -> tuple:
    """``"$share/g/a/b"`` -> ``("g", "a/b")``; any other filter -> ``(None, filter)``."""
    cdef Py_ssize_t slash
    if topic_filter.startswith(SHARE_PREFIX):
        slash = topic_filter.find("/", 7)
        if slash > 0:
            return topic_filter[7:slash], topic_filter[slash + 1:]
    return None, topic_filter


def valid_topic_filter(s: str) -> bool:
    """A SUBSCRIBE topic filter (§4.7.1), shared form ``$share/<name>/<filter>``
    included: the name is non-empty without '+', '#' or '/' [MQTT-4.8.2-1,2]
    and the filter after it is a valid non-empty filter."""
    if not isinstance(s, str):
        return False
    if s.startswith(SHARE_PREFIX):
        group, filt = parse_shared(s)
        if group is None or not group or "+" in group or "#" in group:
            return False
        return _valid_levels(filt, True)
    return _valid_levels(s, True)


# --------------------------------------------------------------------------
# Subscriptions

cdef class _SubNode:
    cdef dict children        # level -> _SubNode
    cdef str filter           # the topic filter this node stands for, e.g. "a/+/c"
    cdef dict subs            # key -> value: non-shared subscriptions on this filter
    cdef dict shared          # share name -> {key: value}
    cdef list _entries        # cached [(key, value, filter)] of subs; None when stale
    cdef str level            # the last level of filter: this node's key in its parent

    def __cinit__(self):
        self.children = {}
        self.subs = {}
        self.shared = {}
        self._entries = None

    cdef list entries(self):
        # Cached so that fan-out to many subscribers of one filter is one list.extend().
        if self._entries is None:
            f = self.filter
            self._entries = [(k, v, f) for k, v in self.subs.items()]
        return self._entries

    cdef bint empty(self):
        return not self.children and not self.subs and not self.shared


cdef inline int _collect(_SubNode node, list normal, list shared) except -1:
    if node.subs:
        normal.extend(node.entries())
    if node.shared:
        for name, members in node.shared.items():
            shared.append((name, node.filter, list((<dict>members).items())))
    return 0


cdef int _match(_SubNode node, list levels, Py_ssize_t i, Py_ssize_t n,
                list normal, list shared, int depth) except -1:
    """Collect every subscription matching levels[i:] below ``node``.

    The exact path is walked in a loop; a '+' branch met on the way is a
    recursive call while few are nested (fast, no allocation) and goes on an
    explicit stack beyond that, so a topic of thousands of levels against a
    filter of thousands of '+' cannot overflow the C stack."""
    cdef _SubNode child
    cdef dict children
    cdef list pending = None
    while True:
        children = node.children
        if not children:
            if i == n:
                _collect(node, normal, shared)
        else:
            child = children.get("#")
            if child is not None:
                _collect(child, normal, shared)     # '#' matches this level and all below
            if i == n:
                _collect(node, normal, shared)
            else:
                child = children.get("+")
                if child is not None:
                    if depth < 32:
                        _match(child, levels, i + 1, n, normal, shared, depth + 1)
                    else:
                        if pending is None:
                            pending = []
                        pending.append((child, i + 1))
                child = children.get(levels[i])
                if child is not None:
                    node = child
                    i += 1
                    continue
        if not pending:
            return 0
        node, i = pending.pop()


cdef class TopicTrie:
    """Subscriptions by topic filter: subscribe / unsubscribe / match (see module doc)."""
    cdef _SubNode root
    cdef Py_ssize_t _count     # subscriptions, shared memberships included

    def __cinit__(self):
        self.root = _SubNode()
        self.root.filter = ""
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def count(self) -> int:
        """Number of subscriptions (shared group memberships included), as len()."""
        return self._count

    def remove_key(self, key) -> int:
        """Remove every subscription of ``key``, shared ones included; return how many.

        Walks the whole trie: meant for rare clean-ups, not the per-message path."""
        cdef list found = [f for f, k, _v in self.items() if k == key]
        for topic_filter in found:
            self.unsubscribe(topic_filter, key)
        return len(found)

    cdef list _path(self, str topic_filter):
        """[root, ..., node of topic_filter], or None when no such node exists.

        Nodes keep no parent pointer (which would make every node a reference
        cycle for the garbage collector); removal walks this path instead."""
        cdef _SubNode node = self.root
        cdef list path = [node]
        for level in topic_filter.split("/"):
            node = node.children.get(level)
            if node is None:
                return None
            path.append(node)
        return path

    cdef _SubNode _find(self, str topic_filter):
        cdef _SubNode node = self.root
        for level in topic_filter.split("/"):
            node = node.children.get(level)
            if node is None:
                return None
        return node

    def subscribe(self, str topic_filter, key, value) -> bool:
        """Add or replace ``key``'s subscription on ``topic_filter``; True if it is new.

        ``$share/<name>/<filter>`` adds ``key`` to the group ``name`` on ``filter``."""
        cdef _SubNode node = self.root
        cdef _SubNode child
        cdef dict group
        name, filt = parse_shared(topic_filter)
        for level in (<str>filt).split("/"):
            child = node.children.get(level)
            if child is None:
                child = _SubNode()
                child.level = level
                child.filter = level if node is self.root else node.filter + "/" + level
                node.children[level] = child
            node = child
        if name is None:
            new = key not in node.subs
            node.subs[key] = value
            node._entries = None
        else:
            group = node.shared.get(name)
            if group is None:
                group = node.shared[name] = {}
            new = key not in group
            group[key] = value
        if new:
            self._count += 1
        return new

    def unsubscribe(self, str topic_filter, key) -> bool:
        """Remove ``key``'s subscription on ``topic_filter``; True if it existed."""
        cdef _SubNode node
        cdef dict group
        cdef list path
        name, filt = parse_shared(topic_filter)
        path = self._path(filt)
        if path is None:
            return False
        node = path[len(path) - 1]
        if name is None:
            if key not in node.subs:
                return False
            del node.subs[key]
            node._entries = None
        else:
            group = node.shared.get(name)
            if group is None or key not in group:
                return False
            del group[key]
            if not group:
                del node.shared[name]
        self._count -= 1
        # Drop the nodes left empty, from the leaf up.
        while len(path) > 1 and (<_SubNode>path[len(path) - 1]).empty():
            node = path.pop()
            del (<_SubNode>path[len(path) - 1]).children[node.level]
        return True

    def get(self, str topic_filter, key, default=None):
        """The value ``key`` subscribed with on ``topic_filter`` (shared form allowed)."""
        name, filt = parse_shared(topic_filter)
        node = self._find(filt)
        if node is None:
            return default
        if name is None:
            return (<_SubNode>node).subs.get(key, default)
        group = (<_SubNode>node).shared.get(name)
        return default if group is None else group.get(key, default)

    def match(self, str topic) -> tuple:
        """``(normal, shared)`` subscriptions matching the topic name ``topic``.

        normal: [(key, value, topic_filter)], one per matching filter of a key.
        shared: [(share_name, topic_filter, [(key, value), ...])]."""
        cdef list normal = []
        cdef list shared = []
        cdef list levels = topic.split("/")
        cdef Py_ssize_t n = len(levels)
        cdef _SubNode root = self.root
        cdef _SubNode child
        if topic.startswith("$"):
            # [MQTT-4.7.2-1]: no '+' or '#' at the first level for '$' topics.
            child = root.children.get(levels[0])
            if child is not None:
                _match(child, levels, 1, n, normal, shared, 0)
        else:
            _match(root, levels, 0, n, normal, shared, 0)
        return normal, shared

    def items(self):
        """Every subscription as (topic_filter, key, value); shared filters in $share form."""
        cdef list out = []
        cdef list stack = [self.root]
        cdef _SubNode node
        while stack:
            node = stack.pop()
            for k, v in node.subs.items():
                out.append((node.filter, k, v))
            for name, members in node.shared.items():
                for k, v in members.items():
                    out.append((f"{SHARE_PREFIX}{name}/{node.filter}", k, v))
            stack.extend(node.children.values())
        return out


# --------------------------------------------------------------------------
# Retained messages

cdef class _RetNode:
    cdef dict children        # level -> _RetNode
    cdef str level            # this node's key in its parent's children
    cdef str topic            # set when this node holds a retained message
    cdef object value
    cdef bint has_value

    def __cinit__(self):
        self.children = {}
        self.has_value = False


cdef int _ret_all(_RetNode node, list out, bint skip_dollar) except -1:
    """Every retained message at or below ``node`` ('#' semantics)."""
    cdef list stack = [node]
    cdef _RetNode nd
    while stack:
        nd = stack.pop()
        if nd.has_value:
            out.append((nd.topic, nd.value))
        for level, child in nd.children.items():
            if skip_dollar and nd is node and (<str>level).startswith("$"):
                continue
            stack.append(child)
    return 0


cdef int _ret_match(_RetNode root, list levels, Py_ssize_t n, list out) except -1:
    """Collect every retained message whose topic the filter ``levels`` matches.

    Work items (node, level index) sit on an explicit stack: '+' pushes every
    child, so no recursion depth grows with the filter."""
    cdef list stack = [(root, 0)]
    cdef _RetNode node
    cdef _RetNode child
    cdef Py_ssize_t i
    cdef str level
    while stack:
        node, i = stack.pop()
        if i == n:
            if node.has_value:
                out.append((node.topic, node.value))
            continue
        level = levels[i]
        if level == "#":
            _ret_all(node, out, node is root)       # [MQTT-4.7.2-1] at the root
        elif level == "+":
            for name, child in node.children.items():
                if node is root and (<str>name).startswith("$"):
                    continue                        # [MQTT-4.7.2-1]
                stack.append((child, i + 1))
        else:
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))
    return 0


cdef class RetainedTrie:
    """Retained messages by topic: set / delete / get / match_filter."""
    cdef _RetNode root
    cdef dict by_topic        # topic -> value, for get() and len()

    def __cinit__(self):
        self.root = _RetNode()
        self.by_topic = {}

    def __len__(self) -> int:
        return len(self.by_topic)

    def __contains__(self, topic) -> bool:
        return topic in self.by_topic

    def set(self, str topic, value) -> None:
        cdef _RetNode node = self.root
        cdef _RetNode child
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = _RetNode()
                child.level = level
                node.children[level] = child
            node = child
        node.topic = topic
        node.value = value
        node.has_value = True
        self.by_topic[topic] = value

    def get(self, str topic, default=None):
        return self.by_topic.get(topic, default)

    def delete(self, str topic) -> bool:
        """Forget the retained message of ``topic``; True if there was one."""
        cdef _RetNode node = self.root
        cdef list path = [node]
        if topic not in self.by_topic:
            return False
        del self.by_topic[topic]
        for level in topic.split("/"):
            node = node.children[level]
            path.append(node)
        node.has_value = False
        node.value = None
        node.topic = None
        # Drop the nodes left empty, from the leaf up (no parent pointers: no cycles).
        while len(path) > 1:
            node = path[len(path) - 1]
            if node.has_value or node.children:
                break
            path.pop()
            del (<_RetNode>path[len(path) - 1]).children[node.level]
        return True

    def match_filter(self, str topic_filter) -> list:
        """[(topic, value)] of every retained message the filter matches."""
        cdef list out = []
        cdef list levels = topic_filter.split("/")
        _ret_match(self.root, levels, len(levels), out)
        return out

    def items(self):
        return list(self.by_topic.items())
