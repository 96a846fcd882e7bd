//! libvirt's exact firewall rules for two NAT networks (LIBVIRT-FACTS.md), as libvirt 9.x
//! writes them with iptables and libvirt >= 10.4 with nftables, plus libvirt's reload.

use super::Netns;

/// (bridge, IPv4 subnet)
pub const NETS: [(&str, &str); 2] = [
    ("virbr1", "192.168.100.0/24"),
    ("virbr0", "192.168.122.0/24"),
];
/// virbr0 also has a routed IPv6 subnet (no `<nat ipv6='yes'/>`).
pub const NET6: (&str, &str) = ("virbr0", "fd00:122::/64");

fn filter_rules_v4() -> String {
    let mut s = String::new();
    for (br, net) in NETS {
        s.push_str(&format!(
            "-A LIBVIRT_INP -i {br} -p udp -m udp --dport 53 -j ACCEPT\n-A LIBVIRT_INP -i {br} -p tcp -m tcp --dport 53 -j ACCEPT\n-A LIBVIRT_INP -i {br} -p udp -m udp --dport 67 -j ACCEPT\n-A LIBVIRT_INP -i {br} -p tcp -m tcp --dport 67 -j ACCEPT\n-A LIBVIRT_OUT -o {br} -p udp -m udp --dport 53 -j ACCEPT\n-A LIBVIRT_OUT -o {br} -p tcp -m tcp --dport 53 -j ACCEPT\n-A LIBVIRT_OUT -o {br} -p udp -m udp --dport 68 -j ACCEPT\n-A LIBVIRT_OUT -o {br} -p tcp -m tcp --dport 68 -j ACCEPT\n-A LIBVIRT_FWI -d {net} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A LIBVIRT_FWI -o {br} -j REJECT --reject-with icmp-port-unreachable\n-A LIBVIRT_FWO -s {net} -i {br} -j ACCEPT\n-A LIBVIRT_FWO -i {br} -j REJECT --reject-with icmp-port-unreachable\n-A LIBVIRT_FWX -i {br} -o {br} -j ACCEPT\n"
        ));
    }
    s
}

fn nat_rules_v4() -> String {
    let mut s = String::new();
    for (_, net) in NETS {
        s.push_str(&format!(
            "-A LIBVIRT_PRT -s {net} -d 224.0.0.0/24 -j RETURN\n-A LIBVIRT_PRT -s {net} -d 255.255.255.255/32 -j RETURN\n-A LIBVIRT_PRT -s {net} ! -d {net} -p tcp -j MASQUERADE --to-ports 1024-65535\n-A LIBVIRT_PRT -s {net} ! -d {net} -p udp -j MASQUERADE --to-ports 1024-65535\n-A LIBVIRT_PRT -s {net} ! -d {net} -j MASQUERADE\n"
        ));
    }
    s
}

const FILTER_CHAINS: &str = ":LIBVIRT_FWI - [0:0]\n:LIBVIRT_FWO - [0:0]\n:LIBVIRT_FWX - [0:0]\n:LIBVIRT_INP - [0:0]\n:LIBVIRT_OUT - [0:0]\n";
const FILTER_JUMPS: &str = "-A INPUT -j LIBVIRT_INP\n-A FORWARD -j LIBVIRT_FWX\n-A FORWARD -j LIBVIRT_FWI\n-A FORWARD -j LIBVIRT_FWO\n-A OUTPUT -j LIBVIRT_OUT\n";

/// The IPv4 rules (iptables-restore input): private chains and their jumps.
pub fn iptables_v4() -> String {
    format!(
        "*nat\n:LIBVIRT_PRT - [0:0]\n-A POSTROUTING -j LIBVIRT_PRT\n{}COMMIT\n*filter\n{FILTER_CHAINS}{FILTER_JUMPS}{}COMMIT\n",
        nat_rules_v4(),
        filter_rules_v4()
    )
}

fn filter_rules_v6() -> String {
    let (br6, net6) = NET6;
    let mut s = format!(
        "-A LIBVIRT_FWI -d {net6} -o {br6} -j ACCEPT\n-A LIBVIRT_FWO -s {net6} -i {br6} -j ACCEPT\n"
    );
    for (br, _) in NETS {
        s.push_str(&format!(
            "-A LIBVIRT_FWI -o {br} -j REJECT --reject-with icmp6-port-unreachable\n-A LIBVIRT_FWO -i {br} -j REJECT --reject-with icmp6-port-unreachable\n-A LIBVIRT_FWX -i {br} -o {br} -j ACCEPT\n"
        ));
    }
    s
}

pub fn iptables_v6() -> String {
    format!(
        "*filter\n{FILTER_CHAINS}{FILTER_JUMPS}{}COMMIT\n",
        filter_rules_v6()
    )
}

/// libvirt's reload on the iptables form: its chains are flushed and refilled, its jumps
/// are inserted only when missing (here: present, so untouched).
pub fn reload_iptables(host: &Netns, legacy: bool) {
    let (r4, r6) = if legacy {
        ("iptables-legacy-restore", "ip6tables-legacy-restore")
    } else {
        ("iptables-restore", "ip6tables-restore")
    };
    host.exec_stdin(
        &[r4, "--noflush"],
        &format!(
            "*nat\n:LIBVIRT_PRT - [0:0]\n{}COMMIT\n*filter\n{FILTER_CHAINS}{}COMMIT\n",
            nat_rules_v4(),
            filter_rules_v4()
        ),
    );
    host.exec_stdin(
        &[r6, "--noflush"],
        &format!("*filter\n{FILTER_CHAINS}{}COMMIT\n", filter_rules_v6()),
    );
}

/// Rules of libvirt's nftables chains, in list order.
fn nft_chain_rules(fam: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut cross = Vec::new();
    let mut nat = Vec::new();
    if fam == "ip" {
        for (br, net) in NETS {
            input.push(format!(
                "oif \"{br}\" ip daddr {net} ct state related,established counter accept"
            ));
            input.push(format!("oif \"{br}\" counter reject"));
            output.push(format!("ip saddr {net} iif \"{br}\" counter accept"));
            output.push(format!("iif \"{br}\" counter reject"));
            cross.push(format!("iif \"{br}\" oif \"{br}\" counter accept"));
            nat.push(format!(
                "ip saddr {net} ip daddr 224.0.0.0/24 counter return"
            ));
            nat.push(format!(
                "ip saddr {net} ip daddr 255.255.255.255 counter return"
            ));
            nat.push(format!("meta l4proto tcp ip saddr {net} ip daddr != {net} counter masquerade to :1024-65535"));
            nat.push(format!("meta l4proto udp ip saddr {net} ip daddr != {net} counter masquerade to :1024-65535"));
            nat.push(format!(
                "ip saddr {net} ip daddr != {net} counter masquerade"
            ));
        }
    } else {
        let (br6, net6) = NET6;
        input.push(format!("oif \"{br6}\" ip6 daddr {net6} counter accept"));
        output.push(format!("ip6 saddr {net6} iif \"{br6}\" counter accept"));
        for (br, _) in NETS {
            input.push(format!("oif \"{br}\" counter reject"));
            output.push(format!("iif \"{br}\" counter reject"));
            cross.push(format!("iif \"{br}\" oif \"{br}\" counter accept"));
        }
    }
    vec![
        ("guest_input", input),
        ("guest_output", output),
        ("guest_cross", cross),
        ("guest_nat", nat),
    ]
}

/// `table ip/ip6 libvirt_network` as libvirt >= 10.4 creates them.
pub fn nft_ruleset() -> String {
    let mut s = String::new();
    for fam in ["ip", "ip6"] {
        s.push_str(&format!(
            "table {fam} libvirt_network {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tcounter jump guest_cross\n\t\tcounter jump guest_input\n\t\tcounter jump guest_output\n\t}}\n"
        ));
        for (chain, rules) in nft_chain_rules(fam) {
            s.push_str(&format!("\tchain {chain} {{\n"));
            if chain == "guest_nat" {
                s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
            }
            for r in rules {
                s.push_str(&format!("\t\t{r}\n"));
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
    }
    s
}

/// libvirt's reload on the nftables form: it deletes its own rules by handle and inserts
/// them again at the top, which buries anything inserted above its reject.
pub fn reload_nft(host: &Netns) {
    for fam in ["ip", "ip6"] {
        let mut batch = String::new();
        for (chain, rules) in nft_chain_rules(fam) {
            let listing = host.exec(&["nft", "-a", "list", "chain", fam, "libvirt_network", chain]);
            for line in listing.lines() {
                let Some((rule, handle)) = line.trim().rsplit_once(" # handle ") else {
                    continue;
                };
                if rule.starts_with("chain ")
                    || rule.starts_with("type ")
                    || rule.contains("virtgate")
                {
                    continue;
                }
                batch.push_str(&format!(
                    "delete rule {fam} libvirt_network {chain} handle {handle}\n"
                ));
            }
            for r in rules.iter().rev() {
                batch.push_str(&format!("insert rule {fam} libvirt_network {chain} {r}\n"));
            }
        }
        host.exec_stdin(&["nft", "-f", "-"], &batch);
    }
}
