use std::path::Path;

use super::*;
use crate::model::WhenStopped;

#[test]
fn when_stopped_is_read_and_a_bad_value_is_named_where_it_is() {
    let p = Path::new("v.toml");
    let ok = parse(
        p,
        "[domain.a]\nwhen_stopped = \"reject\"\nforwards = [\"80\"]\n",
    )
    .unwrap();
    assert_eq!(ok.domains[0].0.0.when_stopped, WhenStopped::Reject);
    let dflt = parse(p, "[domain.a]\nforwards = [\"80\"]\n").unwrap();
    assert_eq!(dflt.domains[0].0.0.when_stopped, WhenStopped::Pass);
    let bad = parse(
        p,
        "[domain.a]\nforwards = [\"80\"]\nwhen_stopped = \"drop\"\n",
    )
    .unwrap();
    assert!(bad.domains.is_empty() && bad.invalid_domains == ["a"]);
    let msg = bad.diagnostics[0].to_string();
    assert!(
        msg.contains("v.toml:3") && msg.contains("\"pass\" or \"reject\""),
        "{msg}"
    );
}
