//! The serving loop of `mbtd node`: requests from the coordinator go, in arrival order,
//! to one [`BranchHost`] on a dedicated thread (a host's state is sequential: a forward,
//! then its backward, then its update), and each answer goes back on the swarm.

use std::sync::mpsc as std_mpsc;
use std::thread;

use mbtd_core::model::remote::BranchHost;
use tokio::sync::mpsc;

use crate::endpoint::{Endpoint, Incoming};

/// Serves `incoming` with `host` until the endpoint stops; returns the host.
pub async fn serve(
    endpoint: Endpoint,
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
    mut host: BranchHost,
) -> BranchHost {
    let (work_tx, work_rx) = std_mpsc::channel::<Incoming>();
    let responder = endpoint.clone();
    let worker = thread::Builder::new()
        .name("mbtd-branch-host".into())
        .spawn(move || {
            for req in work_rx {
                let reply = host.handle_bytes(&req.bytes);
                responder.respond(req.id, reply);
            }
            host
        })
        .expect("spawn the branch host thread");
    while let Some(req) = incoming.recv().await {
        if work_tx.send(req).is_err() {
            break;
        }
    }
    drop(work_tx);
    tokio::task::spawn_blocking(move || worker.join().expect("branch host thread"))
        .await
        .expect("join the branch host thread")
}
