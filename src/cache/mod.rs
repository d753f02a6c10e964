//! The slice cache: objects cut into aligned slices of `cache.slice_bytes`, looked up
//! memory → disk → origin, with one origin fetch per cold slice however many requests want it.
//!
//! Invariants:
//! 1. A slice in the cache is exactly the origin's bytes for `[i*S, min((i+1)*S, size))`:
//!    only responses that passed [`crate::origin`]'s validation are inserted.
//! 2. Objects are immutable per (o, v): nothing is revalidated, and an origin that reports
//!    a different size for a known object is an origin error, not a new truth.
//! 3. Concurrent misses for one slice share one fill (`or_try_insert_with`); a failed
//!    fill is not cached, and every waiter gets its error.
//! 4. Every cached slice carries its object's metadata, so an object with any slice
//!    cached can be answered without the origin even if the metadata cache forgot it.

pub mod disk;
pub mod memory;
pub mod pages;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::origin::{OriginClient, OriginError};
use crate::range::slice_bounds;

use disk::{DiskStats, DiskTier};
use memory::MemoryTier;
use pages::PagePool;

/// Most objects whose metadata is remembered.
const METADATA_ENTRIES: u64 = 262_144;

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
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// Cache key of one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SliceKey {
    pub object: ObjectId,
    pub index: u64,
}

/// A signed object as the cache sees it: its names (for origin paths) and its id.
#[derive(Debug, Clone, Copy)]
pub struct ObjectRef<'a> {
    pub o: &'a str,
    pub v: &'a str,
    pub id: ObjectId,
}

impl<'a> ObjectRef<'a> {
    pub fn new(o: &'a str, v: &'a str) -> Self {
        Self {
            o,
            v,
            id: ObjectId::new(o, v),
        }
    }
}

/// What the edge knows about an object without holding its bytes.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub size: u64,
    pub content_type: HeaderValue,
    /// Strong ETag derived from (o, v), so it is the same on every edge and origin.
    pub etag: HeaderValue,
    /// False when learnt from a 416, which carries no Content-Type.
    content_type_known: bool,
}

const DEFAULT_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/octet-stream");

impl ObjectMeta {
    pub fn new(id: &ObjectId, size: u64, content_type: Option<HeaderValue>) -> Self {
        let etag = format!("\"{}\"", hex::encode(&id.as_bytes()[..16]));
        Self {
            size,
            content_type_known: content_type.is_some(),
            content_type: content_type.unwrap_or(DEFAULT_CONTENT_TYPE),
            etag: HeaderValue::from_str(&etag).expect("hex is a valid header value"),
        }
    }

    /// False when the type was not known (learnt from a 416, or the origin sent none).
    pub fn content_type_known(&self) -> bool {
        self.content_type_known
    }
}

/// Where a slice came from, for `Cache-Status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    /// Read from the disk tier by this request.
    Disk,
    /// This request fetched it from the origin.
    Origin,
    /// Another request's origin fetch, which this one waited for.
    Coalesced,
}

/// A slice as the tiers hold it: its bytes and what they belong to.
#[derive(Debug, Clone)]
pub struct CachedSlice {
    pub bytes: Bytes,
    pub meta: Arc<ObjectMeta>,
}

#[derive(Debug, Clone)]
pub struct Slice {
    pub bytes: Bytes,
    pub meta: Arc<ObjectMeta>,
    pub source: Source,
}

/// Metadata lookup result: whether it needed an origin fetch, and the slice that was
/// looked up to learn it (so the caller need not look it up again).
#[derive(Debug, Clone)]
pub struct MetaLookup {
    pub meta: Arc<ObjectMeta>,
    pub fetched: bool,
    pub slice: Option<(u64, Bytes)>,
}

/// Point-in-time sizes of the cache, for `/status` and gauges.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub memory_bytes: u64,
    pub memory_entries: u64,
    pub metadata_entries: u64,
    /// `null` when no disk tier is configured.
    pub disk: Option<DiskStats>,
}

/// The tiered slice store. Shared by every request of the process.
pub struct SliceStore {
    slice_bytes: u64,
    memory: MemoryTier,
    /// Where memory-tier slices are kept when they can be sent by file offset.
    pages: Option<PagePool>,
    disk: Option<DiskTier>,
    meta: moka::future::Cache<ObjectId, Arc<ObjectMeta>>,
    origin: Arc<OriginClient>,
    metrics: Arc<Metrics>,
}

impl SliceStore {
    pub fn new(
        slice_bytes: u64,
        memory_bytes: u64,
        pages: Option<PagePool>,
        disk: Option<DiskTier>,
        origin: Arc<OriginClient>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            slice_bytes,
            memory: MemoryTier::new(memory_bytes),
            pages,
            disk,
            meta: moka::future::Cache::builder()
                .name("object-metadata")
                .max_capacity(METADATA_ENTRIES)
                .build(),
            origin,
            metrics,
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

    /// Returns slice `index` of `obj`: memory → disk → origin. A disk or origin result is
    /// put in memory; an origin result is also queued for the disk.
    pub async fn slice(&self, obj: &ObjectRef<'_>, index: u64) -> Result<Slice, Arc<OriginError>> {
        let key = SliceKey {
            object: obj.id,
            index,
        };
        if let Some(cached) = self.memory.get(&key).await {
            self.metrics.memory.hits.inc();
            return Ok(Slice {
                bytes: cached.bytes,
                meta: cached.meta,
                source: Source::Memory,
            });
        }
        self.metrics.memory.misses.inc();
        // The miss path (moka's entry, disk read, origin exchange) is a large future:
        // boxed, a hit does not carry its size.
        Box::pin(self.slice_miss(obj, key)).await
    }

    async fn slice_miss(
        &self,
        obj: &ObjectRef<'_>,
        key: SliceKey,
    ) -> Result<Slice, Arc<OriginError>> {
        let from_disk = AtomicBool::new(false);
        let entry = self
            .memory
            .cache()
            .entry(key)
            .or_try_insert_with(self.fill(obj, key, &from_disk))
            .await?;
        let source = match (entry.is_fresh(), from_disk.load(Ordering::Relaxed)) {
            (true, true) => Source::Disk,
            (true, false) => Source::Origin,
            (false, _) => {
                self.metrics.coalesced_waits.inc();
                Source::Coalesced
            }
        };
        let cached = entry.into_value();
        Ok(Slice {
            bytes: cached.bytes,
            meta: cached.meta,
            source,
        })
    }

    /// Returns the object's metadata, reading slice `hint_index` (the one the request
    /// will need first) when it is not known yet. On a cold object, slice `next_index`
    /// (the one the request needs after it) is fetched alongside, so that a range across
    /// two slices waits for one origin round trip, not two in a row; it only lands in the
    /// cache, and a failure there is left to the read that needs it.
    pub async fn meta(
        &self,
        obj: &ObjectRef<'_>,
        hint_index: u64,
        next_index: Option<u64>,
    ) -> Result<MetaLookup, Arc<OriginError>> {
        if let Some(meta) = self.meta.get(&obj.id).await {
            return Ok(MetaLookup {
                meta,
                fetched: false,
                slice: None,
            });
        }
        let first = self.slice(obj, hint_index);
        let first = match next_index {
            Some(next) => tokio::join!(first, self.slice(obj, next)).0,
            None => first.await,
        };
        match first {
            Ok(slice) => {
                let cached = matches!(slice.source, Source::Memory | Source::Disk);
                if cached {
                    self.meta.insert(obj.id, slice.meta.clone()).await;
                }
                Ok(MetaLookup {
                    fetched: !cached,
                    meta: slice.meta,
                    slice: Some((hint_index, slice.bytes)),
                })
            }
            Err(e) => match *e {
                OriginError::NotSatisfiable { size } => Ok(MetaLookup {
                    meta: Arc::new(ObjectMeta::new(&obj.id, size, None)),
                    fetched: true,
                    slice: None,
                }),
                _ => Err(e),
            },
        }
    }

    /// Fills one memory miss from disk or origin; runs once per cold slice however many
    /// requests wait on it. Sets `from_disk` when the disk answered.
    async fn fill(
        &self,
        obj: &ObjectRef<'_>,
        key: SliceKey,
        from_disk: &AtomicBool,
    ) -> Result<CachedSlice, OriginError> {
        let known = self.meta.get(&obj.id).await;
        if let Some(disk) = &self.disk {
            if let Some(cached) = disk.read(&key).await {
                if known.as_ref().is_none_or(|m| m.size == cached.meta.size) {
                    from_disk.store(true, Ordering::Relaxed);
                    return Ok(CachedSlice {
                        bytes: self.adopt(cached.bytes),
                        meta: cached.meta,
                    });
                }
                // Cut from another size of the object than the one being served.
                disk.discard(key);
            }
        }
        let expected_size = known.as_ref().map(|m| m.size);
        let range = slice_bounds(key.index, self.slice_bytes);
        match self
            .origin
            .fetch_slice(obj.o, obj.v, range, expected_size)
            .await
        {
            Ok(body) => {
                let meta = match known {
                    Some(m) if m.content_type_known => m,
                    _ => {
                        let m = Arc::new(ObjectMeta::new(&obj.id, body.total, body.content_type));
                        self.meta.insert(obj.id, m.clone()).await;
                        m
                    }
                };
                // Read into the page pool already, when it had room.
                let cached = CachedSlice {
                    bytes: body.bytes,
                    meta,
                };
                if let Some(disk) = &self.disk {
                    disk.store(key, &cached);
                }
                Ok(cached)
            }
            Err(OriginError::NotSatisfiable { size }) => {
                if known.is_none() {
                    // Only if still unknown: a slice fetched meanwhile knows the type too.
                    self.meta
                        .entry(obj.id)
                        .or_insert(Arc::new(ObjectMeta::new(&obj.id, size, None)))
                        .await;
                }
                Err(OriginError::NotSatisfiable { size })
            }
            Err(e) => Err(e),
        }
    }

    /// The bytes of a slice entering the memory tier, in the page pool when there is one.
    fn adopt(&self, bytes: Bytes) -> Bytes {
        match &self.pages {
            Some(pages) => pages.adopt(bytes),
            None => bytes,
        }
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
            disk: self.disk.as_ref().map(DiskTier::stats),
        }
    }

    /// Applies pending cache maintenance so [`SliceStore::stats`] is exact.
    pub async fn sync(&self) {
        self.memory.sync().await;
        self.meta.run_pending_tasks().await;
        if let Some(disk) = &self.disk {
            let shared = disk.shared();
            // Disk index maintenance may delete evicted files: not on the async runtime.
            let _ = tokio::task::spawn_blocking(move || shared.sync_blocking()).await;
        }
    }
}
