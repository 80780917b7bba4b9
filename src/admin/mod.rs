//! The admin interface: the JSON-lines protocol shared by the daemon's socket server and
//! `mbtd ctl`, the server's connection handling, and the client.

pub mod client;
pub mod protocol;
pub mod request;
pub mod server;
pub mod server_events;
