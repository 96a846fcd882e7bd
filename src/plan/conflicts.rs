//! Whether a planned rule overlaps one another domain holds (the spec-level conflicts
//! are [`crate::model::conflicts`]).

use crate::model::{ForwardSpec, Listen};
use crate::plan::{ListenOn, Rule};

/// Whether two rules could receive the same packet.
pub(crate) fn held_overlaps(a: &Rule, b: &super::Held) -> bool {
    let listen = match (&a.listen, b.listen) {
        (ListenOn::Address(x), ListenOn::Address(y)) => x == y,
        (ListenOn::Interface(x), ListenOn::Interface(y)) => x == y,
        _ => true,
    };
    a.family == b.family
        && a.proto == b.proto
        && (listen || (a.localhost && b.localhost))
        && a.host_ports.overlaps(&b.host_ports)
}

/// Whether a forward could receive a packet an installed rule receives.
pub fn spec_overlaps_rule(spec: &ForwardSpec, r: &super::Held) -> bool {
    let listen = match (&spec.listen, r.listen) {
        (Listen::Address(a), ListenOn::Address(b)) => a == b,
        (Listen::Interface(a), ListenOn::Interface(b)) => a == b,
        _ => true,
    };
    spec.proto == r.proto
        && spec.allows_family(r.family)
        && (listen || (spec.localhost && r.localhost))
        && spec.host_ports.overlaps(&r.host_ports)
}
