//! Every shipped example config parses and validates; every file in tests/config/invalid is
//! rejected (at parse or at validation) with a message naming the problem.

use std::path::Path;

use lightning_rod::config::Config;

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no .toml files in {}", dir.display());
    out
}

#[test]
fn examples_parse_and_validate() {
    for path in files("examples") {
        let c = Config::load(&path, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        c.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn the_full_example_spells_out_every_default() {
    let c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config.toml"), true).unwrap();
    let mut expected = Config::default();
    expected.cloud.url = Some("wss://cloud.example.org:8181/".into());
    expected.device.package_managers.remove("apt");
    assert_eq!(c, expected);
}

#[test]
fn invalid_configs_are_rejected() {
    for path in files("tests/config/invalid") {
        let result = Config::load(&path, true).and_then(|c| c.validate());
        let err = result.err().unwrap_or_else(|| panic!("{} was accepted", path.display()));
        assert!(!err.to_string().is_empty());
    }
}
