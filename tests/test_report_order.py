"""VPP reports are sorted once: Continuity.apply leaves a batch in the order the flow
table folds reports in, and the table then sorts nothing; the records stay the same."""

from __future__ import annotations

import numpy as np

from agent import flowtable
from agent.records import FLOW_DTYPE
from vpp_plugin.mediate import Continuity


def reports(rng: np.random.Generator, n: int, keys: int) -> np.ndarray:
    """n reports of `keys` flows, keys repeated, ends tied now and then."""
    b = np.zeros(n, FLOW_DTYPE)
    b["key"]["ip_version"] = 4
    b["key"]["proto"] = 6
    b["key"]["sport"] = rng.integers(0, keys, n)
    b["last_ms"] = 100_000 + rng.integers(0, 40, n) * 1000
    b["first_ms"] = 50_000
    b["packets"] = rng.integers(1, 5, n)
    b["octets"] = b["packets"] * 100
    b["tcp_flags"] = rng.choice([0x02, 0x10, 0x01], n)
    return b


def test_report_order_sorts_by_hash_key_end_and_keeps_ties_as_they_came():
    rng = np.random.default_rng(7)
    b = reports(rng, 400, 30)
    words = flowtable.key_words(b)
    h = (words[:, 0] ^ words[:, 1]) % np.uint64(4)  # 4 hash values: keys collide
    order = flowtable.report_order(h, words, b["last_ms"])
    assert sorted(order) == list(range(400))
    # distinct keys sharing a hash may come in either order, never interleaved
    key_of = [tuple(words[i]) for i in order]
    runs = [k for j, k in enumerate(key_of) if j == 0 or k != key_of[j - 1]]
    assert len(runs) == len(set(key_of))
    for k in set(key_of):  # each key's reports by end, ties in arrival order
        rows = [i for i in order if tuple(words[i]) == k]
        assert rows == sorted(rows, key=lambda i: (b["last_ms"][i], i))
    assert list(h[order]) == sorted(h)
    # colliding keys: never taken as already ordered; one key per hash: ordered
    assert not flowtable.in_report_order(h[order], words[order], b["last_ms"][order])
    one = flowtable.key_hash(words)
    o = flowtable.report_order(one, words, b["last_ms"])
    assert flowtable.in_report_order(one[o], words[o], b["last_ms"][o])
    assert not flowtable.in_report_order(one, words, b["last_ms"])  # as they came: no


def test_a_batch_from_continuity_folds_as_the_same_batch_shuffled():
    """The table skips its sort for apply's order (masked too, as pipeline._once does);
    the records are those of the same reports in any order."""
    rng = np.random.default_rng(3)
    memory = Continuity()
    fast = flowtable.FlowTable(active_timeout_s=20, idle_timeout_s=15)
    slow = flowtable.FlowTable(active_timeout_s=20, idle_timeout_s=15)
    out_fast, out_slow = [], []
    for poll in range(6):
        now = 100_000 + poll * 30_000
        b = reports(rng, 300, 40)
        b["last_ms"] = 100_000 + poll * 30_000 + rng.permutation(300) * 100  # no ties: a
        # key's tied reports fold in arrival order, which shuffling would change
        ordered = memory.apply(b, now_ms=now)
        ordered = ordered[rng.random(len(ordered)) < 0.8]  # a boolean mask keeps the order
        words = flowtable.key_words(ordered)
        assert flowtable.in_report_order(flowtable.key_hash(words), words,
                                         ordered["last_ms"])
        shuffled = ordered[rng.permutation(len(ordered))]
        fast.update(ordered, reports=True)
        slow.update(shuffled, reports=True)
        out_fast.append(fast.expire(now))
        out_slow.append(slow.expire(now))
    out_fast.append(fast.flush())
    out_slow.append(slow.flush())
    a, b = np.concatenate(out_fast), np.concatenate(out_slow)
    assert len(a) > 40 and set(a["end_reason"]) >= {1, 2, 4}
    key = ["first_ms", "last_ms", "packets", "end_reason"]
    assert np.array_equal(np.sort(a[key]), np.sort(b[key]))
    assert a["packets"].sum() == b["packets"].sum()
