#!/usr/bin/env python3
"""Online cache policies simulated over 1 MiB slices on a trace from trace.py.

Used to choose the edge's memory-tier policy: each policy sees the same slice
accesses as the offline optimum, with a capacity in slices. Prints byte hit ratio
(1 - origin bytes / client bytes) per policy.

Usage: trace.py --trace T ... ; policies.py T CACHE_MB [DISK_MB]
  With DISK_MB, also a memory tier of CACHE_MB in front of a disk tier of DISK_MB.
"""

import bisect
import math
import random
import sys
from collections import OrderedDict

MIB = 1 << 20


def load(path):
    """Slice accesses ((title, index), bytes, ends_inside) in order, and client bytes.
    ends_inside: the request stopped inside this slice, before the title's end (the
    same player's next segment will start in it)."""
    sizes, reqs = {}, []
    for line in open(path):
        f = line.split()
        if f[0] == "T":
            sizes[f[1]] = int(f[2])
        elif f[0] == "R":
            reqs.append((f[1], int(f[2]), int(f[3])))
    acc = []
    for t, a, b in reqs:
        last = b // MIB
        inside = (b + 1) % MIB != 0 and b + 1 < sizes[t]
        for i in range(a // MIB, last + 1):
            acc.append(((t, i), min(MIB, sizes[t] - i * MIB), inside and i == last))
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
    for k, b, *_ in acc:
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
    for k, b, *_ in acc:
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


def wtinylfu(acc, cap, window=0.01, period_mult=10, by_title=False):
    """Caffeine's W-TinyLFU: a small LRU window admits everything; what leaves it
    competes by TinyLFU for the main segmented LRU (20% probation, 80% protected).
    by_title: the sketch counts titles, not slices."""
    counted = (lambda k: k[0]) if by_title else (lambda k: k)
    sk = Sketch(period_mult * cap)
    wcap = max(1, int(cap * window))
    mcap = cap - wcap
    pcap = int(mcap * 0.8)
    win, prob, prot = OrderedDict(), OrderedDict(), OrderedDict()
    origin = 0
    for k, b, *_ in acc:
        sk.add(counted(k))
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
                if sk.get(counted(cand)) > sk.get(counted(victim)):
                    (prob if victim in prob else prot).pop(victim)
                    prob[cand] = cb
    return origin


class Video:
    """The edge's `video` policy (src/cache/video_policy.rs): score = the title's recent
    reads (halved every `aging` x capacity slices read) x exp(-index / span), where
    span is the mean slices a session reads; a slice a request ended inside scores
    above everything until it is read again (or `pending` reads later, by default a
    capacity's worth, as the edge's hold ends after reads of one budget). When full,
    the lowest score of `sample` held slices, or the new slice if it scores no higher
    than all of them, is dropped."""

    def __init__(self, cap, span=16.0, sample=16, aging=4, pending=None, cont=True,
                 by_title=True, seed=0):
        self.cap, self.span, self.sample, self.cont = cap, span, sample, cont
        self.by_title, self.pending_for = by_title, pending or cap
        self.reads = Sketch(aging * cap)
        self.reads.add = self._add_unbounded(self.reads)
        self.keys, self.at, self.pending = [], {}, {}
        self.rng = random.Random(seed)
        self.now = 0

    @staticmethod
    def _add_unbounded(sk):
        def add(k):
            sk.c[k] = sk.c.get(k, 0) + 1
            sk.n += 1
            if sk.n >= sk.period:
                sk.n = 0
                sk.c = {k: v >> 1 for k, v in sk.c.items() if v > 1}
        return add

    def score(self, k):
        if self.pending.get(k, -1) >= self.now:
            return math.inf
        if self.by_title:
            return self.reads.get(k[0]) * math.exp(-k[1] / self.span)
        return self.reads.get(k)

    def read(self, k, inside):
        """A client reads slice k; inside: its request stopped inside it."""
        self.now += 1
        self.reads.add(k[0] if self.by_title else k)
        if self.cont and inside:
            self.pending[k] = self.now + self.pending_for
        else:
            self.pending.pop(k, None)

    def __contains__(self, k):
        return k in self.at

    def fill(self, k):
        if len(self.keys) >= self.cap:
            worst, victim = self.score(k), k
            for _ in range(self.sample):
                c = self.keys[self.rng.randrange(len(self.keys))]
                s = self.score(c)
                if s < worst:
                    worst, victim = s, c
            if victim == k:
                return
            i = self.at.pop(victim)
            last = self.keys.pop()
            if last != victim:
                self.keys[i] = last
                self.at[last] = i
        self.at[k] = len(self.keys)
        self.keys.append(k)


def video(acc, cap, policy=None, **kw):
    """Origin bytes of the video policy (or of `policy`, a Video) over acc."""
    v, origin = policy or Video(cap, **kw), 0
    for k, b, inside in acc:
        v.read(k, inside)
        if k not in v:
            origin += b
            v.fill(k)
    return origin


class Oracle(Video):
    """The video policy's eviction with a perfect popularity estimate: a slice's score is
    how often it will be read in the next `ahead` slice reads (an offline bound on what
    estimating popularity better could give)."""

    def __init__(self, cap, acc, ahead):
        super().__init__(cap)
        self.ahead, self.times = ahead, {}
        for n, (k, _, _) in enumerate(acc):
            self.times.setdefault(k, []).append(n + 1)

    def score(self, k):
        if self.pending.get(k, -1) >= self.now:
            return math.inf
        t = self.times[k]
        return bisect.bisect_right(t, self.now + self.ahead) - bisect.bisect_right(t, self.now)


def pair(acc, mem_cap, disk_cap, disk_video):
    """A video memory tier in front of a disk tier: a memory miss reads the disk, a
    disk miss the origin; what the origin sends goes to both tiers (as the edge does).
    The disk tier is LRU, or with disk_video the same video policy."""
    mem = Video(mem_cap)
    disk = Video(disk_cap, seed=1) if disk_video else OrderedDict()
    origin = 0
    for k, b, inside in acc:
        mem.read(k, inside)
        if disk_video:
            disk.read(k, inside)
        if k in mem:
            continue
        if k in disk:
            if not disk_video:
                disk.move_to_end(k)
            mem.fill(k)
            continue
        origin += b
        mem.fill(k)
        if disk_video:
            disk.fill(k)
        else:
            disk[k] = b
            if len(disk) > disk_cap:
                disk.popitem(last=False)
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
        ("W-TinyLFU 50% window (the edge's windowed)", wtinylfu(acc, cap, 0.50)),
        ("W-TinyLFU 50% window, sketch on titles", wtinylfu(acc, cap, 0.50, by_title=True)),
        ("video (the edge's video policy)", video(acc, cap)),
        ("video, without the next-segment hold", video(acc, cap, cont=False)),
        ("video, without position (title reads only)", video(acc, cap, span=1e9)),
        ("video, slice reads instead of title reads", video(acc, cap, by_title=False)),
        ("video, span 8 slices", video(acc, cap, span=8.0)),
        ("video, span 32 slices", video(acc, cap, span=32.0)),
        ("video, sample of 64", video(acc, cap, sample=64)),
        ("video's eviction, knowing the next 3,000 reads", video(acc, cap, Oracle(cap, acc, 3000))),
        ("video's eviction, knowing the next 10,000 reads", video(acc, cap, Oracle(cap, acc, 10000))),
        ("video's eviction, knowing the next 30,000 reads", video(acc, cap, Oracle(cap, acc, 30000))),
    ]
    if len(sys.argv) > 3:
        disk = int(sys.argv[3])
        rows += [
            (f"video memory + LRU disk of {disk}", pair(acc, cap, disk, False)),
            (f"video memory + video disk of {disk}", pair(acc, cap, disk, True)),
            (f"LRU of {cap + disk} (one tier)", lru(acc, cap + disk)),
        ]
    for name, o in rows:
        print(f"{name:50s} {1 - o / client:.3f}")


if __name__ == "__main__":
    main()

