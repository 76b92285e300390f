//! Integration tests: the real service against real `redis-server`s.
//! One binary (faster to link); one module per feature.

mod helpers;
mod redis_server;
mod sentinel;
mod sentinel_reads;

mod abuse;
mod admin;
mod assertion;
mod chaos;
mod cli;
mod cluster;
mod console;
mod epochs;
mod events;
mod failover;
mod fault_proxy;
mod faults;
mod gateway;
mod grpc;
mod health;
mod input;
mod jwks;
mod multi_instance;
mod near_cache;
mod policy;
mod sessions;
mod staleness;
mod storage;
mod tokens;
mod topology;
mod whereabouts;
