#!/usr/bin/env python3
"""Online cache policies simulated over 1 MiB slices on a trace from trace.py.

Used to choose the edge's memory-tier policy: each policy sees the same slice
accesses as the offline optimum, with a capacity in slices. Prints byte hit ratio
(1 - origin bytes / client bytes) per policy.

Usage: trace.py --trace T ... ; policies.py T CACHE_MB
"""

import sys
from collections import OrderedDict

MIB = 1 << 20


def load(path):
    sizes, reqs = {}, []
    for line in open(path):
        f = line.split()
        if f[0] == "T":
            sizes[f[1]] = int(f[2])
        elif f[0] == "R":
            reqs.append((f[1], int(f[2]), int(f[3])))
    acc = []
    for t, a, b in reqs:
        for i in range(a // MIB, b // MIB + 1):
            acc.append(((t, i), min(MIB, sizes[t] - i * MIB)))
    client = sum(b - a + 1 for _, a, b in reqs)
    return acc, client


class Sketch:
    """Count of recent accesses per key, halved every `period` accesses (TinyLFU aging)."""

    def __init__(self, period):
        self.c, self.n, self.period = {}, 0, period

    def add(self, k):
        self.c[k] = min(15, self.c.get(k, 0) + 1)
        self.n += 1
        if self.n >= self.period:
            self.n = 0
            self.c = {k: v >> 1 for k, v in self.c.items() if v > 1}

    def get(self, k):
        return self.c.get(k, 0)


def lru(acc, cap, admit=None):
    cache, origin = OrderedDict(), 0
    for k, b in acc:
        if k in cache:
            cache.move_to_end(k)
            continue
        origin += b
        if admit and not admit(k):
            continue
        cache[k] = b
        if len(cache) > cap:
            cache.popitem(last=False)
    return origin


def second_hit(acc, cap, seen_cap):
    seen = OrderedDict()

    def admit(k):
        if k in seen:
            return True
        seen[k] = 1
        if len(seen) > seen_cap:
            seen.popitem(last=False)
        return False

    return lru(acc, cap, admit)


def tinylfu(acc, cap, period_mult=10):
    """LRU eviction with TinyLFU admission (moka's policy): a new slice replaces the
    LRU victim only if it was seen more often recently."""
    sk = Sketch(period_mult * cap)
    cache, origin = OrderedDict(), 0
    for k, b in acc:
        sk.add(k)
        if k in cache:
            cache.move_to_end(k)
            continue
        origin += b
        if len(cache) < cap:
            cache[k] = b
            continue
        victim = next(iter(cache))
        if sk.get(k) > sk.get(victim):
            cache.popitem(last=False)
            cache[k] = b
    return origin


def wtinylfu(acc, cap, window=0.01, period_mult=10):
    """Caffeine's W-TinyLFU: a small LRU window admits everything; what leaves it
    competes by TinyLFU for the main segmented LRU (20% probation, 80% protected)."""
    sk = Sketch(period_mult * cap)
    wcap = max(1, int(cap * window))
    mcap = cap - wcap
    pcap = int(mcap * 0.8)
    win, prob, prot = OrderedDict(), OrderedDict(), OrderedDict()
    origin = 0
    for k, b in acc:
        sk.add(k)
        if k in win:
            win.move_to_end(k)
            continue
        if k in prob:
            del prob[k]
            prot[k] = b
            if len(prot) > pcap:
                d, db = prot.popitem(last=False)
                prob[d] = db
            continue
        if k in prot:
            prot.move_to_end(k)
            continue
        origin += b
        win[k] = b
        if len(win) > wcap:
            cand, cb = win.popitem(last=False)
            if len(prob) + len(prot) < mcap:
                prob[cand] = cb
            else:
                victim = next(iter(prob)) if prob else next(iter(prot))
                if sk.get(cand) > sk.get(victim):
                    (prob if victim in prob else prot).pop(victim)
                    prob[cand] = cb
    return origin


def main():
    acc, client = load(sys.argv[1])
    cap = int(sys.argv[2])  # MiB = slices
    rows = [
        ("LRU", lru(acc, cap)),
        ("LRU, admit on second request (memory of 4x)", second_hit(acc, cap, 4 * cap)),
        ("LRU, admit on second request (memory of 16x)", second_hit(acc, cap, 16 * cap)),
        ("TinyLFU admission, LRU eviction (moka)", tinylfu(acc, cap)),
        ("W-TinyLFU 1% window", wtinylfu(acc, cap)),
        ("W-TinyLFU 10% window", wtinylfu(acc, cap, 0.10)),
        ("W-TinyLFU 30% window", wtinylfu(acc, cap, 0.30)),
    ]
    for name, o in rows:
        print(f"{name:50s} {1 - o / client:.3f}")


if __name__ == "__main__":
    main()

