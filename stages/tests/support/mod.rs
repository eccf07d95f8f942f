//! Helpers shared by the stages integration tests.

pub mod http_server;
