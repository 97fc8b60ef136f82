//! `jetvlm watch` decodes still images under the image limits of `ask` (`--max-image-pixels`,
//! `--max-image-alloc-mib`, one flag struct): a `dir://` image whose header declares a huge
//! size is reported and skipped (the run goes on), a `file://` one is refused with its name,
//! both before any pixel is decoded.

use std::process::Command;

use jetvlm_core::image_limits::png_declaring;

/// Runs `jetvlm args` from the crate directory (the bundled demo model); (ok, stdout, stderr).
fn jetvlm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetvlm"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run jetvlm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn frames_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // 48x40 = 1920 pixels each; the bomb declares 12000x12000 in 80-odd bytes.
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
    });
    img.save(dir.path().join("a.png")).unwrap();
    std::fs::write(dir.path().join("b-bomb.png"), png_declaring(12000, 12000)).unwrap();
    img.save(dir.path().join("c.png")).unwrap();
    dir
}

fn watch(source: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "watch",
        source,
        "--frames",
        "0",
        "--window",
        "2",
        "--max-tokens",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    jetvlm(&args)
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn a_huge_png_in_a_dir_source_is_reported_and_skipped() {
    let dir = frames_dir();
    let uri = format!("dir://{}", dir.path().display());
    let (ok, stdout, stderr) = watch(&uri, &[]);
    assert!(ok, "{stderr}");
    let mut lines = json_lines(&stdout);
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["frames"].as_u64(), Some(2), "{summary}");
    // a.png and c.png play with their play-order indices; the bomb (index 1) is skipped.
    let indices: Vec<_> = lines.iter().map(|l| l["frame"].as_u64()).collect();
    assert_eq!(indices, vec![Some(0), Some(2)], "{stdout}");
    assert!(
        stderr.contains("b-bomb.png") && stderr.contains("12000x12000"),
        "the skipped image is reported with its reason: {stderr}"
    );
}

#[test]
fn the_ask_flags_set_the_limits_of_a_watch_source() {
    let dir = frames_dir();
    let uri = format!("dir://{}", dir.path().display());
    // At the valid images' size they play; one pixel less and no image of the directory
    // decodes: an error naming the directory and the limit, not a spin.
    let (ok, stdout, stderr) = watch(&uri, &["--max-image-pixels", "1920"]);
    assert!(ok, "{stderr}");
    assert_eq!(json_lines(&stdout).len(), 3, "{stdout}");
    let (ok, _, stderr) = watch(&uri, &["--max-image-pixels", "1919"]);
    assert!(!ok);
    assert!(
        stderr.contains("48x40") && stderr.contains("1919"),
        "{stderr}"
    );
    // Out of the flag's domain: the flag is named.
    let (ok, _, stderr) = watch(&uri, &["--max-image-alloc-mib", "0"]);
    assert!(!ok && stderr.contains("--max-image-alloc-mib"), "{stderr}");
}

#[test]
fn a_huge_png_as_a_file_source_is_refused_before_decoding() {
    let dir = frames_dir();
    let bomb = dir.path().join("b-bomb.png");
    let (ok, stdout, stderr) = watch(&format!("file://{}", bomb.display()), &[]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("b-bomb.png") && stderr.contains("12000x12000"),
        "{stderr}"
    );
    // A pixel limit above the declared size lets the header through; the decoder's
    // allocation limit (1 MiB here) then stops the 432 MB image before it is allocated.
    let (ok, _, stderr) = watch(
        &format!("file://{}", bomb.display()),
        &[
            "--max-image-pixels",
            "200000000",
            "--max-image-alloc-mib",
            "1",
        ],
    );
    assert!(
        !ok && stderr.contains("b-bomb.png") && stderr.contains("Memory limit exceeded"),
        "{stderr}"
    );
}
