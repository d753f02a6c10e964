//! Process-wide state shared by the public and admin listeners, built once from config.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::{SignedUrls, Verifier};
use crate::cache::disk::{DiskOpenError, DiskTier};
use crate::cache::memory::MemoryTier;
use crate::cache::pages::PagePool;
use crate::cache::purge::Purges;
use crate::cache::SliceStore;
use crate::cluster::ring::RingError;
use crate::cluster::site::Site;
use crate::config::Config;
use crate::cors::Cors;
use crate::dictionary::store::DictionaryStore;
use crate::forward::opening::ForwardSlot;
use crate::forward::spool::SpoolError;
use crate::forward::ForwardSetupError;
use crate::metrics::Metrics;
use crate::ops::drain::Drain;
use crate::ops::fill::jobs::JobStoreError;
use crate::ops::fill::FillJobs;
use crate::origin::OriginClient;
use crate::pinned::PinnedBudget;
use crate::proxies::TrustedProxies;
use crate::routes::Router;
use crate::sources::Sources;
use crate::upstream::ConnectorSettings;
use crate::upstream::ResolveError;

/// Everything a request handler needs. Immutable after start; interior state (caches,
/// counters, pools) synchronises itself.
pub struct AppState {
    pub signed_urls: SignedUrls,
    pub dictionary: Option<DictionaryStore>,
    /// The forwarded routes, once their spool is open (see `forward::opening`).
    pub forwarder: Option<Arc<ForwardSlot>>,
    pub cors: Cors,
    /// `[proxies]`: whose `X-Forwarded-For` is believed.
    pub proxies: TrustedProxies,
    pub router: Router,
    pub store: SliceStore,
    pub origin: Arc<OriginClient>,
    /// The site and parent tier, with `[cluster]`.
    pub site: Option<Arc<Site>>,
    /// Directed mode: where a miss the site does not hold is redirected (SPEC 6.3).
    pub redirect_url: Option<String>,
    pub metrics: Arc<Metrics>,
    /// Slices held by video responses in flight, within `limits.max_pinned_bytes`.
    pub pinned: PinnedBudget,
    pub memory_capacity: u64,
    pub started: Instant,
    /// `admin.token`: the bearer token of the mutating admin endpoints.
    pub admin_token: Option<Vec<u8>>,
    /// Taken out of rotation: `/healthz` answers 503 (SPEC 7).
    pub drain: Drain,
    /// Fill jobs, with `[fill]` (SPEC 7).
    pub fill: Option<Arc<FillJobs>>,
}

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Disk(#[from] DiskOpenError),
    #[error(transparent)]
    Forward(#[from] ForwardSetupError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Fill(#[from] JobStoreError),
    #[error("cache.disk.path {path}: cannot read the purge log: {error}")]
    PurgeLog {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

impl StateError {
    /// The disk tier or the spool is held by another process, such as the one handing
    /// over its listeners during an upgrade.
    pub fn is_in_use(&self) -> bool {
        match self {
            StateError::Disk(e) => e.is_in_use(),
            StateError::Forward(ForwardSetupError::Spool(SpoolError::InUse(_))) => true,
            StateError::Fill(e) => e.is_in_use(),
            _ => false,
        }
    }
}

impl AppState {
    /// Lets go of the disk tier, the spool and the fill jobs for the process taking over
    /// in an upgrade; this one keeps answering from memory and origin until it exits.
    /// Blocking.
    pub fn hand_over_storage(&self) {
        self.store.hand_over_disk();
        if let Some(f) = &self.forwarder {
            f.hand_over_blocking();
        }
        tracing::info!("disk tier and spool handed over to the new process");
        if let Some(f) = &self.fill {
            f.hand_over_blocking();
        }
    }

    pub fn new(config: &Config) -> Result<Arc<Self>, StateError> {
        let metrics = Arc::new(Metrics::new());
        let connectors = ConnectorSettings::from_config(config);
        let pages = config
            .cache
            .sendfile
            .then(|| {
                PagePool::for_tier(config.cache.slice_bytes, config.cache.memory_bytes)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "no page pool for the memory tier; slices are copied to clients")
                    })
                    .ok()
            })
            .flatten();
        let origin = Arc::new(OriginClient::new(
            &config.origin,
            &connectors,
            metrics.clone(),
            pages.clone(),
        )?);
        // With a disk tier in a site, disk slices wait for the peers' purge logs at start.
        let disk_dir = config.cache.disk.as_ref().map(|d| d.path.as_path());
        let gated = disk_dir.is_some() && config.cluster.is_some();
        let purges = Purges::open(disk_dir, gated).map_err(|error| StateError::PurgeLog {
            path: disk_dir.map(Into::into).unwrap_or_default(),
            error,
        })?;
        let purges = Arc::new(purges);
        let disk = config
            .cache
            .disk
            .as_ref()
            .map(|d| DiskTier::open(d, config.cache.slice_bytes, metrics.clone(), purges.clone()))
            .transpose()?;
        let site = config
            .cluster
            .as_ref()
            .map(|c| {
                Site::new(
                    c,
                    config.origin.connect_timeout,
                    &connectors,
                    pages.clone(),
                    &metrics,
                )
                .map(Arc::new)
            })
            .transpose()?;
        let store = SliceStore::new(
            config.cache.slice_bytes,
            MemoryTier::new(config.cache.memory_bytes, config.cache.memory_policy),
            config.cache.meta_ttl,
            disk,
            Sources::new(origin.clone(), site.clone(), config.origin.mode),
            metrics.clone(),
            purges,
        );
        let dictionary_paths = config
            .dictionary
            .as_ref()
            .map(|d| d.paths.clone())
            .unwrap_or_default();
        let dictionary = config
            .dictionary
            .as_ref()
            .map(|d| DictionaryStore::new(d, &connectors, metrics.clone()))
            .transpose()?;
        let forwarder = config
            .forward
            .as_ref()
            .map(|f| ForwardSlot::open_in_background(f, &connectors, metrics.clone()))
            .transpose()?;
        let fill = config
            .fill
            .as_ref()
            .map(|f| FillJobs::open(f, metrics.clone()).map(Arc::new))
            .transpose()?;
        Ok(Arc::new(Self {
            dictionary,
            forwarder,
            cors: Cors::new(&config.cors.allow_origins),
            signed_urls: SignedUrls::new(
                Verifier::new(&config.signing.keys, config.signing.clock_skew_secs)
                    .with_max_ttl(config.signing.max_ttl_secs),
                config.signing.verified_cache_bytes,
                config.signing.max_bad_signatures_per_sec,
            ),
            router: Router::new(dictionary_paths),
            store,
            origin,
            site,
            redirect_url: config.origin.redirect_url.clone(),
            pinned: PinnedBudget::new(
                config.limits.max_pinned_bytes,
                config.cache.slice_bytes,
                metrics.pinned_bytes.clone(),
            ),
            metrics,
            memory_capacity: config.cache.memory_bytes,
            started: Instant::now(),
            admin_token: config.admin.token.clone(),
            drain: Drain::load(&config.server.upgrade_sock),
            fill,
            proxies: TrustedProxies::new(&config.proxies.trusted),
        }))
    }

    /// Applies pending cache maintenance so sizes are exact (before a scrape or /status).
    pub async fn sync_caches(&self) {
        self.store.sync().await;
        if let Some(d) = &self.dictionary {
            d.sync().await;
        }
    }

    /// Copies cache sizes into their gauges; called before each metrics scrape.
    pub fn refresh_gauges(&self) {
        let s = self.store.stats();
        self.metrics.memory.bytes.set(s.memory_bytes as i64);
        self.metrics.memory.entries.set(s.memory_entries as i64);
        self.metrics.metadata_entries.set(s.metadata_entries as i64);
        self.metrics
            .draining
            .set(i64::from(self.drain.is_draining()));
        self.metrics
            .purge
            .log_entries
            .set(self.store.purges().entries() as i64);
        if let Some(d) = s.disk {
            self.metrics.disk.bytes.set(d.bytes as i64);
            self.metrics.disk.entries.set(d.entries as i64);
        }
        if let Some(f) = self.forwarder.as_ref().and_then(|f| f.get()) {
            f.refresh_gauges();
        }
        if let Some(site) = &self.site {
            site.refresh_gauges();
        }
        if let Some(f) = &self.fill {
            f.refresh_gauges();
        }
        if let Some(d) = &self.dictionary {
            let d = d.stats();
            self.metrics.dictionary_entries.set(d.entries as i64);
            self.metrics.dictionary_bytes.set(d.bytes as i64);
        }
    }
}
