//! Integration tests over real loopback sockets, one binary for all.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is a failed test

mod auth;
mod cancel;
mod clients;
mod common;
mod deployments;
mod engine;
mod errors;
mod faults;
mod hostile;
mod messages;
mod model;
mod process;
mod replicas;
mod responses;
mod resume;
mod services;
mod streaming;
mod surface;
mod traces;
mod transport;
mod ui_chat;
mod upstream;
