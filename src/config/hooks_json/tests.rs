use super::*;

/// The example shipped with libvirt-hook-qemu, comments and trailing comma included.
pub const UPSTREAM_EXAMPLE: &str = r#"{
// Domain name
"vmname": {
    // Private IP of the VM
    "private_ip": "192.168.122.10",
    /* Comment in a block */
    "port_map": {
        "tcp": [80, [443, 8443]],
        "udp": [53]
    },
    "port_range": [
        {
            // opens 8888-8889
            "init_port": 8888,
            "ports_num": 2,
            "protocol": "tcp"
        }
    ]
},
"othervm": [
    {
        "interface": "virbr0",
        "private_ip": "192.168.122.11",
        "public_ip": "203.0.113.1",
        "source_ip": "198.51.100.0/24",
        "port_map": {"tcp": [[2222, 22]]}
    },
    {
        "private_ip": "192.168.122.12",
        "public_ip": "203.0.113.5",
        "port_range": [{"init_port": 7000, "ports_num": 3, "protocol": "udp"}]
    }
],
}
"#;

#[test]
fn upstream_example_parses() {
    let p = parse(Path::new("hooks.json"), UPSTREAM_EXAMPLE).unwrap();
    assert_eq!(p.invalid_domains, Vec::<String>::new());
    let vm = &p
        .domains
        .iter()
        .find(|d| d.0.0.name == "vmname")
        .unwrap()
        .0
        .1;
    let shorts: Vec<String> = vm.iter().map(|f| f.spec.short()).collect();
    assert_eq!(
        shorts,
        [
            "default-route:80:80/tcp",
            "default-route:443:8443/tcp",
            "default-route:53:53/udp",
            "default-route:8888-8889:8888-8889/tcp"
        ]
    );
    assert!(vm.iter().all(|f| f.spec.listen == Listen::DefaultRoute));
    let other = &p
        .domains
        .iter()
        .find(|d| d.0.0.name == "othervm")
        .unwrap()
        .0
        .1;
    assert_eq!(other.len(), 2);
    assert_eq!(other[0].spec.sources[0].to_string(), "198.51.100.0/24");
    assert_eq!(other[1].spec.host_ports.len(), 3);
    assert!(
        p.diagnostics
            .iter()
            .any(|d| d.message.contains("trailing comma"))
    );
    assert_eq!(p.diagnostics[0].origin.line, 33);
}

#[test]
fn bad_entry_only_fails_its_domain() {
    let text = "{\n \"a\": {\"private_ip\": \"192.168.122.2\", \"port_map\": {\"icmp\": [1]}},\n \"b\": {\"private_ip\": \"192.168.122.3\", \"port_map\": {\"tcp\": [22]}}\n}";
    let p = parse(Path::new("h.json"), text).unwrap();
    assert_eq!(p.invalid_domains, vec!["a".to_string()]);
    assert_eq!(p.domains.len(), 1);
    let d = &p.diagnostics[0];
    assert!(d.message.contains("icmp"), "{d}");
    assert_eq!((d.origin.line, d.origin.col), (2, 2));
}

#[test]
fn huge_or_empty_ranges_and_duplicate_domains_are_errors() {
    for num in ["18446744073709551615", "0", "65536"] {
        let text = format!(
            r#"{{"x": {{"private_ip": "192.168.122.9", "port_range": [{{"init_port": 100, "ports_num": {num}, "protocol": "udp"}}]}}}}"#
        );
        let p = parse(Path::new("h.json"), &text).unwrap();
        assert_eq!(p.invalid_domains, ["x"], "{num}");
        assert!(p.diagnostics[0].message.contains("exceeds 65535"), "{num}");
    }
    for ip in ["127.0.0.1", "224.0.0.1", "255.255.255.255"] {
        let text = format!(
            r#"{{"x": {{"private_ip": "192.168.122.9", "public_ip": "{ip}", "port_map": {{"tcp": [22]}}}}}}"#
        );
        let p = parse(Path::new("h.json"), &text).unwrap();
        assert_eq!(p.invalid_domains, ["x"], "{ip}");
    }
    let text = "{\n \"a\": {\"private_ip\": \"192.168.122.2\"},\n \"a\": {\"private_ip\": \"192.168.122.3\"}\n}";
    let e = parse(Path::new("h.json"), text).unwrap_err();
    assert!(e.message.contains("given twice"), "{e}");
}

#[test]
fn syntax_error_position() {
    let e = parse(Path::new("h.json"), "{\n  // c\n  \"a\": {\"x\" 1}\n}").unwrap_err();
    assert_eq!(e.origin.line, 3);
}

#[test]
fn range_without_port_map() {
    let text = r#"{"x": {"private_ip": "192.168.122.9", "port_range": [{"init_port": 100, "ports_num": 1, "protocol": "udp"}]}}"#;
    let p = parse(Path::new("h.json"), text).unwrap();
    assert_eq!(
        p.domains[0].0.1[0].spec.short(),
        "default-route:100:100/udp"
    );
}
