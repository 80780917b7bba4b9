//! Branches on other machines: the step protocol between a coordinator and branch hosts
//! as plain data ([`protocol`]), its versioned binary encoding ([`wire`]), the state a
//! host holds and its answers ([`host`]), and the coordinator's side behind the trainer's
//! branch interface ([`coordinator`]). No networking here: a transport moves the encoded
//! `Vec<u8>` requests and replies ([`Transport`]).
//!
//! With an f32 wire a trainer whose branches sit on hosts computes bitwise what the
//! single-process trainer computes (`equivalence_tests`); a branch whose host does not
//! answer, or answers with a non-finite output, is masked for that step exactly as the
//! availability mask masks it.

mod codec;
pub mod coordinator;
pub mod host;
pub mod norm;
pub mod protocol;
pub mod wire;

#[cfg(test)]
mod equivalence_tests;
#[cfg(test)]
mod outage_tests;
#[cfg(test)]
mod wire_tests;

pub use coordinator::{ClusterStats, RemoteBranches, Transport};
pub use host::BranchHost;
pub use norm::NormGuard;
pub use protocol::{
    AdamWStep, Backward, BackwardReply, BranchGrad, BranchKey, BranchState, Forward, ForwardReply,
    Reply, Request, Update, UpdateReply,
};
pub use wire::{
    HEADER_LEN, VERSION, WireError, WirePrecision, decode_reply, decode_request, encode_reply,
    encode_request, frame_len,
};
