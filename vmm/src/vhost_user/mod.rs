//! vhost-user frontends: virtio devices whose data path runs in a backend
//! process. The VMM connects to the backend's socket, negotiates features,
//! hands it guest memory (the memfd) and each ring's kick and call
//! eventfds, then stays out of the way.

pub mod backend_channel;
pub mod blk;
pub mod deadline;
pub mod frontend;
pub mod listener;
pub mod net;
pub mod net_ctrl;
pub mod raw_request;
pub mod reconnect;
