//! `virtgate add --metadata` / `virtgate remove --metadata`: edit a domain's forwards in
//! its own `<metadata>` (virtgate's namespace) through `virsh metadata`, the one place the
//! CLI calls libvirt. The element is checked as the config reads it before it is set (an
//! invalid or conflicting result sets nothing), set on the running domain and on its
//! persistent definition (whichever it has), then applied.

use roxmltree::Document;

use super::{Context, apply, load_config};
use crate::config::metadata::{self, NAMESPACE};
use crate::config::short::{ShortForward, parse_short};
use crate::exec;
use crate::model::ForwardSpec;

/// `virsh ARGS` (the connection: virsh's default, or `LIBVIRT_DEFAULT_URI`).
fn virsh(args: &[&str]) -> Result<exec::Output, String> {
    let mut argv = vec!["virsh", "-q"];
    argv.extend_from_slice(args);
    match exec::run_if_installed(&argv) {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err("virsh is not installed (it is in libvirt-clients)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The flags that reach what the domain has: its live state and its persistent config.
fn where_to_set(domain: &str) -> Result<Vec<&'static str>, String> {
    let info = virsh(&["dominfo", domain])?;
    if !info.success {
        return Err(format!("virsh dominfo {domain}: {}", info.stderr.trim()));
    }
    let field = |k: &str| {
        info.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_start_matches(':').trim().to_string())
    };
    let mut flags = Vec::new();
    if field("State").is_some_and(|s| s == "running" || s == "paused") {
        flags.push("--live");
    }
    if field("Persistent").is_some_and(|p| p == "yes") {
        flags.push("--config");
    }
    if flags.is_empty() {
        return Err(format!("domain {domain:?} is neither running nor defined"));
    }
    Ok(flags)
}

/// The domain's virtgate element as virsh prints it (None: it has none).
fn current(domain: &str) -> Result<Option<String>, String> {
    let o = virsh(&["metadata", domain, NAMESPACE])?;
    // libvirt 11's virsh prints nothing (and succeeds) where libvirt 9's says "not present"
    if o.success && o.stdout.trim().is_empty() {
        return Ok(None);
    }
    if o.success {
        return Ok(Some(o.stdout));
    }
    if o.stderr.contains("not present") || o.stderr.contains("not found") {
        return Ok(None);
    }
    Err(format!("virsh metadata {domain}: {}", o.stderr.trim()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The element's `fail_closed` and its `<forward>` entries (each as its attributes).
type Entries = (Option<String>, Vec<Vec<(String, String)>>);

fn entries(xml: Option<&str>) -> Result<Entries, String> {
    let Some(xml) = xml else {
        return Ok((None, Vec::new()));
    };
    let doc = Document::parse(xml).map_err(|e| format!("the domain's metadata: {e}"))?;
    let root = doc.root_element();
    let forwards = root
        .children()
        .filter(|c| c.is_element())
        .map(|c| {
            c.attributes()
                .map(|a| (a.name().to_string(), a.value().to_string()))
                .collect()
        })
        .collect();
    Ok((root.attribute("fail_closed").map(str::to_string), forwards))
}

/// The element for `virsh metadata --set` (libvirt puts it in the namespace).
fn element(fail_closed: Option<&str>, forwards: &[Vec<(String, String)>]) -> String {
    let mut s = String::from("<forwards");
    if let Some(f) = fail_closed {
        s.push_str(&format!(" fail_closed=\"{}\"", escape(f)));
    }
    s.push('>');
    for f in forwards {
        s.push_str("<forward");
        for (k, v) in f {
            s.push_str(&format!(" {k}=\"{}\"", escape(v)));
        }
        s.push_str("/>");
    }
    s.push_str("</forwards>");
    s
}

/// The forwards `element` gives, as the config reads a domain's metadata.
fn parsed(element: &str) -> Result<Vec<ForwardSpec>, String> {
    let xml = element.replacen("<forwards", &format!("<forwards xmlns=\"{NAMESPACE}\""), 1);
    let wrapped = format!("<domain><metadata>{xml}</metadata></domain>");
    let doc = Document::parse(&wrapped).map_err(|e| e.to_string())?;
    metadata::from_domain(doc.root_element())
        .ok_or("no element")?
        .forwards
}

fn same(a: &ForwardSpec, f: &ShortForward) -> bool {
    a.host_ports == f.host_ports
        && a.guest_ports == f.guest_ports
        && a.proto == f.proto
        && a.listen == f.listen
}

/// Checks the new element (valid, no forward overlapping another of this domain or of a
/// domain in the config files), sets it, applies.
fn commit(
    ctx: &Context,
    domain: &str,
    fail_closed: Option<&str>,
    forwards: &[Vec<(String, String)>],
) -> Result<bool, String> {
    let flags = where_to_set(domain)?;
    let el = element(fail_closed, forwards);
    let specs = parsed(&el).map_err(|e| format!("nothing set: {e}"))?;
    let cfg = load_config(ctx)?;
    for (i, a) in specs.iter().enumerate() {
        if let Some(b) = specs[..i]
            .iter()
            .find(|b| crate::model::conflicts::specs_overlap(a, b))
        {
            return Err(format!(
                "nothing set: {} overlaps {} of the same domain",
                a.short(),
                b.short()
            ));
        }
        for (name, d) in cfg.domains.iter().filter(|(n, _)| *n != domain) {
            if let Some(b) = d
                .domain
                .forwards
                .iter()
                .find(|b| crate::model::conflicts::specs_overlap(a, b))
            {
                return Err(format!(
                    "nothing set: {} conflicts with {} of domain {name:?} ({})",
                    a.short(),
                    b.short(),
                    d.origin
                ));
            }
        }
    }
    let mut args = vec!["metadata", domain, NAMESPACE];
    if forwards.is_empty() && fail_closed.is_none() {
        args.push("--remove");
    } else {
        args.extend(["--key", "vg", "--set", &el]);
    }
    args.extend(flags.iter().copied());
    let o = virsh(&args)?;
    if !o.success {
        return Err(format!("virsh metadata: {}", o.stderr.trim()));
    }
    println!(
        "set the metadata of domain {domain:?} ({})",
        flags.join(" ")
    );
    apply(ctx)
}

/// A domain configured in the files: its metadata would be ignored.
fn refuse_if_configured(ctx: &Context, domain: &str) -> Result<(), String> {
    match load_config(ctx)?.domains.get(domain) {
        Some(d) if !d.origin.to_string().starts_with('<') => Err(format!(
            "domain {domain:?} is configured at {}, which wins over its <metadata>: edit it with `virtgate add`/`remove` without --metadata",
            d.origin
        )),
        _ => Ok(()),
    }
}

pub fn add(
    ctx: &Context,
    domain: &str,
    spec: &str,
    description: Option<&str>,
) -> Result<bool, String> {
    let f = parse_short(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    refuse_if_configured(ctx, domain)?;
    let xml = current(domain)?;
    let (fail_closed, mut forwards) = entries(xml.as_deref())?;
    let have = parsed(&element(fail_closed.as_deref(), &forwards))
        .map_err(|e| format!("the domain's metadata has an error ({e}): fix it first"))?;
    if have.iter().any(|a| same(a, &f)) {
        return Err(format!(
            "domain {domain:?} already has {spec:?} in its metadata"
        ));
    }
    let mut entry = vec![("spec".to_string(), spec.trim().to_string())];
    if let Some(d) = description {
        entry.push(("description".to_string(), d.to_string()));
    }
    forwards.push(entry);
    commit(ctx, domain, fail_closed.as_deref(), &forwards)
}

pub fn remove(ctx: &Context, domain: &str, spec: &str) -> Result<bool, String> {
    let f = parse_short(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    refuse_if_configured(ctx, domain)?;
    let xml = current(domain)?;
    let (fail_closed, mut forwards) = entries(xml.as_deref())?;
    // each entry on its own: which one gives the spec
    let at = forwards.iter().position(|e| {
        parsed(&element(None, std::slice::from_ref(e)))
            .is_ok_and(|specs| specs.iter().any(|a| same(a, &f)))
    });
    let Some(i) = at else {
        let have: Vec<String> = parsed(&element(None, &forwards))
            .unwrap_or_default()
            .iter()
            .map(ForwardSpec::short)
            .collect();
        return Err(format!(
            "domain {domain:?} has no forward {spec:?} in its metadata; it has: {}",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ));
    };
    forwards.remove(i);
    commit(ctx, domain, fail_closed.as_deref(), &forwards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_element_round_trips_and_escapes() {
        let xml = format!(
            "<vg:forwards xmlns:vg=\"{NAMESPACE}\" fail_closed=\"true\"><vg:forward spec=\"8080:80\" description=\"a &quot;b&quot; &lt;c&gt;\"/></vg:forwards>"
        );
        let (fc, f) = entries(Some(&xml)).unwrap();
        assert_eq!(fc.as_deref(), Some("true"));
        let el = element(fc.as_deref(), &f);
        assert_eq!(
            el,
            "<forwards fail_closed=\"true\"><forward spec=\"8080:80\" description=\"a &quot;b&quot; &lt;c&gt;\"/></forwards>"
        );
        let specs = parsed(&el).unwrap();
        assert_eq!(specs[0].description.as_deref(), Some("a \"b\" <c>"));
        assert!(parsed("<forwards><forward spec=\"0:80\"/></forwards>").is_err());
        assert_eq!(entries(None).unwrap(), (None, vec![]));
    }
}
