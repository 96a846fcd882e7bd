//! `heap::for_one_shot` on the main thread (no test harness: the harness runs each test
//! on a thread of its own, whose allocations never grow the main heap): the heap grows by
//! its pad in one step, and that part is advised for transparent huge pages.

fn heap_mappings() -> Vec<(u64, u64, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut out = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            current = line.ends_with("[heap]").then(|| {
                let (a, b) = first.split_once('-').expect("range");
                (
                    u64::from_str_radix(a, 16).expect("hex"),
                    u64::from_str_radix(b, 16).expect("hex"),
                )
            });
        } else if let (Some((a, b)), Some(flags)) = (current, line.strip_prefix("VmFlags:")) {
            out.push((a, b, flags.to_string()));
        }
    }
    out
}

fn main() {
    let before: u64 = heap_mappings().iter().map(|(a, b, _)| b - a).sum();
    virtgate::heap::for_one_shot();
    let after = heap_mappings();
    let size: u64 = after.iter().map(|(a, b, _)| b - a).sum();
    let advised: u64 = after
        .iter()
        .filter(|(_, _, f)| f.split_whitespace().any(|x| x == "hg"))
        .map(|(a, b, _)| b - a)
        .sum();
    let mut failed = 0;
    if size < before + (60 << 20) {
        eprintln!("the heap grew from {before} to {size} bytes: not by its pad");
        failed += 1;
    }
    // a kernel built without transparent huge pages refuses the advice (EINVAL)
    let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
    if !thp {
        println!("heap: this kernel has no transparent huge pages: the advice is not checked");
    } else if advised < 60 << 20 {
        eprintln!("{advised} bytes of the heap advised for huge pages: {after:?}");
        failed += 1;
    }
    println!("heap: {} passed, {failed} failed", 2 - failed);
    std::process::exit(i32::from(failed > 0));
}
