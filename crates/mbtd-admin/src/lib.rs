//! The admin interface's wire side: the JSON-lines protocol that the daemon's socket server
//! and `mbtd ctl` share, and the blocking client. Nothing here knows about actors.

pub mod client;
pub mod protocol;
