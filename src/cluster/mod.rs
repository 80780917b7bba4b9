//! Branches on other machines, the command-line side: `mbtd node` (a branch host) and
//! `mbtd bench cluster` (one process against a coordinator with nodes on loopback).

pub mod bench;
pub mod node;
