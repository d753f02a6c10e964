//! Forwarding of playback events, telemetry log blobs and stats (SPEC §2.5).

pub mod record;
pub mod spool;
