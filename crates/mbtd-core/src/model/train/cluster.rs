//! The trainer's side of branches on other machines: attaching a placement, and moving
//! branch weights and AdamW moments between the coordinator's copy and the hosts.
//!
//! While branches sit on hosts, the coordinator's copy of them (in [`Trainer::model`]
//! and [`Trainer::moments`]) is the state of the last pull or push; after a step it is
//! stale, and checkpoint bytes are refused until [`Trainer::pull_branches`] brings the
//! hosts' state back.

use super::Trainer;
use crate::model::generate::{GenerateConfig, Generation};
use crate::model::remote::generation::RemoteSession;
use crate::model::remote::{BranchState, RemoteBranches};
use crate::model::{Masks, ModelError};

impl Trainer {
    /// Starts generating after `prompt` ([`crate::model::Model::generate`]). With
    /// branches on hosts, each remote branch is computed by its host from its live
    /// weights, the host keeping the session's keys and values; a branch whose host
    /// fails is masked for the rest of the generation ([`Generation::lost`]). The session
    /// is closed on the hosts when the generation is dropped.
    pub fn generate<'a>(
        &'a mut self,
        prompt: &[u32],
        masks: &Masks,
        cfg: &GenerateConfig,
    ) -> Result<Generation<'a>, ModelError> {
        match self.remote.as_deref_mut() {
            None => self.model.generate(prompt, masks, cfg),
            Some(r) => {
                let session = Box::new(RemoteSession::new(r));
                self.model.generate_via(prompt, masks, cfg, Some(session))
            }
        }
    }

    /// Places branches on hosts: checks `remote`'s placement against the model's widths
    /// and pushes each placed branch's weights and moments to its host. From now on the
    /// layer loop and the update reach those branches through `remote`'s transport.
    pub fn attach_remote(&mut self, mut remote: RemoteBranches) -> Result<(), ModelError> {
        self.check_placement(&remote)?;
        remote.set_step(self.step);
        let states = self.states_of(&remote, None);
        remote.push(states)?;
        remote.set_current();
        self.remote = Some(Box::new(remote));
        Ok(())
    }

    /// [`Trainer::attach_remote`] that tolerates hosts that are down: they are parked
    /// (not asked, their branches masked) until [`Trainer::push_branches_reachable`]
    /// gives them the coordinator's copy. Returns the hosts that did not take their
    /// branches; an error only for a placement that does not fit (then nothing changed).
    pub fn attach_remote_reachable(
        &mut self,
        mut remote: RemoteBranches,
    ) -> Result<Vec<usize>, ModelError> {
        self.check_placement(&remote)?;
        remote.set_step(self.step);
        let states = self.states_of(&remote, None);
        let failed = remote.push_reachable(states)?;
        remote.set_current();
        self.remote = Some(Box::new(remote));
        Ok(failed)
    }

    fn check_placement(&self, remote: &RemoteBranches) -> Result<(), ModelError> {
        if self.remote.is_some() {
            return Err(ModelError::Cluster(
                "branches are already placed on hosts; detach them first".into(),
            ));
        }
        let (want, got) = (self.model.widths(), remote.widths());
        if want != got {
            return Err(ModelError::Cluster(format!(
                "the placement has widths {got:?}, the model {want:?}; place every branch of every layer (None: in this process)"
            )));
        }
        Ok(())
    }

    /// Takes the placement off the trainer: every branch is computed in this process from
    /// now on, from the coordinator's copy as of the last pull or push.
    pub fn detach_remote(&mut self) -> Option<RemoteBranches> {
        self.remote.take().map(|r| *r)
    }

    /// The placement, its counters and its transport, when branches sit on hosts.
    pub fn remote(&self) -> Option<&RemoteBranches> {
        self.remote.as_deref()
    }

    /// The placement, to park hosts or set the quorum.
    pub fn remote_mut(&mut self) -> Option<&mut RemoteBranches> {
        self.remote.as_deref_mut()
    }

    /// Brings every remote branch's weights and moments into the coordinator's copy (for
    /// a checkpoint). An error when a host does not give them; the copy is then unchanged
    /// for the branches not yet received.
    pub fn pull_branches(&mut self) -> Result<(), ModelError> {
        let Some(r) = self.remote.as_deref_mut() else {
            return Ok(());
        };
        let states = r.pull()?;
        self.apply_states(states)
    }

    /// Writes pulled branch states into the coordinator's copy.
    fn apply_states(&mut self, states: Vec<BranchState>) -> Result<(), ModelError> {
        let d = self.model.config.d_model;
        for s in states {
            let (l, i) = (s.layer, s.branch);
            if s.params.ln1_gain.len() != d {
                return Err(ModelError::Cluster(format!(
                    "branch ({l}, {i}) came back with width {}, the model's is {d}",
                    s.params.ln1_gain.len()
                )));
            }
            self.model.params.layers[l].branches[i] = s.params;
            self.m.layers[l].branches[i] = s.m;
            self.v.layers[l].branches[i] = s.v;
        }
        Ok(())
    }

    /// Brings the weights and moments of the branches of every host that gives them into
    /// the coordinator's copy (for a checkpoint that must complete while a host is down).
    /// A host that gives none (parked, down, late) keeps the coordinator's last copy of its
    /// branches — what it will be pushed before it is asked again. Returns those hosts.
    pub fn pull_branches_reachable(&mut self) -> Result<Vec<usize>, ModelError> {
        let Some(r) = self.remote.as_deref_mut() else {
            return Ok(Vec::new());
        };
        let (states, failed) = r.pull_reachable();
        self.apply_states(states)?;
        Ok(failed)
    }

    /// [`Trainer::push_branches`] that parks the hosts that do not take their branches
    /// instead of failing; returns them.
    pub fn push_branches_reachable(&mut self, host: Option<usize>) -> Vec<usize> {
        let Some(mut r) = self.remote.take() else {
            return Vec::new();
        };
        let states = self.states_of(&r, host);
        // every state comes from the placement: no unplaced branch to refuse
        let failed = r.push_reachable(states).unwrap_or_default();
        if host.is_none() {
            r.set_current();
        }
        r.set_step(self.step);
        self.remote = Some(r);
        failed
    }

    /// Sends the coordinator's copy of the remote branches (weights and moments) to
    /// their hosts — every host, or only `host` (a host that rejoins) — replacing what
    /// they hold: after a rollback, or when a host comes back.
    pub fn push_branches(&mut self, host: Option<usize>) -> Result<(), ModelError> {
        let Some(mut r) = self.remote.take() else {
            return Ok(());
        };
        let states = self.states_of(&r, host);
        let pushed = r.push(states);
        if pushed.is_ok() && host.is_none() {
            r.set_current();
        }
        r.set_step(self.step);
        self.remote = Some(r);
        pushed
    }

    /// The coordinator's copy of the branches placed on `host` (every host: `None`).
    fn states_of(&self, remote: &RemoteBranches, host: Option<usize>) -> Vec<BranchState> {
        let mut out = Vec::new();
        for (h, keys) in remote.by_host().into_iter().enumerate() {
            if host.is_some_and(|want| want != h) {
                continue;
            }
            for (l, i) in keys {
                out.push(BranchState {
                    layer: l,
                    branch: i,
                    params: self.model.params.layers[l].branches[i].clone(),
                    m: self.m.layers[l].branches[i].clone(),
                    v: self.v.layers[l].branches[i].clone(),
                });
            }
        }
        out
    }

    /// An error while hosts hold branch state newer than the coordinator's copy.
    pub(super) fn check_current(&self) -> Result<(), ModelError> {
        match self.remote.as_deref() {
            Some(r) if r.is_stale() => Err(ModelError::Cluster(
                "the branch hosts hold weights newer than the coordinator's copy; call Trainer::pull_branches before taking checkpoint bytes".into(),
            )),
            _ => Ok(()),
        }
    }
}
