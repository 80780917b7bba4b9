//! The trainer thread's wake-up channel: operator commands and "rows appended"
//! notifications share one queue, and [`wait`] turns it into what to do next.
//!
//! Commands never wait behind notifications: the replay actor signals every commit, so a
//! backlog can queue thousands of `Rows` while a step runs; [`wait`] folds all queued
//! `Rows` into one unit of work and answers the first command it finds.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Instant;

use super::trainer_commands::Cmd;

/// What wakes the trainer thread.
pub enum Wake {
    /// An operator command (answered between steps).
    Cmd(Cmd),
    /// The replay store appended rows.
    Rows,
}

/// What the thread waits for next.
#[derive(Debug, Clone, Copy)]
pub(super) enum Next {
    /// Work now (commands already queued go first).
    Now,
    /// Work at this instant, or earlier on a wake-up.
    At(Instant),
    /// Work on the next wake-up only.
    Wake,
}

pub(super) enum Woken {
    Cmd(Cmd),
    Work,
    Closed,
}

pub(super) fn wait(rx: &Receiver<Wake>, next: Next) -> Woken {
    let w = match next {
        Next::Now => match rx.try_recv() {
            Ok(w) => w,
            Err(TryRecvError::Empty) => return Woken::Work,
            Err(TryRecvError::Disconnected) => return Woken::Closed,
        },
        Next::At(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => return Woken::Work,
            Err(RecvTimeoutError::Disconnected) => return Woken::Closed,
        },
        Next::Wake => match rx.recv() {
            Ok(w) => w,
            Err(_) => return Woken::Closed,
        },
    };
    match w {
        Wake::Cmd(c) => Woken::Cmd(c),
        Wake::Rows => first_command_or_work(rx),
    }
}

/// After a `Rows`: drops the `Rows` queued behind it (one unit of work stands for all of
/// them) and returns the first command queued among them, if any.
fn first_command_or_work(rx: &Receiver<Wake>) -> Woken {
    loop {
        match rx.try_recv() {
            Ok(Wake::Rows) => continue,
            Ok(Wake::Cmd(c)) => return Woken::Cmd(c),
            Err(_) => return Woken::Work,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn pause(on: bool) -> Wake {
        Wake::Cmd(Cmd::Pause(on, tokio::sync::oneshot::channel().0))
    }

    /// Reproduces the shutdown that waited past `daemon.shutdown_timeout_s`: a backlog
    /// queued one `Rows` per commit ahead of `Stop`, and each wake-up trained one step.
    #[test]
    fn a_command_behind_many_row_notifications_is_answered_at_the_next_wake() {
        let (tx, rx) = channel();
        for _ in 0..10_000 {
            tx.send(Wake::Rows).unwrap();
        }
        tx.send(pause(true)).unwrap();
        tx.send(Wake::Rows).unwrap();
        assert!(matches!(
            wait(&rx, Next::Now),
            Woken::Cmd(Cmd::Pause(true, _))
        ));
        assert!(matches!(wait(&rx, Next::Now), Woken::Work));
        assert!(rx.try_recv().is_err(), "the trailing Rows was folded in");
    }

    #[test]
    fn commands_keep_their_order() {
        let (tx, rx) = channel();
        tx.send(Wake::Rows).unwrap();
        tx.send(pause(true)).unwrap();
        tx.send(pause(false)).unwrap();
        assert!(matches!(
            wait(&rx, Next::Wake),
            Woken::Cmd(Cmd::Pause(true, _))
        ));
        assert!(matches!(
            wait(&rx, Next::Wake),
            Woken::Cmd(Cmd::Pause(false, _))
        ));
        assert!(matches!(wait(&rx, Next::Now), Woken::Work));
        drop(tx);
        assert!(matches!(wait(&rx, Next::Now), Woken::Closed));
        assert!(matches!(wait(&rx, Next::Wake), Woken::Closed));
    }
}
