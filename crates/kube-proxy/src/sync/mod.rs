//! The sync loop: the event loop that applies source events to the model and drives syncs,
//! the scheduler that says when, the dataplanes it drives, and the sync status the health
//! server reads.

pub mod dataplane;
pub mod event_loop;
pub mod object_log;
pub mod scheduler;
pub mod sync_status;
