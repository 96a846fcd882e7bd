//! The change a hook or `apply` makes is the delta, on the real kernel: other forwards
//! keep their counters and the table stays the same object; a kernel that no longer holds
//! what the state says is noticed (`status` drifted) and repaired, also when a hook's
//! delta is refused; the iptables backend's port buckets forward real traffic.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

/// Domains hooks report as running (libvirt's status files do not list them).
fn lab() -> Lab {
    let lab = Lab::new(LibvirtForm::Iptables);
    for g in ["g1", "g2", "g3"] {
        lab.remove_domain_status(g);
    }
    lab
}

fn start(lab: &Lab, backend: &str, g: &str) {
    let (code, out, err) = lab.hook(
        backend,
        &["qemu", g, "started", "begin", "-"],
        &lab.domain_xml(g),
    );
    assert_eq!((code, out.as_str()), (0, ""), "{g} started: {err}");
}

fn stop(lab: &Lab, backend: &str, g: &str) {
    let (code, _, err) = lab.hook(
        backend,
        &["qemu", g, "stopped", "end", "-"],
        &lab.domain_xml(g),
    );
    assert_eq!(code, 0, "{g} stopped: {err}");
}

fn status(lab: &Lab, backend: &str) -> serde_json::Value {
    let (ok, out, err) = lab.virtgate(backend, &["status", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn row<'a>(v: &'a serde_json::Value, dom: &str, port: &str) -> &'a serde_json::Value {
    v["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == dom && r["host_ports"] == port)
        .unwrap_or_else(|| panic!("no row {dom} {port}: {v}"))
}

fn table_handle(lab: &Lab) -> String {
    let out = lab.host.exec(&["nft", "-a", "list", "tables"]);
    out.lines()
        .find(|l| l.contains("inet virtgate"))
        .unwrap_or_else(|| panic!("no table: {out}"))
        .to_string()
}

/// Someone deletes g2's DNAT element by hand.
fn drop_g2_element(lab: &Lab) {
    lab.host.exec(&[
        "nft",
        "delete",
        "element",
        "inet",
        "virtgate",
        "dnat_any4",
        "{ tcp . 8081 : 192.168.122.11 . 80 }",
    ]);
}

const CONFIG: &str = "[domain.g1]\nforwards = [\"8080:80\"]\n[domain.g2]\nforwards = [\"8081:80\"]\n[domain.g3]\nforwards = [\"8083:80\"]\n";

#[test]
fn hooks_change_only_their_domain() {
    if !common::can_run_netns("hooks_change_only_their_domain") {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    start(&lab, "nftables", "g1");
    let handle = table_handle(&lab);
    let c = &lab.client;
    for _ in 0..3 {
        assert!(
            c.tcp(sa(&format!("{PUBLIC}:8080")))
                .unwrap()
                .starts_with("g1")
        );
    }
    let before = row(&status(&lab, "nftables"), "g1", "8080")["packets"]
        .as_u64()
        .unwrap();
    assert!(before > 0, "g1's counter moved");
    // another domain starts and stops: g1's elements (and their counters) are untouched,
    // the table is the same object
    start(&lab, "nftables", "g2");
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2")
    );
    stop(&lab, "nftables", "g2");
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8081"))).is_err(),
        "g2's forward is gone"
    );
    let v = status(&lab, "nftables");
    assert_eq!(
        row(&v, "g1", "8080")["packets"].as_u64().unwrap(),
        before,
        "{v}"
    );
    assert_eq!(row(&v, "g1", "8080")["state"], "active", "{v}");
    assert_eq!(table_handle(&lab), handle, "the table was not replaced");
    // apply with nothing to change writes nothing
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    // one forward more: applied as a delta too
    lab.write_config(&CONFIG.replace("[\"8080:80\"]", "[\"8080:80\", \"8090:80\"]"));
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("applied"), "{out}");
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8090")))
            .unwrap()
            .starts_with("g1")
    );
    let v = status(&lab, "nftables");
    assert!(
        row(&v, "g1", "8080")["packets"].as_u64().unwrap() >= before,
        "{v}"
    );
    assert_eq!(table_handle(&lab), handle, "the table was not replaced");
    stop(&lab, "nftables", "g1");
}

#[test]
fn drift_of_one_element_is_found_and_repaired() {
    if !common::can_run_netns("drift_of_one_element_is_found_and_repaired") {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    start(&lab, "nftables", "g1");
    start(&lab, "nftables", "g2");
    let c = &lab.client;
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2")
    );
    // someone deletes g2's DNAT element by hand
    drop_g2_element(&lab);
    assert!(c.tcp(sa(&format!("{PUBLIC}:8081"))).is_err());
    assert_eq!(
        row(&status(&lab, "nftables"), "g2", "8081")["state"],
        "drifted"
    );
    // stopping g2 now asks the kernel to delete what is no longer there: the delta is
    // refused, the whole ruleset is written instead, and it is right
    stop(&lab, "nftables", "g2");
    assert_eq!(
        row(&status(&lab, "nftables"), "g1", "8080")["state"],
        "active"
    );
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8080")))
            .unwrap()
            .starts_with("g1")
    );
    // again, and `apply` repairs it
    start(&lab, "nftables", "g2");
    drop_g2_element(&lab);
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("applied"), "{out}");
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2")
    );
    assert_eq!(
        row(&status(&lab, "nftables"), "g2", "8081")["state"],
        "active"
    );
}

#[test]
fn iptables_buckets_forward_and_hooks_rewrite_only_their_chains() {
    if !common::can_run_netns("iptables_buckets_forward_and_hooks_rewrite_only_their_chains") {
        return;
    }
    let lab = lab();
    // 100 forwards for g1 (bucketed by port), one range that spans buckets, and g2
    let many: Vec<String> = (0..100)
        .map(|i| format!("\"{}:80\"", 10000 + i * 7))
        .collect();
    lab.write_config(&format!(
        "[domain.g1]\nforwards = [{}, \"9000-9002:9100-9102\"]\n[domain.g2]\nforwards = [\"20001:80\"]\n",
        many.join(", ")
    ));
    start(&lab, "iptables", "g1");
    let nat = lab.host.exec(&["iptables-save", "-t", "nat"]);
    assert!(nat.contains("-j VIRTGATE_DNAT_T9"), "bucketed:\n{nat}");
    let c = &lab.client;
    for port in [10000, 10000 + 99 * 7, 10000 + 50 * 7] {
        assert!(
            c.tcp(sa(&format!("{PUBLIC}:{port}")))
                .unwrap()
                .starts_with("g1"),
            "port {port}"
        );
    }
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:9001")))
            .unwrap()
            .starts_with("g1 port 9101")
    );
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:10001"))).is_err(),
        "no forward on 10001"
    );
    // the leaf of port 10000, with its counters (it saw a connection)
    let leaf = || {
        lab.host
            .exec(&["iptables-save", "-c", "-t", "nat"])
            .lines()
            .filter(|l| l.contains("-A VIRTGATE_DNAT_T9_24 "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let leaf_before = leaf();
    assert!(
        leaf_before.iter().any(|l| l.starts_with("[1:")),
        "{leaf_before:?}"
    );
    start(&lab, "iptables", "g2");
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:20001")))
            .unwrap()
            .starts_with("g2")
    );
    // g1's chains were not rewritten: their counters are still there
    assert_eq!(leaf_before, leaf());
    let (ok, out, _) = lab.virtgate("iptables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    stop(&lab, "iptables", "g2");
    stop(&lab, "iptables", "g1");
    let nat = lab.host.exec(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("VIRTGATE"), "all gone:\n{nat}");
}

#[test]
fn deltas_carry_ranges_and_allow_lists() {
    if !common::can_run_netns("deltas_carry_ranges_and_allow_lists") {
        return;
    }
    let lab = lab();
    lab.write_config(
        "[domain.g2]\nforwards = [\"8081:80\"]\n\
         [domain.g1]\nforwards = [\"9100-9102\", \"9000-9002:9100-9102\"]\n\
         [[domain.g1.forward]]\nhost_port = 8084\nguest_port = 80\nsource = [\"203.0.113.0/24\"]\n",
    );
    // g2 creates the table; g1 arrives as a delta (interval elements over netlink, a chain
    // and a source set through nft)
    start(&lab, "nftables", "g2");
    let handle = table_handle(&lab);
    start(&lab, "nftables", "g1");
    assert_eq!(table_handle(&lab), handle, "a delta, not a new table");
    let (c, d) = (&lab.client, &lab.client2);
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:9101")))
            .unwrap()
            .starts_with("g1 port 9101")
    );
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:9002")))
            .unwrap()
            .starts_with("g1 port 9102")
    );
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8084")))
            .unwrap()
            .starts_with("g1")
    );
    assert!(
        d.tcp(sa("198.51.100.1:8084")).is_err(),
        "source not allowed"
    );
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(
        ok && out.starts_with("unchanged"),
        "the kernel holds the plan: {out}"
    );
    // and it goes again as a delta
    stop(&lab, "nftables", "g1");
    assert!(c.tcp(sa(&format!("{PUBLIC}:9101"))).is_err());
    assert!(c.tcp(sa(&format!("{PUBLIC}:8084"))).is_err());
    assert!(
        c.tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2")
    );
    assert_eq!(table_handle(&lab), handle);
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    let table = lab.host.exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(
        !table.contains("chain f_") && !table.contains("set s_"),
        "{table}"
    );
}

/// The nf_tables generation recorded in the state.
fn recorded_generation(lab: &Lab) -> Option<u64> {
    let text = std::fs::read_to_string(lab.state_dir().join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["generation"].as_u64()
}

#[test]
fn generation_spares_the_read_back_and_misses_nothing() {
    if !common::can_run_netns("generation_spares_the_read_back_and_misses_nothing") {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    start(&lab, "nftables", "g1");
    // the first apply reads the kernel back in full and records the generation it saw
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    let seen = recorded_generation(&lab).expect("a generation after apply");
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    assert_eq!(recorded_generation(&lab), Some(seen));
    // a hook's delta is the one transaction after it: the state follows the kernel
    start(&lab, "nftables", "g2");
    assert_eq!(recorded_generation(&lab), Some(seen + 1));
    // a change elsewhere in the ruleset: compared in full, still in sync, nothing written
    lab.host.exec(&["nft", "add", "table", "ip", "unrelated"]);
    let handle = table_handle(&lab);
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}");
    assert_eq!(table_handle(&lab), handle);
    let now = recorded_generation(&lab).expect("a generation");
    assert!(now > seen + 1, "{now} after {seen}");
    // a change to virtgate's own table is found, whatever was recorded
    drop_g2_element(&lab);
    assert_eq!(
        row(&status(&lab, "nftables"), "g2", "8081")["state"],
        "drifted"
    );
    let (ok, out, _) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("applied"), "{out}");
    assert!(
        lab.client
            .tcp(sa(&format!("{PUBLIC}:8081")))
            .unwrap()
            .starts_with("g2")
    );
    assert_eq!(
        row(&status(&lab, "nftables"), "g2", "8081")["state"],
        "active"
    );
}

/// The digest of the inputs recorded in the state after a whole reconcile.
fn recorded_inputs(lab: &Lab) -> Option<String> {
    let text = std::fs::read_to_string(lab.state_dir().join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["inputs"]["digest"].as_str().map(str::to_string)
}

fn answers(lab: &Lab, port: u16, guest: &str) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:{port}")))
        .is_ok_and(|r| r.starts_with(guest))
}

#[test]
fn an_unchanged_apply_plans_nothing_and_misses_no_change() {
    if !common::can_run_netns("an_unchanged_apply_plans_nothing_and_misses_no_change") {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    lab.write_domain_status("g1");
    let apply = |want: &str| {
        let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
        assert!(ok && out.starts_with(want), "want {want}: {out} {err}");
        out
    };
    apply("applied");
    // the first apply that finds the kernel in sync records what it planned from (a
    // change made by more than one transaction leaves no generation to trust)
    apply("unchanged");
    let first = recorded_inputs(&lab).expect("inputs recorded after an unchanged apply");
    // nothing changed: nothing planned, and it says what is active
    let (ok, out, err) = lab.virtgate("nftables", &["-vv", "apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out} {err}");
    assert!(out.contains("for 1 forward(s)"), "{out}");
    assert!(err.contains("nothing to plan"), "{err}");
    assert_eq!(recorded_inputs(&lab).as_deref(), Some(first.as_str()));
    assert!(answers(&lab, 8080, "g1"));
    // the facts change (g2 runs, as libvirt's files say) with the kernel untouched
    lab.write_domain_status("g2");
    apply("applied");
    assert!(
        answers(&lab, 8081, "g2"),
        "g2's forward after its status file appeared"
    );
    apply("unchanged");
    let second = recorded_inputs(&lab).expect("inputs");
    assert_ne!(second, first);
    // the config changes
    lab.write_config(&format!("{CONFIG}[domain.g4]\nforwards = []\n").replace(
        "forwards = [\"8080:80\"]",
        "forwards = [\"8080:80\", \"8090:80\"]",
    ));
    apply("applied");
    assert!(answers(&lab, 8090, "g1"), "the forward added to the config");
    apply("unchanged");
    // the kernel changes (someone deletes an element): seen through the generation
    drop_g2_element(&lab);
    assert!(!answers(&lab, 8081, "g2"));
    apply("applied");
    assert!(answers(&lab, 8081, "g2"), "repaired");
    // a hook's change: the next apply plans again (and finds it in sync)
    stop(&lab, "nftables", "g3");
    assert_eq!(
        recorded_inputs(&lab),
        None,
        "a hook clears the recorded inputs"
    );
    apply("unchanged");
    assert!(recorded_inputs(&lab).is_some());
    // the backend given on the command line counts
    let (ok, out, err) = lab.virtgate("iptables", &["apply"]);
    assert!(ok && out.starts_with("applied"), "{out} {err}");
    assert!(answers(&lab, 8080, "g1") && answers(&lab, 8081, "g2"));
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("applied"), "{out} {err}");
}

/// `status` after an apply that changed nothing shows the statuses that apply planned,
/// without planning again, and the same as planning would; once anything it planned from
/// changes (here libvirt's files, with no apply since), it plans again.
#[test]
fn status_shows_the_last_plan_while_nothing_changed_and_plans_again_after() {
    if !common::can_run_netns(
        "status_shows_the_last_plan_while_nothing_changed_and_plans_again_after",
    ) {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    lab.write_domain_status("g1");
    for want in ["applied", "unchanged"] {
        let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
        assert!(ok && out.starts_with(want), "{out}{err}");
    }
    let kept = lab.state_dir().join("statuses");
    assert!(
        kept.exists(),
        "the statuses are kept with the recorded inputs"
    );
    let status = || {
        let (ok, out, err) = lab.virtgate("nftables", &["-vv", "status", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v, err)
    };
    let row = |v: &serde_json::Value, d: &str| -> serde_json::Value {
        v["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["domain"] == d)
            .cloned()
            .unwrap()
    };
    let (fast, said) = status();
    assert!(said.contains("not planned again"), "{said}");
    assert_eq!(row(&fast, "g1")["state"], "active", "{fast}");
    assert_eq!(row(&fast, "g2")["state"], "stopped", "{fast}");
    // the same, planned (no file to take them from)
    std::fs::remove_file(&kept).unwrap();
    let (slow, said) = status();
    assert!(!said.contains("not planned again"), "{said}");
    assert_eq!(fast, slow);
    // a file from another plan is not taken either
    std::fs::write(&kept, b"not what was planned").unwrap();
    assert_eq!(status().0, slow);
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}{err}");
    // g2 runs as libvirt's files say, nobody applied: planned again, not the kept statuses
    lab.write_domain_status("g2");
    let (v, said) = status();
    assert!(!said.contains("not planned again"), "{said}");
    let g2 = row(&v, "g2");
    assert_eq!(g2["state"], "pending", "{v}");
    assert!(
        g2["note"]
            .as_str()
            .is_some_and(|n| n.contains("not applied yet")),
        "{v}"
    );
}

/// From no table, `apply` makes the table's shape in one `nft -f` and puts the elements
/// in over netlink, several messages per set at this size: the kernel then holds exactly
/// what one `nft -f` of `render`'s text makes, and a forward among them answers.
#[test]
fn a_table_made_from_nothing_is_what_render_describes() {
    if !common::can_run_netns("a_table_made_from_nothing_is_what_render_describes") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    let many: Vec<String> = (0..2500).map(|i| format!("\"{}:80\"", 20000 + i)).collect();
    lab.write_config(&format!(
        "[domain.g1]\nforwards = [{}, \"9000-9002:9100-9102\"]\n\
         [[domain.g1.forward]]\nhost_port = 8081\nguest_port = 80\nsource = [\"203.0.113.0/24\"]\n\
         [domain.g2]\nforwards = [\"8080:80\", \"5353:53535/udp\"]\n",
        many.join(", ")
    ));
    let (ok, rendered, err) = lab.virtgate("nftables", &["render"]);
    assert!(ok, "render: {err}");
    lab.apply("nftables");
    let made = lab.host.exec(&["nft", "list", "table", "inet", "virtgate"]);
    // the same text through `nft -f`, in a namespace of its own
    let other = common::Netns::new("rnd");
    // the table alone: the accepts after it go in libvirt's chains, which are not there
    let end = rendered.find("\n}\n").expect("the table's end") + 3;
    other.exec_stdin(&["nft", "-f", "-"], &rendered[..end]);
    let want = other.exec(&["nft", "list", "table", "inet", "virtgate"]);
    assert!(made.lines().count() > 2500, "{made}");
    assert_eq!(made, want, "{}", common::diff(&want, &made));
    assert!(answers(&lab, 22499, "g1"), "the last of 2,500 forwards");
    assert!(answers(&lab, 9001, "g1"), "a range");
    assert!(answers(&lab, 8080, "g2"), "another domain's forward");
    // and a second apply finds it in sync
    let (ok, out, err) = lab.virtgate("nftables", &["apply"]);
    assert!(ok && out.starts_with("unchanged"), "{out}{err}");
}

/// On the iptables backend a hook returns once iptables-restore's commits are announced
/// (not when the process has exited): the forward answers at once, and the generation
/// the hook records is the kernel's, so the next `apply` needs no read-back.
#[test]
fn iptables_hooks_record_the_generation_their_restore_made() {
    if !common::can_run_netns("iptables_hooks_record_the_generation_their_restore_made") {
        return;
    }
    let lab = lab();
    lab.write_config(CONFIG);
    start(&lab, "iptables", "g1");
    // a whole apply reads the kernel back and records the generation hooks build on
    let (ok, out, err) = lab.virtgate("iptables", &["apply"]);
    assert!(ok, "{out}{err}");
    assert!(
        recorded_generation(&lab).is_some(),
        "a generation after apply"
    );
    for _ in 0..3 {
        start(&lab, "iptables", "g2");
        assert!(answers(&lab, 8081, "g2"), "g2 right after its hook");
        let hooked = recorded_generation(&lab).expect("a generation after the hook");
        let (ok, out, err) = lab.virtgate("iptables", &["apply"]);
        assert!(ok && out.starts_with("unchanged"), "{out}{err}");
        assert_eq!(
            recorded_generation(&lab),
            Some(hooked),
            "apply saw the same"
        );
        stop(&lab, "iptables", "g2");
        assert!(!answers(&lab, 8081, "g2"), "g2 gone right after its hook");
        let hooked = recorded_generation(&lab).expect("a generation after the hook");
        let (ok, out, err) = lab.virtgate("iptables", &["apply"]);
        assert!(ok && out.starts_with("unchanged"), "{out}{err}");
        assert_eq!(
            recorded_generation(&lab),
            Some(hooked),
            "apply saw the same"
        );
    }
}
