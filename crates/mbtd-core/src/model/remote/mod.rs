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
//!
//! Generation keeps per-session key/value caches on the hosts ([`generation`],
//! [`sessions`]): with an f32 wire its tokens and logits are bitwise the single-process
//! generation's, and a branch whose host stops answering is masked for the rest of the
//! generation (`generation_tests`).

mod codec;
pub mod coordinator;
pub(crate) mod generation;
pub mod host;
pub mod norm;
pub mod protocol;
pub mod sessions;
pub mod wire;

#[cfg(test)]
mod equivalence_tests;
#[cfg(test)]
mod generation_tests;
#[cfg(test)]
mod outage_tests;
#[cfg(test)]
mod wire_tests;

pub use coordinator::{ClusterStats, RemoteBranches, Transport};
pub use host::BranchHost;
pub use norm::NormGuard;
pub use protocol::{
    AdamWStep, Backward, BackwardReply, BranchGrad, BranchKey, BranchState, Decode, DecodeReply,
    Forward, ForwardReply, Open, Reply, Request, Update, UpdateReply,
};
pub use sessions::SessionLimits;
pub use wire::{
    HEADER_LEN, VERSION, WireError, WirePrecision, decode_reply, decode_request, encode_reply,
    encode_request, frame_len,
};
