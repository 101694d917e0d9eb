//! cloud-ingest: the Plantlink cloud service, as a library so that its parts can be tested.
//!
//! # Layout
//! - [`pki`]: the fleet CA, server and gateway certificates, and reading a gateway's identity
//!   from its certificate.
#![forbid(unsafe_code)]

pub mod pki;
