//! The slice cache: objects cut into aligned slices of `cache.slice_bytes`, looked up
//! memory → disk → origin, with one origin fetch per cold slice however many requests want it.
//!
//! Invariants:
//! 1. A slice in the cache is exactly the origin's bytes for `[i*S, min((i+1)*S, size))`
//!    of one version of the object: only responses that passed [`crate::origin`]'s
//!    validation and agree with the object's metadata are inserted, each with the
//!    metadata it was cut under.
//! 2. One response is served from one version of an object: every slice it sends agrees
//!    (size and validator) with the metadata it started with, or the response fails
//!    ([`SliceStore::slice`]).
//! 3. Objects are immutable per (o, v), but an origin may show one half uploaded or
//!    replace it in place: metadata from a single answer is provisional and re-checked
//!    once after `cache.meta_ttl_secs`; an answer that disagrees with it replaces it,
//!    and slices cut under the old metadata are dropped when met. The rules are in
//!    [`meta`].
//! 4. Concurrent misses for one slice share one fill (`or_try_insert_with`); a failed
//!    fill is not cached, and every waiter gets its error.
//! 5. Every cached slice carries its object's metadata, so an object with any slice
//!    cached can be answered without the origin even if the metadata cache forgot it.
//! 6. An origin's 404 or 410 is remembered per (o, v) for `origin.negative_ttl_secs`, in
//!    memory only, in place of origin requests and never of cached data; and concurrent
//!    requests for an object not known yet make one origin request between them. The
//!    rules are in [`missing`].
//! 7. A purge is in force from the moment it is recorded: a fill that started before it
//!    puts nothing in a tier (its waiters still get the bytes), and a disk slice older
//!    than it is never served. The rules are in [`purge`].

pub mod disk;
pub mod memory;
pub mod meta;
pub mod missing;
pub mod pages;
pub mod purge;
pub mod video_policy;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use sha2::{Digest, Sha256};

use crate::config::KeepNonOwned;
use crate::metrics::{MetaCheck, Metrics};
use crate::origin::OriginError;
use crate::range::{slice_bounds, slice_len, ByteRange};
use crate::sources::{Filled, Sources};

use disk::{DiskStats, DiskTier};
use memory::MemoryTier;
pub use meta::ObjectMeta;
use meta::{unix_ms, Answer, Verdict};
use missing::{ColdObjects, MissingObjects, Turn};
use pages::Landing;
use purge::Purges;

/// Most objects whose metadata is remembered.
const METADATA_ENTRIES: u64 = 262_144;

/// The cache of object metadata every [`SliceStore`] keeps (public so that the scale
/// benches measure the same structure).
pub fn metadata_cache() -> moka::future::Cache<ObjectId, Arc<ObjectMeta>> {
    moka::future::Cache::builder()
        .name("object-metadata")
        .max_capacity(METADATA_ENTRIES)
        .build()
}

/// Fixed-size identity of an object version: SHA-256 of `o || 0x00 || v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId([u8; 32]);

impl ObjectId {
    pub fn new(o: &str, v: &str) -> Self {
        let mut h = Sha256::new();
        h.update(o.as_bytes());
        h.update([0u8]);
        h.update(v.as_bytes());
        Self(h.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds an id read back from storage.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// Cache key of one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SliceKey {
    pub object: ObjectId,
    pub index: u64,
}

/// Who asks for an object: decides where a miss may be filled from (SPEC 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Via {
    /// A peer of this node's site, which asks because it takes this node for the owner:
    /// the miss is never passed on to another peer of the site.
    pub sibling: bool,
    /// Parent tiers the request has already come through (0 for a client of this node).
    pub hops: u8,
    /// A fill job of this node (SPEC 7): the miss is pulled from the parent tier or the
    /// origin even in directed mode, and never asked of a peer (the job only fetches
    /// slices this node owns).
    pub fill: bool,
}

impl Via {
    /// A client of this node.
    pub const CLIENT: Via = Via {
        sibling: false,
        hops: 0,
        fill: false,
    };

    /// A fill job of this node.
    pub const FILL: Via = Via {
        sibling: false,
        hops: 0,
        fill: true,
    };
}

/// A signed object as the cache sees it: its names (for origin paths), its id, and who
/// asks for it.
#[derive(Debug, Clone, Copy)]
pub struct ObjectRef<'a> {
    pub o: &'a str,
    pub v: &'a str,
    pub id: ObjectId,
    pub via: Via,
}

impl<'a> ObjectRef<'a> {
    /// An object a client of this node asks for.
    pub fn new(o: &'a str, v: &'a str) -> Self {
        Self::asked(o, v, Via::CLIENT)
    }

    pub fn asked(o: &'a str, v: &'a str, via: Via) -> Self {
        Self {
            o,
            v,
            id: ObjectId::new(o, v),
            via,
        }
    }
}

/// Where a slice came from, for `Cache-Status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    /// Read from the disk tier by this request.
    Disk,
    /// This request fetched it from the origin (or the parent tier).
    Origin,
    /// This request fetched it from the slice's owner, another node of the site.
    Peer,
    /// Another request's origin fetch, which this one waited for.
    Coalesced,
}

/// A slice as the tiers hold it: its bytes and what they belong to.
#[derive(Debug, Clone)]
pub struct CachedSlice {
    pub bytes: Bytes,
    pub meta: Arc<ObjectMeta>,
}

/// What [`SliceStore::disk_part`] did.
enum Part {
    /// Read from disk in part.
    Read(Slice),
    /// The disk was asked and had nothing usable (absent, failed, timed out, purged,
    /// cut under other metadata).
    Missed,
    /// Not a case for a part: the slice is looked up whole.
    NotTried,
}

#[derive(Debug, Clone)]
pub struct Slice {
    /// The slice's bytes: all of them, or (from [`SliceStore::slice_part`]) a part
    /// that holds at least the bytes asked for.
    pub bytes: Bytes,
    /// `Some(offset)`: `bytes` is a part of the slice, starting at `offset`.
    pub part_at: Option<u64>,
    pub meta: Arc<ObjectMeta>,
    pub source: Source,
}

/// Metadata lookup result: whether it needed an origin fetch, and the slice that was
/// looked up to learn it (so the caller need not look it up again).
#[derive(Debug, Clone)]
pub struct MetaLookup {
    pub meta: Arc<ObjectMeta>,
    pub fetched: bool,
    /// The slice looked up came from another node of the site.
    pub from_peer: bool,
    pub slice: Option<(u64, Bytes)>,
}

/// Point-in-time sizes of the cache, for `/status` and gauges.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub memory_bytes: u64,
    pub memory_entries: u64,
    pub metadata_entries: u64,
    /// Objects an origin answered 404 or 410 for, remembered for `origin.negative_ttl_secs`.
    pub missing_entries: u64,
    /// `null` when no disk tier is configured.
    pub disk: Option<DiskStats>,
}

/// The tiered slice store. Shared by every request of the process.
pub struct SliceStore {
    slice_bytes: u64,
    memory: MemoryTier,
    disk: Option<DiskTier>,
    meta: moka::future::Cache<ObjectId, Arc<ObjectMeta>>,
    /// How long metadata from a single origin answer is used before it is re-checked.
    meta_ttl_ms: u64,
    /// Objects an origin said do not exist, for `origin.negative_ttl_secs`.
    missing: MissingObjects,
    /// Objects not known yet whose first origin request is in flight.
    cold: ColdObjects,
    sources: Sources,
    metrics: Arc<Metrics>,
    /// What was purged, and the purge clock (shared with the disk tier).
    purges: Arc<Purges>,
}

/// Why a fill put nothing in the memory tier.
enum Refused {
    Origin(OriginError),
    /// Its object was purged while it was in flight: the slice goes to the requests
    /// that waited for it, and nowhere else.
    Purged(CachedSlice),
    /// Not worth a place in memory ([`MemoryTier::would_keep`], asked before the disk
    /// read or the fetch): the slice goes to the requests that waited for it, and to
    /// the disk tier when it came from upstream, not to memory.
    NotKept(CachedSlice),
}

/// How a memory miss was filled ([`SliceStore::fill`]).
const FROM_UPSTREAM: u8 = 0;
const FROM_DISK: u8 = 1;
const FROM_PEER: u8 = 2;

impl SliceStore {
    // Called once, from `AppState::new`, with each part built there.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        slice_bytes: u64,
        memory: MemoryTier,
        meta_ttl: Duration,
        disk: Option<DiskTier>,
        sources: Sources,
        metrics: Arc<Metrics>,
        purges: Arc<Purges>,
    ) -> Self {
        Self {
            slice_bytes,
            memory,
            disk,
            meta: metadata_cache(),
            meta_ttl_ms: meta_ttl.as_millis() as u64,
            missing: MissingObjects::new(sources.negative_ttl()),
            cold: ColdObjects::default(),
            sources,
            metrics,
            purges,
        }
    }

    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Whether slice `index` of `object` is held by a tier right now (no I/O). Used to
    /// decide `Cache-Status` before the response header is written.
    pub fn contains(&self, object: ObjectId, index: u64) -> bool {
        let key = SliceKey { object, index };
        self.memory.contains(&key) || self.disk.as_ref().is_some_and(|d| d.contains(&key))
    }

    /// Returns slice `index` of `obj` for a response that started with metadata
    /// `expect`: memory → disk → origin, and always cut under metadata that agrees with
    /// `expect` (invariant 2). A slice cut under other metadata is dropped and looked up
    /// once more, unless the object's metadata has moved on since the response started;
    /// then, or if it still disagrees, the response must fail ([`OriginError::Changed`]).
    pub async fn slice(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        expect: &ObjectMeta,
    ) -> Result<Slice, Arc<OriginError>> {
        self.slice_within(obj, index, expect, None).await
    }

    /// [`SliceStore::slice`] for a response that needs only the slice's bytes `within`
    /// (end exclusive): a slice that the memory tier holds, or will keep, comes whole;
    /// one the disk tier holds and the memory tier would not keep is read from disk in
    /// part, the blocks `within` lies in ([`DiskTier::read_part`]), by this request
    /// alone. `Slice::part_at` says where a part starts.
    pub async fn slice_part(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        expect: &ObjectMeta,
        within: Range<u64>,
    ) -> Result<Slice, Arc<OriginError>> {
        self.slice_within(obj, index, expect, Some(within)).await
    }

    async fn slice_within(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        expect: &ObjectMeta,
        within: Option<Range<u64>>,
    ) -> Result<Slice, Arc<OriginError>> {
        let part = within.map(|w| (slice_len(index, self.slice_bytes, expect.size) as usize, w));
        let slice = self.lookup(obj, index, true, part).await?;
        if slice.meta.agrees_with(expect) {
            return Ok(slice);
        }
        Box::pin(self.disagreeing(obj, index, slice, expect)).await
    }

    /// [`SliceStore::slice`] when the slice found disagrees with the response's metadata.
    async fn disagreeing(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        found: Slice,
        expect: &ObjectMeta,
    ) -> Result<Slice, Arc<OriginError>> {
        let changed = |got: &ObjectMeta| {
            Arc::new(OriginError::Changed {
                what: expect.difference(got),
            })
        };
        let current = self.meta.get(&obj.id).await;
        if current
            .as_ref()
            .is_some_and(|c| c.agrees_with(&found.meta) && !c.agrees_with(expect))
        {
            // The object's metadata was replaced after this response started.
            return Err(changed(&found.meta));
        }
        // The slice was cut under metadata since replaced: drop it, and ask the origin.
        let key = SliceKey {
            object: obj.id,
            index,
        };
        self.metrics.stale_slices.inc();
        self.memory.invalidate(&key).await;
        if let Some(disk) = &self.disk {
            disk.discard(key);
        }
        let again = self.lookup(obj, index, false, None).await?;
        if again.meta.agrees_with(expect) {
            Ok(again)
        } else {
            Err(changed(&again.meta))
        }
    }

    /// A client reads `range` of an object of `size` bytes (what the tiers' `video`
    /// policies learn from; called before the slices are looked up).
    pub fn note_read(&self, object: ObjectId, range: ByteRange, size: u64) {
        let first = range.start / self.slice_bytes;
        let last = range.end / self.slice_bytes;
        let ends_inside = !(range.end + 1).is_multiple_of(self.slice_bytes) && range.end + 1 < size;
        self.noted(object, first, last, ends_inside);
    }

    /// A fill job is about to fetch slice `index` of `object`: it counts as one read of
    /// it, so that the title it places is worth keeping as it fills (SPEC 7).
    pub fn note_fill(&self, object: ObjectId, index: u64) {
        self.noted(object, index, index, false);
    }

    fn noted(&self, object: ObjectId, first: u64, last: u64, ends_inside: bool) {
        let disk = self.disk.as_ref().and_then(DiskTier::video_policy);
        for policy in self.memory.video_policy().into_iter().chain(disk) {
            policy.read(object, first, last, ends_inside, self.slice_bytes);
        }
    }

    /// Slice `index` of `obj` as the tiers (or the origin) have it, under whatever
    /// metadata it was cut. A disk or origin result is put in memory; an origin result is
    /// also queued for the disk. `use_disk` false skips the disk tier.
    async fn lookup(
        &self,
        obj: &ObjectRef<'_>,
        index: u64,
        use_disk: bool,
        part: Option<(usize, Range<u64>)>,
    ) -> Result<Slice, Arc<OriginError>> {
        let key = SliceKey {
            object: obj.id,
            index,
        };
        if let Some(cached) = self.memory.get(&key).await {
            self.metrics.memory.hits.inc();
            return Ok(Slice {
                bytes: cached.bytes,
                part_at: None,
                meta: cached.meta,
                source: Source::Memory,
            });
        }
        self.metrics.memory.misses.inc();
        // The miss paths (a part read, moka's entry, disk read, origin exchange) are large
        // futures: boxed, a hit does not carry their size.
        let disk = self.disk.as_ref().filter(|d| use_disk && d.contains(&key));
        let use_disk = match (disk, part) {
            (Some(disk), Some((len, within))) => {
                match Box::pin(self.disk_part(obj, disk, key, len, within)).await {
                    Part::Read(slice) => return Ok(slice),
                    // A disk that failed this request once (within its read timeout) is
                    // not asked again for it.
                    Part::Missed => false,
                    Part::NotTried => true,
                }
            }
            _ => use_disk,
        };
        Box::pin(self.slice_miss(obj, key, use_disk)).await
    }

    async fn slice_miss(
        &self,
        obj: &ObjectRef<'_>,
        key: SliceKey,
        use_disk: bool,
    ) -> Result<Slice, Arc<OriginError>> {
        let from = AtomicU8::new(FROM_UPSTREAM);
        let led = AtomicBool::new(false);
        // A purge recorded from now on refuses what this fill brings (invariant 7).
        let started = self.purges.now();
        self.purges.names().note(obj.id, obj.o);
        let filled = self
            .memory
            .fills()
            .entry(key)
            .or_try_insert_with(async {
                led.store(true, Ordering::Relaxed);
                let (slice, keep) = self
                    .fill(obj, key, &from, use_disk, started)
                    .await
                    .map_err(Refused::Origin)?;
                if self.purges.purged_after(obj.o, &obj.id, started) {
                    return Err(Refused::Purged(slice));
                }
                if !keep {
                    return Err(Refused::NotKept(slice));
                }
                Ok(slice)
            })
            .await;
        let led = led.load(Ordering::Relaxed);
        let entry = match filled {
            Ok(entry) => entry,
            Err(refused) => return self.refused(obj, &refused, led, &from).await,
        };
        let source = match (entry.is_fresh(), from.load(Ordering::Relaxed)) {
            (false, _) => {
                self.metrics.coalesced_waits.inc();
                Source::Coalesced
            }
            (true, from) => {
                self.memory.filled(&key, entry.value().bytes.len()).await;
                self.purges.names().note(obj.id, obj.o);
                if self.purges.purged_after(obj.o, &obj.id, started)
                    || (from == FROM_PEER && self.keeps_nothing_from_peers())
                {
                    // Purged between the check above and the insert; or not kept.
                    self.memory.invalidate(&key).await;
                }
                source_of(from)
            }
        };
        let cached = entry.into_value();
        Ok(Slice {
            bytes: cached.bytes,
            part_at: None,
            meta: cached.meta,
            source,
        })
    }

    /// The answer to a request whose fill put nothing in memory: its error, or the slice
    /// of a fill purged in flight or not kept.
    async fn refused(
        &self,
        obj: &ObjectRef<'_>,
        refused: &Refused,
        led: bool,
        from: &AtomicU8,
    ) -> Result<Slice, Arc<OriginError>> {
        let (slice, purged) = match refused {
            Refused::Origin(e) => return Err(Arc::new(e.clone())),
            Refused::Purged(slice) => (slice, true),
            Refused::NotKept(slice) => (slice, false),
        };
        let source = if led {
            if purged {
                self.metrics.purge.fills_discarded.inc();
                // What the fill learnt of the object is as old as its bytes.
                self.meta.invalidate(&obj.id).await;
            }
            source_of(from.load(Ordering::Relaxed))
        } else {
            self.metrics.coalesced_waits.inc();
            Source::Coalesced
        };
        Ok(Slice {
            bytes: slice.bytes.clone(),
            part_at: None,
            meta: slice.meta.clone(),
            source,
        })
    }

    /// Returns the object's metadata, reading slice `hint_index` (the one the request
    /// will need first) when it is not known yet. On a cold object, slice `next_index`
    /// (the one the request needs after it) is fetched alongside, so that a range across
    /// two slices waits for one origin round trip, not two in a row; it only lands in the
    /// cache, and a failure there is left to the read that needs it. Provisional
    /// metadata that is due is re-checked with the origin first ([`meta`]).
    pub async fn meta(
        &self,
        obj: &ObjectRef<'_>,
        hint_index: u64,
        next_index: Option<u64>,
    ) -> Result<MetaLookup, Arc<OriginError>> {
        if let Some(meta) = self.meta.get(&obj.id).await {
            if !meta.is_due(unix_ms()) {
                return Ok(MetaLookup {
                    meta,
                    fetched: false,
                    from_peer: false,
                    slice: None,
                });
            }
            // Boxed, like the miss path: the re-check holds an origin exchange, and a hit
            // should not carry its size (each request's future is copied as it starts).
            let checked = Box::pin(self.recheck(obj, meta.clone())).await;
            return Ok(MetaLookup {
                fetched: !checked.agrees_with(&meta),
                from_peer: false,
                meta: checked,
                slice: None,
            });
        }
        // Not known yet: one origin request between every request that wants it now. A
        // sibling's request is not one of them: this node's first request may itself be
        // waiting for that sibling (each asked for a slice the other owns), so it fetches
        // its own slice, which only this node fills (one request per slice still). Nor is
        // a fill job's: it must only fetch the slice it asked for, one this node owns.
        // Metadata learnt with a slice purged meanwhile is as old as the slice: not kept.
        let started = self.purges.now();
        let turn = (!obj.via.sibling && !obj.via.fill).then(|| self.cold.join(obj.id, hint_index));
        let (hint_index, next_index, lead) = match turn {
            None => (hint_index, next_index, None),
            Some(Turn::Lead(guard)) => (hint_index, next_index, Some(guard)),
            Some(Turn::Follow(leading)) => {
                self.metrics.cold_object_waits.inc();
                (leading, None, None)
            }
        };
        let first = self.lookup(obj, hint_index, true, None);
        let first = match next_index {
            Some(next) => tokio::join!(first, self.lookup(obj, next, true, None)).0,
            None => first.await,
        };
        drop(lead);
        match first {
            Ok(slice) => {
                let fetched = matches!(
                    slice.source,
                    Source::Origin | Source::Peer | Source::Coalesced
                );
                let from_peer = slice.source == Source::Peer;
                if self.purges.purged_after(obj.o, &obj.id, started) {
                    return Ok(MetaLookup {
                        meta: slice.meta,
                        fetched: true,
                        from_peer,
                        slice: Some((hint_index, slice.bytes)),
                    });
                }
                let mut lookup = self.meta_of_slice(obj, hint_index, slice).await;
                lookup.fetched |= fetched;
                lookup.from_peer = from_peer;
                Ok(lookup)
            }
            Err(e) => match *e {
                OriginError::NotSatisfiable { size } => {
                    // The fill recorded what the 416 said.
                    let meta = match self.meta.get(&obj.id).await {
                        Some(m) if m.size == size => m,
                        _ => Arc::new(ObjectMeta::learnt(
                            &obj.id,
                            &Answer::size_only(size),
                            unix_ms(),
                            self.meta_ttl_ms,
                        )),
                    };
                    Ok(MetaLookup {
                        meta,
                        fetched: true,
                        from_peer: false,
                        slice: None,
                    })
                }
                _ => Err(e),
            },
        }
    }

    /// The metadata slice `index` was cut under, when the metadata cache had none: used
    /// as it is unless it is due for a re-check (a slice kept by a tier, or read from an
    /// older file). The slice comes back only if it agrees with the metadata returned.
    async fn meta_of_slice(&self, obj: &ObjectRef<'_>, index: u64, slice: Slice) -> MetaLookup {
        let carried = slice.meta;
        let meta = if carried.is_due(unix_ms()) {
            Box::pin(self.recheck(obj, carried.clone())).await
        } else {
            self.meta
                .entry(obj.id)
                .or_insert(carried.clone())
                .await
                .into_value()
        };
        let agrees = meta.agrees_with(&carried);
        MetaLookup {
            fetched: !agrees,
            from_peer: false,
            slice: agrees.then_some((index, slice.bytes)),
            meta,
        }
    }

    /// Re-checks provisional metadata that is due, with a one-byte request to the
    /// origin; concurrent re-checks of one object make one request. Returns the
    /// metadata to use: `seen` (now confirmed, or kept provisional for another TTL when
    /// the origin failed), or its replacement when the origin answered otherwise.
    async fn recheck(&self, obj: &ObjectRef<'_>, seen: Arc<ObjectMeta>) -> Arc<ObjectMeta> {
        let fallback = seen.clone();
        let computed = self
            .meta
            .entry(obj.id)
            .and_compute_with(|current| async move {
                let now = unix_ms();
                let known = match current {
                    // Checked by another request meanwhile.
                    Some(c) if !c.value().is_due(now) => return Op::Nop,
                    Some(c) => c.into_value(),
                    None => seen,
                };
                let answer = match self.sources.probe(obj, self.slice_bytes).await {
                    Ok(body) => body.about,
                    Err(OriginError::NotSatisfiable { size }) => Answer::size_only(size),
                    Err(e) => {
                        tracing::warn!(object = obj.o, version = obj.v, error = %e,
                            "cannot re-check the object's metadata; kept for another TTL");
                        known.postpone(now.saturating_add(self.meta_ttl_ms));
                        self.metrics.record_meta_check(MetaCheck::Kept);
                        return Op::Put(known);
                    }
                };
                match self.settle(obj, &known, &answer, now) {
                    Ok(meta) => {
                        if !meta.is_confirmed() {
                            // Agreed, but an empty object is never confirmed.
                            meta.postpone(now.saturating_add(self.meta_ttl_ms));
                            self.metrics.record_meta_check(MetaCheck::Kept);
                        }
                        Op::Put(meta)
                    }
                    Err((replacement, _)) => Op::Put(replacement),
                }
            })
            .await;
        match computed {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                e.into_value()
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => fallback,
        }
    }

    /// Judges an origin answer against the object's metadata `known` ([`meta::judge`]):
    /// `Ok` with the metadata a slice of that answer is cached under (confirmed or
    /// completed when the answer says so), or `Err` with the metadata that replaces
    /// `known` when the answer disagrees, and on what. Records nothing in the metadata
    /// cache.
    fn settle(
        &self,
        obj: &ObjectRef<'_>,
        known: &Arc<ObjectMeta>,
        answer: &Answer,
        now: u64,
    ) -> Result<Arc<ObjectMeta>, (Arc<ObjectMeta>, &'static str)> {
        match meta::judge(known, answer, now) {
            Verdict::Agrees { confirm } => {
                if confirm {
                    known.confirm();
                    self.metrics.record_meta_check(MetaCheck::Confirmed);
                }
                Ok(known
                    .completed_by(answer)
                    .map_or_else(|| known.clone(), Arc::new))
            }
            Verdict::Differs { what } => {
                self.metrics.record_meta_check(MetaCheck::Replaced);
                tracing::warn!(
                    object = obj.o,
                    version = obj.v,
                    what,
                    known_size = known.size,
                    new_size = answer.size,
                    "the origin's answer disagrees with the object's metadata; \
                     the metadata is replaced and slices cut under it are dropped"
                );
                let replacement = ObjectMeta::learnt(&obj.id, answer, now, self.meta_ttl_ms);
                Err((Arc::new(replacement), what))
            }
        }
    }

    /// Records what an origin answer for one of `obj`'s slices says about the object;
    /// returns the metadata to cache that slice under, or the error that refuses it.
    async fn record_answer(
        &self,
        obj: &ObjectRef<'_>,
        answer: &Answer,
    ) -> Result<Arc<ObjectMeta>, OriginError> {
        let now = unix_ms();
        let known = match self.meta.get(&obj.id).await {
            Some(k) => k,
            None => {
                let learnt = Arc::new(ObjectMeta::learnt(&obj.id, answer, now, self.meta_ttl_ms));
                let entry = self.meta.entry(obj.id).or_insert(learnt.clone()).await;
                if entry.is_fresh() {
                    return Ok(learnt);
                }
                // Another fill learnt the object first: judge against what it learnt.
                entry.into_value()
            }
        };
        match self.settle(obj, &known, answer, now) {
            Ok(meta) => {
                if !Arc::ptr_eq(&meta, &known) {
                    self.meta.insert(obj.id, meta.clone()).await;
                }
                Ok(meta)
            }
            Err((replacement, what)) => {
                self.meta.insert(obj.id, replacement).await;
                Err(OriginError::Changed { what })
            }
        }
    }

    /// Fills one memory miss from disk, the slice's owner in the site, the parent tier
    /// or the origin ([`Sources`]); runs once per cold slice however many requests wait
    /// on it. Sets `from` to say where the slice came from. A disk slice cut under
    /// metadata other than the object's current one is dropped, not used. With the
    /// slice, whether it goes into memory: one the memory tier would not keep is served
    /// to its readers only, and a fetched one is read onto the heap, not into the page
    /// pool.
    ///
    /// A disk slice stays in the buffer it was read into, also when it is kept in
    /// memory: putting it in the page pool costs fresh shmem pages and freeing them
    /// again, about 1 ms per MiB on the benchmark box, where reading and checking the
    /// file costs about 0.15 ms (`cargo bench --bench disk_hit`). It is then sent by
    /// copy rather than by `sendfile` (docs/performance.md, "Range hits from the disk
    /// tier").
    async fn fill(
        &self,
        obj: &ObjectRef<'_>,
        key: SliceKey,
        from: &AtomicU8,
        use_disk: bool,
        started: u64,
    ) -> Result<(CachedSlice, bool), OriginError> {
        if let Some(disk) = self.disk.as_ref().filter(|_| use_disk) {
            // After a start, not before this node knows what its peers purged meanwhile.
            self.purges.wait_synced().await;
            let read = match disk.read(&key).await {
                Some((cached, written_at)) => self.usable(obj, key, disk, cached, written_at).await,
                None => None,
            };
            if let Some(cached) = read {
                from.store(FROM_DISK, Ordering::Relaxed);
                // Kept as read, not copied into the page pool: see `fill`.
                let keep = self.memory.would_keep_from_disk(&key, cached.bytes.len());
                return Ok((cached, keep));
            }
        }
        if self.missing.contains(&obj.id).await {
            self.metrics.negative_hits.inc();
            return Err(OriginError::RememberedNotFound);
        }
        let range = slice_bounds(key.index, self.slice_bytes);
        // A slice the memory tier would not keep is read onto the heap, not into a slot.
        let keep = self.memory.would_keep(&key, range.len() as usize);
        let landing = if keep { Landing::Pool } else { Landing::Heap };
        match self.sources.fetch(obj, key.index, range, landing).await {
            Ok((body, filled)) => {
                // The object exists after all (it appeared since an origin said not).
                self.missing.forget(&obj.id).await;
                let meta = self.record_answer(obj, &body.about).await?;
                // Read into the page pool already, when it had room.
                let cached = CachedSlice {
                    bytes: body.bytes,
                    meta,
                };
                match filled {
                    // Its owner keeps it on disk; this node at most in memory.
                    Filled::Peer => from.store(FROM_PEER, Ordering::Relaxed),
                    Filled::Upstream => {
                        if let Some(disk) = &self.disk {
                            disk.store(key, &cached, obj, started);
                        }
                    }
                }
                Ok((cached, keep))
            }
            Err(OriginError::NotSatisfiable { size }) => {
                self.record_answer(obj, &Answer::size_only(size)).await?;
                Err(OriginError::NotSatisfiable { size })
            }
            Err(e @ OriginError::NotFound { .. }) => {
                self.missing.remember(obj.id, obj.o).await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// A slice read from disk (in part or whole), with the metadata of the object as this
    /// node knows it; `None` when the file was cut before a purge of its object, or under
    /// metadata the object no longer has: then it is dropped.
    async fn usable(
        &self,
        obj: &ObjectRef<'_>,
        key: SliceKey,
        disk: &DiskTier,
        cached: CachedSlice,
        written_at: u64,
    ) -> Option<CachedSlice> {
        if self.purges.purged_after(obj.o, &obj.id, written_at) {
            // Cut before a purge of its object that the sweep did not reach.
            self.metrics.purge.slices.inc();
            self.metrics.purge.bytes.inc_by(cached.bytes.len() as u64);
            disk.discard(key);
            return None;
        }
        let meta = match self.meta.get(&obj.id).await {
            None => cached.meta,
            Some(known) if known.agrees_with(&cached.meta) => known,
            Some(_) => {
                self.metrics.stale_slices.inc();
                disk.discard(key);
                return None;
            }
        };
        Some(CachedSlice {
            bytes: cached.bytes,
            meta,
        })
    }

    /// On a memory miss, the part of a slice of `len` bytes that holds its bytes
    /// `within`, read from `disk` (which lists it) when the memory tier would not keep it
    /// ([`MemoryTier::would_keep_from_disk`]: for its title's score, not to await a
    /// player's next segment, which will read its own blocks), with no fill: the request
    /// reads its own blocks.
    async fn disk_part(
        &self,
        obj: &ObjectRef<'_>,
        disk: &DiskTier,
        key: SliceKey,
        len: usize,
        within: Range<u64>,
    ) -> Part {
        if self.memory.would_keep_from_disk(&key, len) {
            return Part::NotTried;
        }
        self.purges.wait_synced().await;
        let Some(part) = disk.read_part(&key, within).await else {
            return Part::Missed;
        };
        let Some(cached) = self
            .usable(obj, key, disk, part.slice, part.written_at)
            .await
        else {
            return Part::Missed;
        };
        Part::Read(Slice {
            bytes: cached.bytes,
            part_at: Some(part.offset),
            meta: cached.meta,
            source: Source::Disk,
        })
    }

    /// `cluster.keep_non_owned = "none"`: a slice from its owner is not kept here.
    fn keeps_nothing_from_peers(&self) -> bool {
        self.sources
            .site()
            .is_some_and(|s| s.keep_non_owned == KeepNonOwned::None)
    }

    /// Forgets that an origin said (o, v) does not exist (for a purge): the next request
    /// for it asks the origin.
    pub async fn forget_missing(&self, object: ObjectId) {
        self.missing.forget(&object).await;
    }

    /// [`SliceStore::forget_missing`] for every version of `o`.
    pub fn forget_missing_object(&self, o: &str) {
        self.missing.forget_object(o);
    }

    /// The object's metadata when it is known and not due for a re-check: what a fill
    /// job needs to plan an object without asking anyone.
    pub async fn known_meta(&self, object: ObjectId) -> Option<Arc<ObjectMeta>> {
        self.meta
            .get(&object)
            .await
            .filter(|m| !m.is_due(unix_ms()))
    }

    /// Gives the disk tier's directory up to the process taking over; see
    /// [`DiskTier::hand_over`].
    pub fn hand_over_disk(&self) {
        if let Some(disk) = &self.disk {
            disk.hand_over();
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            memory_bytes: self.memory.weighted_bytes(),
            memory_entries: self.memory.entries(),
            metadata_entries: self.meta.entry_count(),
            missing_entries: self.missing.entries(),
            disk: self.disk.as_ref().map(DiskTier::stats),
        }
    }

    /// Applies pending cache maintenance so [`SliceStore::stats`] is exact.
    pub async fn sync(&self) {
        self.prune_names().await;
        self.memory.sync().await;
        self.meta.run_pending_tasks().await;
        self.missing.sync().await;
        if let Some(disk) = &self.disk {
            let shared = disk.shared();
            // Disk index maintenance may delete evicted files: not on the async runtime.
            let _ = tokio::task::spawn_blocking(move || shared.sync_blocking()).await;
        }
    }
}

/// Where the fill that ran for a request got its slice ([`SliceStore::fill`]).
fn source_of(from: u8) -> Source {
    match from {
        FROM_DISK => Source::Disk,
        FROM_PEER => Source::Peer,
        _ => Source::Origin,
    }
}
