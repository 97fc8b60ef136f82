//! Board detection from fixture trees of /proc and /etc (never the live machine).

use jetvlm_board::detect::{SystemInfo, board_for_model};
use jetvlm_board::{BoardError, BoardRegistry};
use std::path::PathBuf;

fn root(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/board/detect")
        .join(case)
}

#[test]
fn fixture_trees_map_to_boards() {
    let boards = BoardRegistry::bundled().all().unwrap();
    for (case, board, l4t, jetpack) in [
        ("orin-nano-8gb", "orin-nano-8gb", "36.4.3", Some("6.2")),
        (
            "orin-nano-8gb-super",
            "orin-nano-8gb-super",
            "36.4.3",
            Some("6.2"),
        ),
        ("orin-nano-4gb", "orin-nano-4gb", "36.4.0", Some("6.1")),
        ("agx-orin-64gb", "agx-orin-64gb", "36.4.3", Some("6.2")),
        ("agx-orin-32gb", "agx-orin-32gb", "36.3.0", Some("6.0")),
        ("xavier-nx-16gb", "xavier-nx-16gb", "35.6.0", Some("5.1.4")),
        (
            "agx-xavier-32gb",
            "agx-xavier-32gb",
            "35.5.0",
            Some("5.1.3"),
        ),
        ("thor", "thor-t5000", "38.2.0", Some("7.0")),
    ] {
        let info = SystemInfo::read(&root(case)).unwrap();
        assert_eq!(info.board(&boards).unwrap().name, board, "{case}");
        assert_eq!(info.l4t.unwrap().to_string(), l4t, "{case}");
        assert_eq!(info.jetpack.as_deref(), jetpack, "{case}");
    }
}

#[test]
fn mem_available_not_mem_free_is_the_budget() {
    let info = SystemInfo::read(&root("orin-nano-8gb")).unwrap();
    let m = info.meminfo.unwrap();
    assert_eq!(m.available_bytes, 5_123_456 * 1024);
    assert_eq!(m.free_bytes, 912_340 * 1024);
    assert_eq!(m.total_bytes, 7_620_228 * 1024);
}

#[test]
fn non_jetson_is_a_clear_error_listing_boards() {
    let info = SystemInfo::read(&root("x86-workstation")).unwrap();
    assert_eq!(info.model, None);
    assert!(info.meminfo.is_some());
    let boards = BoardRegistry::bundled().all().unwrap();
    let err = info.board(&boards).unwrap_err();
    assert!(matches!(err, BoardError::NotAJetson { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("proc/device-tree/model")
            && msg.contains("--board")
            && msg.contains("orin-nano-8gb"),
        "{msg}"
    );
}

#[test]
fn unknown_jetson_names_its_model_string() {
    let boards = BoardRegistry::bundled().all().unwrap();
    let info = SystemInfo::read(&root("unknown-jetson")).unwrap();
    let msg = info.board(&boards).unwrap_err().to_string();
    assert!(msg.contains("Jetson TX2"), "{msg}");
    assert_eq!(
        info.jetpack, None,
        "L4T 32.7.4 is not a JetPack this SDK targets"
    );
}

#[test]
fn unparsable_meminfo_names_the_file() {
    let msg = SystemInfo::read(&root("bad-meminfo"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("proc/meminfo") && msg.contains("MemTotal"),
        "{msg}"
    );
}

#[test]
fn memory_picks_the_variant() {
    let boards = BoardRegistry::bundled().all().unwrap();
    let gib = |g: f64| (g * (1u64 << 30) as f64) as u64;
    let pick = |model: &str, total: u64| board_for_model(model, total, &boards);
    assert_eq!(
        pick(
            "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
            gib(7.4)
        )
        .as_deref(),
        Some("orin-nx-8gb")
    );
    assert_eq!(
        pick(
            "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
            gib(15.3)
        )
        .as_deref(),
        Some("orin-nx-16gb")
    );
    assert_eq!(
        pick("NVIDIA Jetson Xavier NX Developer Kit", gib(7.6)).as_deref(),
        Some("xavier-nx-8gb")
    );
    assert_eq!(
        pick("Jetson AGX Xavier Developer Kit", gib(62.0)).as_deref(),
        Some("agx-xavier-64gb")
    );
    assert_eq!(
        pick("NVIDIA Jetson Orin Nano Developer Kit Super", gib(3.4)).as_deref(),
        Some("orin-nano-4gb-super")
    );
    assert_eq!(pick("Raspberry Pi 5 Model B", gib(7.6)), None);
}
