//! The admin actor: owns the Unix socket and its accept loop. A restart rebinds the socket.

use std::path::PathBuf;
use std::sync::Arc;

use kameo::prelude::*;

use super::dispatch::Dispatcher;
use super::health::{Child, ChildHealth, child_actor};
use super::metrics::AbortOnDrop;
use crate::admin::server;
use crate::telemetry::names::events;

#[derive(Clone)]
pub struct AdminArgs {
    pub socket: PathBuf,
    pub group_gid: Option<u32>,
    pub limits: server::Limits,
    pub dispatcher: Dispatcher,
    pub health: Arc<ChildHealth>,
}

pub struct AdminActor {
    health: Arc<ChildHealth>,
    _accept: AbortOnDrop,
}

child_actor!(AdminActor, "admin", AdminArgs, server::AdminError);

impl Child for AdminActor {
    fn health(&self) -> &ChildHealth {
        &self.health
    }
}

impl AdminActor {
    /// Fails (and is retried with back-off) when the socket cannot be bound.
    async fn start(args: AdminArgs, _: ActorRef<Self>) -> Result<Self, server::AdminError> {
        let listener = server::bind(&args.socket, args.group_gid)?;
        tracing::info!(
            event = events::ADMIN_LISTENING,
            actor = "admin",
            socket = %args.socket.display(),
            "admin socket ready"
        );
        let accept = tokio::spawn(server::serve(
            listener,
            args.dispatcher.clone(),
            args.limits,
            args.group_gid,
        ));
        Ok(Self {
            health: args.health,
            _accept: AbortOnDrop(accept),
        })
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for AdminActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: admin actor told to crash");
    }
}
