//! A site of several edges (SPEC 6): who owns a slice, how a node asks the owner (or a
//! parent) for it, how peers are health-checked, and the peer listener that answers.
//!
//! The owner of slice (o, v, index) is chosen by consistent hashing over the site's
//! peers, with Pingora's ketama ring (`pingora::lb`), so every node with the same `peers`
//! list computes the same owner.

pub mod auth;
pub mod client;
pub mod health;
pub mod metrics;
pub mod purge;
pub mod ring;
pub mod service;
pub mod site;
