#!/usr/bin/env python3
"""A seeded synthetic trace of video playback, and the cache limits it implies.

The trace: a catalogue of titles of 100 MB to 2 GB (log-uniform), each cut into
byte-range segments of 1 to 4 MiB fixed per title, as a DASH or HLS byte-range
manifest would be. Playback sessions arrive over time; a session picks its title
by Zipf popularity (exponent --alpha) over a ranking that drifts from one phase of
the trace to the next, starts at the beginning of the title (or, for a share of
sessions, somewhere inside it, as a resumed title does) and fetches consecutive
segments, a geometric number of them. A share of sessions are for one-hit wonders:
titles outside the catalogue that nobody else asks for. Requests of all sessions
are interleaved by time, as a site's players would be.

What it writes:
  TRACE  one line per request, in order: "R <title> <first byte> <last byte>";
         before them, one line per title: "T <title> <size>", and with --hmac-secret
         "Q <title> <signed query of version v1>".
  stdout a JSON summary: requests, client bytes, distinct slices, and the origin
         bytes and byte hit ratio (1 - origin bytes / client bytes) of two caches of
         --cache-bytes simulated over --slice-bytes slices on the same trace:
         Belady's MIN (the offline optimum, which knows the future and may decline to
         admit a slice) and plain LRU (admit everything, evict the least recently used).
"""

import argparse
import bisect
import hashlib
import heapq
import hmac
import json
import math
import random
import sys
from collections import OrderedDict

MIB = 1 << 20


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--requests", type=int, default=12000, help="about this many requests")
    p.add_argument("--titles", type=int, default=200, help="catalogue size")
    p.add_argument("--alpha", type=float, default=0.8, help="Zipf exponent of popularity")
    p.add_argument("--min-size", type=int, default=100_000_000)
    p.add_argument("--max-size", type=int, default=2_000_000_000)
    p.add_argument("--mean-segments", type=float, default=6.0,
                   help="mean segments a session fetches (geometric)")
    p.add_argument("--from-start", type=float, default=0.85,
                   help="share of sessions that start at the beginning of the title")
    p.add_argument("--one-hit", type=float, default=0.05,
                   help="share of sessions for titles nobody else asks for")
    p.add_argument("--phases", type=int, default=4, help="popularity changes between phases")
    p.add_argument("--drift", type=float, default=0.25,
                   help="share of the top 200 ranks replaced at each phase change")
    p.add_argument("--concurrent", type=int, default=200, help="sessions playing at once")
    p.add_argument("--slice-bytes", type=int, default=MIB)
    p.add_argument("--cache-bytes", type=int, default=1024 * MIB)
    p.add_argument("--lru-also", type=int, nargs="*", default=[],
                   help="also simulate LRU at these cache sizes (bytes)")
    p.add_argument("--trace", help="write the trace here")
    p.add_argument("--hmac-secret", help="also write each title's signed query (SPEC 2.1)")
    p.add_argument("--expires", type=int, default=0, help="expiry of the signed queries")
    return p.parse_args(argv)


def segments_of(size, rng):
    """Segment boundaries (start offsets, then the size) of a title."""
    bounds = [0]
    while bounds[-1] < size:
        bounds.append(min(size, bounds[-1] + rng.randint(MIB, 4 * MIB)))
    return bounds


class Zipf:
    def __init__(self, n, alpha):
        acc, self.cdf = 0.0, []
        for k in range(1, n + 1):
            acc += k ** -alpha
            self.cdf.append(acc)

    def rank(self, rng):
        return bisect.bisect_left(self.cdf, rng.random() * self.cdf[-1])


def generate(a):
    rng = random.Random(a.seed)
    lo, hi = math.log(a.min_size), math.log(a.max_size)
    sizes = {}
    layouts = {}

    def new_title(name):
        size = int(math.exp(rng.uniform(lo, hi)))
        sizes[name] = size
        layouts[name] = segments_of(size, random.Random(f"{a.seed}/{name}"))

    for i in range(a.titles):
        new_title(f"t{i:05d}")
    ranking = sorted(sizes, key=lambda _: rng.random())
    zipf = Zipf(a.titles, a.alpha)
    segment_secs = 4.0
    mean_len = a.mean_segments
    # Session arrivals: Poisson, at the rate that keeps --concurrent sessions playing.
    rate = a.concurrent / (mean_len * segment_secs)
    per_phase = a.requests / a.phases
    events = []  # (time, seq, title, first, last)
    now, seq, made, phase, ohw = 0.0, 0, 0, 0, 0
    p_stop = 1.0 / mean_len
    while made < a.requests:
        if made >= (phase + 1) * per_phase:
            phase += 1
            top = min(200, len(ranking))
            for r in range(top):
                if rng.random() < a.drift:
                    s = rng.randrange(top, len(ranking)) if len(ranking) > top else r
                    ranking[r], ranking[s] = ranking[s], ranking[r]
        now += rng.expovariate(rate)
        if rng.random() < a.one_hit:
            title = f"w{ohw:05d}"
            ohw += 1
            new_title(title)
        else:
            title = ranking[zipf.rank(rng)]
        bounds = layouts[title]
        nseg = len(bounds) - 1
        first = 0 if rng.random() < a.from_start else rng.randrange(nseg)
        length = 1
        while rng.random() > p_stop:
            length += 1
        t = now
        for s in range(first, min(nseg, first + length)):
            events.append((t, seq, title, bounds[s], bounds[s + 1] - 1))
            seq += 1
            made += 1
            t += segment_secs * rng.uniform(0.9, 1.1)
    events.sort()
    used = {e[2] for e in events}
    return [(t, sizes[t]) for t in sorted(used)], [(e[2], e[3], e[4]) for e in events]


def slice_accesses(requests, sizes, slice_bytes):
    """The slices each request touches, in order, as (key, bytes of the slice)."""
    out = []
    for title, first, last in requests:
        size = sizes[title]
        for i in range(first // slice_bytes, last // slice_bytes + 1):
            out.append(((title, i), min(slice_bytes, size - i * slice_bytes)))
    return out


def belady(accesses, capacity):
    """Origin bytes of Belady's MIN with bypass, over equal-capacity slots.

    Every slice but an object's last is slice-sized, so a slot count bounds the bytes
    the way a byte budget would, to within one slice per cached object tail."""
    never = len(accesses)
    next_use = [never] * len(accesses)
    last_seen = {}
    for i in range(len(accesses) - 1, -1, -1):
        key = accesses[i][0]
        next_use[i] = last_seen.get(key, never)
        last_seen[key] = i
    cached = {}  # key -> its next use
    heap = []  # (-next use, key), lazily deleted
    origin = 0
    for i, (key, nbytes) in enumerate(accesses):
        nu = next_use[i]
        if key in cached:
            cached[key] = nu
            heapq.heappush(heap, (-nu, key))
            continue
        origin += nbytes
        if nu == never:
            continue
        if len(cached) >= capacity:
            while True:
                far, victim = heap[0]
                if cached.get(victim) == -far:
                    break
                heapq.heappop(heap)
            if -far <= nu:
                continue  # the new slice is needed later than anything cached: bypass
            heapq.heappop(heap)
            del cached[victim]
        cached[key] = nu
        heapq.heappush(heap, (-nu, key))
    return origin


def lru(accesses, capacity_bytes):
    cache = OrderedDict()
    held = origin = 0
    for key, nbytes in accesses:
        if key in cache:
            cache.move_to_end(key)
            continue
        origin += nbytes
        cache[key] = nbytes
        held += nbytes
        while held > capacity_bytes:
            _, b = cache.popitem(last=False)
            held -= b
    return origin


def signed_query(secret, title, expires):
    message = f"o={title}&v=v1&e={expires}&t="
    sc = hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()
    return f"{message}&sc={sc}"


def main(argv):
    a = parse_args(argv)
    titles, requests = generate(a)
    sizes = dict(titles)
    if a.trace:
        with open(a.trace, "w") as f:
            for t, s in titles:
                f.write(f"T {t} {s}\n")
                if a.hmac_secret:
                    f.write(f"Q {t} {signed_query(a.hmac_secret, t, a.expires)}\n")
            for t, first, last in requests:
                f.write(f"R {t} {first} {last}\n")
    client = sum(last - first + 1 for _, first, last in requests)
    acc = slice_accesses(requests, sizes, a.slice_bytes)
    capacity = a.cache_bytes // a.slice_bytes
    opt = belady(acc, capacity)
    lru_bytes = lru(acc, a.cache_bytes)
    distinct = len({k for k, _ in acc})
    counts = {}
    for k, _ in acc:
        counts[k] = counts.get(k, 0) + 1
    once = sum(1 for c in counts.values() if c == 1)
    json.dump({
        "seed": a.seed,
        "requests": len(requests),
        "titles": len(titles),
        "catalogue_bytes": sum(s for _, s in titles),
        "client_bytes": client,
        "slice_bytes": a.slice_bytes,
        "cache_bytes": a.cache_bytes,
        "distinct_slices": distinct,
        "slices_used_once": once,
        "compulsory_origin_bytes": sum(
            min(a.slice_bytes, sizes[t] - i * a.slice_bytes) for t, i in counts),
        "belady_origin_bytes": opt,
        "belady_byte_hit_ratio": 1 - opt / client,
        "lru_origin_bytes": lru_bytes,
        "lru_byte_hit_ratio": 1 - lru_bytes / client,
        "lru_at": {str(b): lru(acc, b) for b in a.lru_also},
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
