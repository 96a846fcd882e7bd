//! What a whole reconcile plans from, as one digest: the config files' bytes, the facts
//! (with time only as far as it decides which leases are valid), the backend and this
//! release. While the digest and the kernel's generation are what the state recorded
//! after the last whole reconcile, the plan would be the same and the kernel still holds
//! it: `apply` (and every daemon wake-up) then plans nothing.

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::facts::Facts;

/// Bumped whenever the planner's output for the same inputs may differ.
const PLANNER: &[u8] = b"virtgate planner inputs 2";

/// What a whole reconcile plans from, digested: `digest` covers everything, `rest`
/// everything but the config files' bytes (the facts, the backend, this release, which
/// domains' config is invalid). While `rest` stays, a change of the config is a change
/// of what its domains say ([`super::one_domain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub digest: String,
    pub rest: String,
}

/// The digest of a whole reconcile's inputs, or None when the config was not read whole
/// (then nothing is skipped).
pub fn digest(config: &Config, facts: &Facts, backend: &str) -> Option<String> {
    of(config, facts, backend).map(|i| i.digest)
}

/// [`Inputs`] of a whole reconcile, or None when the config was not read whole.
pub fn of(config: &Config, facts: &Facts, backend: &str) -> Option<Inputs> {
    if config.fingerprint.is_empty() {
        return None;
    }
    let rest = rest(config, facts, backend)?;
    let mut h = Sha256::new();
    for part in [rest.as_bytes(), &config.fingerprint] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    Some(Inputs {
        digest: crate::model::hex(&h.finalize()),
        rest,
    })
}

/// Everything but the config files' bytes.
fn rest(config: &Config, facts: &Facts, backend: &str) -> Option<String> {
    let mut h = Sha256::new();
    for part in [
        PLANNER,
        env!("CARGO_PKG_VERSION").as_bytes(),
        backend.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    // `now` counts only through the leases it leaves valid
    let valid: Vec<_> = facts
        .leases
        .iter()
        .filter(|l| l.expiry > facts.now)
        .collect();
    let Facts {
        domains,
        networks,
        leases: _,
        neighbours,
        snooped,
        default_route_v4,
        sysctls,
        xt_forward,
        host_addresses,
        now: _,
    } = facts;
    // what the planner reads of a snooped address (not when it was last seen)
    let snooped: Vec<_> = snooped.iter().map(|s| (&s.tap, &s.mac, s.ip)).collect();
    let parts = (
        &config.invalid_domains,
        domains,
        networks,
        &valid,
        neighbours,
        &snooped,
        default_route_v4,
        sysctls,
        xt_forward,
        host_addresses,
    );
    // postcard: compact, no text to format or escape (serde_json took a third of an
    // unchanged apply at 10,000 forwards)
    let bytes = postcard::to_allocvec(&parts).ok()?;
    h.update(&bytes);
    Some(crate::model::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::FactsBuilder;

    fn config(text: &[u8]) -> Config {
        Config {
            fingerprint: Sha256::digest(text).to_vec(),
            ..Default::default()
        }
    }

    fn facts(now: u64) -> Facts {
        FactsBuilder::network("default", "virbr0", &["192.168.122.1/24"])
            .domain("web", "52:54:00:00:00:01", "vnet0")
            .lease("52:54:00:00:00:01", "192.168.122.10", 2000)
            .now(now)
            .build()
    }

    #[test]
    fn time_counts_only_through_the_leases_it_leaves_valid() {
        let c = config(b"a");
        let d = |now| digest(&c, &facts(now), "nftables").unwrap();
        assert_eq!(d(1000), d(1999));
        assert_ne!(d(1999), d(2000), "the lease expired");
    }

    #[test]
    fn every_input_counts() {
        let base = digest(&config(b"a"), &facts(1000), "nftables").unwrap();
        assert_ne!(
            base,
            digest(&config(b"b"), &facts(1000), "nftables").unwrap()
        );
        assert_ne!(
            base,
            digest(&config(b"a"), &facts(1000), "iptables").unwrap()
        );
        let mut f = facts(1000);
        f.domains[0].nics[0].tap = Some("vnet9".into());
        assert_ne!(base, digest(&config(b"a"), &f, "nftables").unwrap());
        let mut f = facts(1000);
        f.sysctls.ip_forward = Some(false);
        assert_ne!(base, digest(&config(b"a"), &f, "nftables").unwrap());
        // the rest is all but the config's bytes
        let rest = |text: &[u8]| of(&config(text), &facts(1000), "nftables").unwrap().rest;
        assert_eq!(rest(b"a"), rest(b"b"));
        let mut invalid = config(b"a");
        invalid.invalid_domains.insert("web".into());
        assert_ne!(
            rest(b"a"),
            of(&invalid, &facts(1000), "nftables").unwrap().rest
        );
        // a config read in part is never skipped on
        assert_eq!(digest(&Config::default(), &facts(1000), "nftables"), None);
    }
}
