//! The admin actor: owns the Unix socket and its accept loop. A restart rebinds the socket.

use std::path::PathBuf;
use std::sync::Arc;

use kameo::prelude::*;

use super::dispatch::Dispatcher;
use super::health::ChildHealth;
use super::metrics::AbortOnDrop;
use crate::admin::server;
use crate::telemetry::names::events;

#[derive(Clone)]
pub struct AdminArgs {
    pub socket: PathBuf,
    pub group_gid: Option<u32>,
    pub max_request_bytes: usize,
    pub dispatcher: Dispatcher,
    pub health: Arc<ChildHealth>,
}

pub struct AdminActor {
    health: Arc<ChildHealth>,
    _accept: AbortOnDrop,
}

impl Actor for AdminActor {
    type Args = AdminArgs;
    /// The actor fails to start (and is retried with back-off) when its socket cannot be bound.
    type Error = server::AdminError;

    fn name() -> &'static str {
        "admin"
    }

    async fn on_start(args: Self::Args, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
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
            args.max_request_bytes,
            args.group_gid,
        ));
        Ok(Self {
            health: args.health,
            _accept: AbortOnDrop(accept),
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        reason: ActorStopReason,
    ) -> Result<(), Self::Error> {
        self.health.on_stop(&reason.to_string());
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for AdminActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: admin actor told to crash");
    }
}
