//! Real-kernel test harness: network namespaces the test creates and deletes, libvirt's
//! exact firewall rules loaded in the "host" namespace, guest servers and clients running
//! in threads that entered a namespace with setns(2). Nothing touches the root namespace.

#![allow(dead_code)]

mod fixtures;
mod lab;
pub mod libvirt_rules;
mod netns;
mod runners;
mod serve;

// not every test binary uses these free functions (the methods on Lab, all do)
#[allow(unused_imports)]
pub use fixtures::*;
pub use lab::*;
pub use netns::*;
#[allow(unused_imports)]
pub use runners::*;
pub use serve::*;
