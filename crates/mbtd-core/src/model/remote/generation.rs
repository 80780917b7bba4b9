//! Generation with branches on hosts: [`RemoteSession`], the coordinator's side of one
//! generation session (see `Trainer::generate`).
//!
//! The prefill is the model's evaluation forward pass over the prompt in which every
//! remote branch's forward is an [`Open`](super::Open) of the session on its host (the
//! host keeps the branch's keys and values); a branch whose host does not answer, is
//! parked, refuses or returns a non-finite output is masked exactly as in a training
//! pass. Each further position sends, per layer, one [`Decode`] (the layer input row) to
//! each host of the layer's remote branches still in use and takes their output rows; a
//! branch whose output is missing or not finite is masked from that position to the end
//! of the generation (`Generation` renormalises the layer's `α̃`). Branches in this
//! process keep their caches here. When the generation is dropped (finished, failed or
//! cancelled) every host that was asked to open the session gets a
//! [`Request::Close`].
//!
//! With an f32 wire the tokens and logits are bitwise those of the single-process
//! generation with the same weights (`generation_tests`).

use super::coordinator::{RemoteBranches, read_reply};
use super::protocol::{Decode, Reply, Request};
use crate::model::branches::{Done, LayerBranches, LayerGrads, LayerInput};
use crate::model::generate::AwayBranches;
use crate::model::net::LayerWs;
use crate::model::{Batch, Masks, Model, ModelError, Workspace};

/// One generation session on the hosts of `remote`.
pub(crate) struct RemoteSession<'a> {
    remote: &'a mut RemoteBranches,
    id: u64,
    /// `opened[h]`: host `h` was asked to open the session (it gets a close).
    opened: Vec<bool>,
    /// Branches masked by the prefill, with why.
    lost: Vec<(usize, usize, String)>,
}

impl<'a> RemoteSession<'a> {
    /// A new session (a fresh id) on the hosts of `remote`.
    pub(crate) fn new(remote: &'a mut RemoteBranches) -> Self {
        let id = remote.new_session();
        let opened = vec![false; remote.hosts()];
        Self {
            remote,
            id,
            opened,
            lost: Vec::new(),
        }
    }
}

impl LayerBranches for RemoteSession<'_> {
    fn forward(&mut self, at: LayerInput, lw: &mut LayerWs) -> Done {
        let l = at.l;
        for (i, &on) in lw.computed.iter().enumerate() {
            if let Some(h) = self.remote.host_of(l, i).filter(|_| on) {
                self.opened[h] |= !self.remote.is_parked(h);
            }
        }
        let done = self.remote.forward_pass(at, lw, Some(self.id));
        let misses = std::mem::take(&mut self.remote.misses);
        self.lost
            .extend(misses.into_iter().map(|(i, why)| (l, i, why)));
        done
    }

    fn backward(&mut self, _: LayerInput, _: &mut LayerWs, _: LayerGrads) -> Done {
        Err(ModelError::Generate(
            "a generation's prefill has no backward pass".into(),
        ))
    }
}

impl AwayBranches for RemoteSession<'_> {
    fn is_away(&self, l: usize, i: usize) -> bool {
        self.remote.is_remote(l, i)
    }

    fn prefill(
        &mut self,
        model: &Model,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
    ) -> Result<Vec<(usize, usize, String)>, ModelError> {
        model.forward_via(ws, batch, masks, None, self)?;
        Ok(std::mem::take(&mut self.lost))
    }

    /// # Shapes
    /// `x`: `[d]` → each output `[d]`.
    fn decode(
        &mut self,
        l: usize,
        x: &[f32],
        pos: usize,
        want: &[usize],
    ) -> Vec<Result<Vec<f32>, String>> {
        let mut out: Vec<Result<Vec<f32>, String>> = vec![Err(String::new()); want.len()];
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (k, &i) in want.iter().enumerate() {
            match self.remote.host_of(l, i) {
                Some(h) if !self.remote.is_parked(h) => {
                    match groups.iter_mut().find(|(g, _)| *g == h) {
                        Some((_, ks)) => ks.push(k),
                        None => groups.push((h, vec![k])),
                    }
                }
                Some(h) => out[k] = Err(format!("host {h} is parked")),
                None => out[k] = Err(format!("branch ({l}, {i}) is not on a host")),
            }
        }
        let requests = groups
            .iter()
            .map(|(h, ks)| {
                let d = Decode {
                    session: self.id,
                    layer: l,
                    pos: pos as u64,
                    branches: ks.iter().map(|&k| want[k]).collect(),
                    x: x.to_vec(),
                };
                (*h, Request::Decode(d))
            })
            .collect();
        let replies = self.remote.round(requests);
        for ((host, ks), reply) in groups.into_iter().zip(replies) {
            let outputs = match read_reply(reply, host, "decode") {
                Ok(Reply::Decoded(r))
                    if r.session == self.id
                        && r.layer == l
                        && r.pos == pos as u64
                        && r.outputs.len() == ks.len()
                        && r.outputs
                            .iter()
                            .zip(&ks)
                            .all(|((i, z), &k)| *i == want[k] && z.len() == x.len()) =>
                {
                    r.outputs
                }
                other => {
                    let why = match other {
                        Ok(r) => format!(
                            "host {host}: decode of layer {l} at position {pos} answered with a mismatched {}",
                            r.name()
                        ),
                        Err(e) => e,
                    };
                    for k in ks {
                        self.remote.count_miss(l, want[k], false, why.clone());
                        out[k] = Err(why.clone());
                    }
                    continue;
                }
            };
            for ((i, z), k) in outputs.into_iter().zip(ks) {
                out[k] = if z.iter().all(|v| v.is_finite()) {
                    Ok(z)
                } else {
                    let why = format!(
                        "host {host}: output of branch ({l}, {i}) at position {pos} is not finite"
                    );
                    self.remote.count_miss(l, i, true, why.clone());
                    Err(why)
                };
            }
        }
        out
    }
}

impl Drop for RemoteSession<'_> {
    /// Closes the session on every host asked to open it (a host that does not answer
    /// drops it when it has been idle for its limit).
    fn drop(&mut self) {
        let requests: Vec<(usize, Request)> = (0..self.opened.len())
            .filter(|&h| self.opened[h])
            .map(|h| (h, Request::Close(self.id)))
            .collect();
        if !requests.is_empty() {
            self.remote.round(requests);
        }
    }
}
