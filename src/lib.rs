//! virtgate: publishes ports of libvirt guests on NAT-ed networks and keeps them working.
//!
//! Architecture: [`config`] + [`facts`] -> [`plan`] (pure) -> [`firewall`] backends,
//! driven by one level-triggered [`reconcile`]. The [`cli`] (and the hook) are thin entry
//! points over it.

pub mod bridge;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod exec;
pub mod facts;
pub mod files;
pub mod firewall;
#[doc(hidden)]
pub mod fuzz;
pub mod heap;
pub mod hook;
pub mod logging;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod rtnl;
pub mod rules;
pub mod state;
