//! End-to-end tests: a real server on 127.0.0.1:0, the real plugin components and models.

// Test helpers outside `#[test]` functions may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod admin;
mod auth;
mod bad_input;
mod decoder;
mod embeddings;
mod faults;
mod generation;
mod hostile;
mod jwt_auth;
mod metrics;
mod openai_client;
mod parsing;
mod pieces;
mod realtime;
mod resilience;
mod sanitizer;
mod shutdown;
mod spans;
