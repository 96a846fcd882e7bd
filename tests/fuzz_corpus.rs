//! Every input of the committed fuzz corpora (fuzz/corpus/TARGET, grown by `scripts/fuzz`)
//! replayed through its target: what the fuzzer found interesting stays fixed here, and
//! each target's checks (no panic; two readings of the same input agree) hold for it.

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in virtgate::fuzz::TARGETS {
        let dir = root.join(name);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| target(&data));
            assert!(r.is_ok(), "{name}: {} fails", p.display());
            n += 1;
        }
        assert!(n > 0, "{name}: empty corpus");
    }
}
