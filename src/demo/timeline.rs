//! What the demo asks the daemon to do, and when: each action at a fixed fraction of the
//! training time (from the first training step to the end of the demo).

/// One operator action of the demo, sent as a real `ctl` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `mask --layer 0 --branch 1`: an outage of one branch.
    Mask,
    /// `unmask --layer 0 --branch 1`: the branch comes back.
    Unmask,
    /// `expand --layer <last> --branches 1`.
    Expand,
    /// `checkpoint --tag demo`.
    Checkpoint,
    /// `rollback demo`: back to that checkpoint, exactly.
    Rollback,
    /// `generate` on a prompt of each task.
    Generate,
}

/// The checkpoint tag the demo writes and rolls back to.
pub const DEMO_TAG: &str = "demo";
/// The branch the outage takes down.
pub const OUTAGE: (usize, usize) = (0, 1);

/// The actions, in order, at their fraction of the training time.
pub const TIMELINE: [(f64, Action); 6] = [
    (0.20, Action::Mask),
    (0.35, Action::Unmask),
    (0.45, Action::Expand),
    (0.60, Action::Checkpoint),
    (0.72, Action::Rollback),
    (0.90, Action::Generate),
];

/// The actions due once `fraction` of the training time has passed, of which the first
/// `done` have been carried out already.
pub fn due(done: usize, fraction: f64) -> &'static [(f64, Action)] {
    let upto = TIMELINE
        .iter()
        .take_while(|(at, _)| *at <= fraction)
        .count();
    &TIMELINE[done.min(upto)..upto]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_come_in_order_and_each_once() {
        assert!(TIMELINE.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(due(0, 0.1).is_empty());
        assert_eq!(due(0, 0.2), &TIMELINE[..1]);
        assert_eq!(due(1, 0.2), &[]);
        assert_eq!(due(1, 0.5), &TIMELINE[1..3]);
        assert_eq!(due(3, 1.0), &TIMELINE[3..]);
        assert_eq!(due(6, 1.0), &[]);
    }

    #[test]
    fn the_outage_ends_before_the_expansion_and_the_rollback_follows_its_checkpoint() {
        let at = |a: Action| TIMELINE.iter().find(|(_, x)| *x == a).unwrap().0;
        assert!(at(Action::Mask) < at(Action::Unmask));
        assert!(at(Action::Unmask) < at(Action::Expand));
        assert!(at(Action::Expand) < at(Action::Checkpoint));
        assert!(at(Action::Checkpoint) < at(Action::Rollback));
        assert!(at(Action::Generate) < 1.0);
    }
}
