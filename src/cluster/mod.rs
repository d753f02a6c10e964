//! A site of several edges (SPEC 6): who owns a slice.
//!
//! The owner of slice (o, v, index) is chosen by consistent hashing over the site's
//! peers, with Pingora's ketama ring (`pingora::lb`), so every node with the same `peers`
//! list computes the same owner.

pub mod ring;
