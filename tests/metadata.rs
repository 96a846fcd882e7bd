//! Forwards carried in the domain's own `<metadata>` (virtgate's XML namespace): applied
//! from libvirt's status files and from the hook's stdin, on the kernel.

mod common;

use common::{Lab, LibvirtForm, PUBLIC, sa};

fn with_metadata(xml: &str, inner: &str, fail_closed: bool) -> String {
    xml.replace(
        "<metadata/>",
        &format!(
            "<metadata>\n      <vg:forwards xmlns:vg='https://virtgate.dev/xmlns/1' fail_closed='{fail_closed}'>{inner}</vg:forwards>\n    </metadata>"
        ),
    )
}

fn answers(lab: &Lab, port: u16, who: &str) -> bool {
    lab.client
        .tcp(sa(&format!("{PUBLIC}:{port}")))
        .is_ok_and(|s| s.starts_with(who))
}

#[test]
fn metadata_forwards() {
    if !common::can_run_netns("metadata_forwards") {
        return;
    }
    let lab = Lab::new(LibvirtForm::Nftables);
    lab.remove_domain_status("g2");
    // g3 runs (status file) and carries its forwards in <metadata>
    let status = format!(
        "<domstatus state='running'>\n{}</domstatus>\n",
        with_metadata(
            &lab.domain_xml("g3"),
            "<vg:forward spec='8085:80'/><vg:forward host_port='8086' guest_port='80' source='198.51.100.0/24'/>",
            false
        )
    );
    std::fs::write(lab.root().join("run/libvirt/qemu/g3.xml"), status).unwrap();
    lab.ping_from_host("192.168.100.10");
    lab.write_config("");
    let (ok, out, err) = lab.virtgate("nftables", &["check"]);
    assert!(
        ok && out.contains("1 domain(s), 2 forward(s)"),
        "{out}{err}"
    );
    lab.apply("nftables");
    let (_, st, _) = lab.virtgate("nftables", &["status"]);
    assert!(answers(&lab, 8085, "g3 port 80"), "{st}");
    assert!(
        !answers(&lab, 8086, "g3"),
        "source allow-list from metadata"
    );
    assert!(
        lab.client2
            .tcp(sa("198.51.100.1:8086"))
            .is_ok_and(|s| s.starts_with("g3"))
    );

    // the config file wins over metadata for the same domain
    lab.write_config("[domain.g3]\nforwards = [\"8083:80\"]\n");
    let (_, out, _) = lab.virtgate("nftables", &["check"]);
    assert!(out.contains("forwards in <metadata> ignored"), "{out}");
    lab.apply("nftables");
    assert!(answers(&lab, 8083, "g3") && !answers(&lab, 8085, "g3"));

    // through the hook: g2's metadata arrives on stdin
    let x2 = with_metadata(&lab.domain_xml("g2"), "<vg:forward spec='8087:80'/>", false);
    let (code, out, err) = lab.hook("nftables", &["qemu", "g2", "started", "begin", "-"], &x2);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(answers(&lab, 8087, "g2 port 80"));
    let (code, _, _) = lab.hook("nftables", &["qemu", "g2", "stopped", "end", "-"], &x2);
    assert_eq!(code, 0);
    assert!(!answers(&lab, 8087, "g2"));
    // broken metadata with fail_closed='true' refuses the start; without, it logs
    let bad = with_metadata(&lab.domain_xml("g2"), "<vg:forward spec='99999:80'/>", true);
    let (code, _, err) = lab.hook("nftables", &["qemu", "g2", "prepare", "begin", "-"], &bad);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("99999"), "{err}");
    let bad = with_metadata(
        &lab.domain_xml("g2"),
        "<vg:forward spec='99999:80'/>",
        false,
    );
    let (code, _, _) = lab.hook("nftables", &["qemu", "g2", "start", "begin", "-"], &bad);
    assert_eq!(code, 0);
    assert!(
        answers(&lab, 8083, "g3"),
        "another domain's broken metadata changes nothing for g3"
    );
}

/// The facts keep a domain's element as text, the config reads it: with its prefix
/// declared on an ancestor, or as the default namespace.
#[test]
fn metadata_is_kept_as_text_that_parses_on_its_own() {
    // the prefix declared on an ancestor, as a hand-written definition may have it
    let x = r#"<domain xmlns:vg='https://virtgate.dev/xmlns/1'><name>m</name>
  <metadata><other xmlns='urn:x'/><vg:forwards fail_closed='true'><vg:forward spec='8080:80' description='a &amp; b'/></vg:forwards></metadata>
  <devices/></domain>"#;
    let d = virtgate::facts::libvirt::parse_domain_xml(x).unwrap();
    let xml = d.metadata.as_deref().unwrap();
    let md = virtgate::config::metadata::from_xml(xml).unwrap();
    assert!(md.fail_closed);
    let f = md.forwards.unwrap();
    assert_eq!(f[0].host_ports.start, 8080);
    assert_eq!(f[0].description.as_deref(), Some("a & b"));
    // a default namespace works the same
    let x = "<domain><name>m</name><metadata><forwards xmlns='https://virtgate.dev/xmlns/1'><forward spec='81'/></forwards></metadata></domain>";
    let xml = virtgate::facts::libvirt::parse_domain_xml(x)
        .unwrap()
        .metadata
        .unwrap();
    assert!(
        virtgate::config::metadata::from_xml(&xml)
            .unwrap()
            .forwards
            .is_ok()
    );
    assert_eq!(
        virtgate::facts::libvirt::parse_domain_xml("<domain><name>m</name></domain>")
            .unwrap()
            .metadata,
        None
    );
}
