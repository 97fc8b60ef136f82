//! Camera sources opened by URI, end to end: synthetic scenes, image directories and files,
//! and the synthetic question/answer dataset on disk.

use std::time::Duration;

use jetvlm_camera::qa::{DatasetConfig, write_dataset};
use jetvlm_camera::{CameraError, Capture, Frame, FrameSource, open};

fn frames(src: &mut dyn FrameSource, max: usize) -> (Vec<Frame>, bool) {
    let mut out = Vec::new();
    for _ in 0..max {
        match src.capture(Duration::from_secs(5)).unwrap() {
            Capture::Frame(f) => out.push(f),
            Capture::EndOfStream => return (out, true),
            Capture::Timeout => panic!("unpaced source timed out"),
        }
    }
    (out, false)
}

#[test]
fn synthetic_uri_is_deterministic_per_seed_and_ends_after_frames() {
    let uri = "synthetic://scene?seed=7&fps=10&frames=4&pace=0&width=96&height=64";
    let (a, eos) = frames(open(uri).unwrap().as_mut(), 10);
    assert!(eos);
    assert_eq!(a.len(), 4);
    assert!(
        a.iter()
            .all(|f| f.width == 96 && f.height == 64 && f.rgb.len() == 96 * 64 * 3)
    );
    assert_eq!(a[3].timestamp, Duration::from_millis(300));
    let (b, _) = frames(open(uri).unwrap().as_mut(), 10);
    assert_eq!(a, b);
    let (c, _) = frames(open(&uri.replace("seed=7", "seed=8")).unwrap().as_mut(), 10);
    assert_ne!(a[0].rgb, c[0].rgb);
    // Consecutive frames differ (sensor noise at least).
    assert_ne!(a[0].rgb, a[1].rgb);
}

fn write_png(path: &std::path::Path, w: u32, h: u32, rgb: [u8; 3]) {
    let data: Vec<u8> = (0..w * h).flat_map(|_| rgb).collect();
    image::save_buffer(path, &data, w, h, image::ExtendedColorType::Rgb8).unwrap();
}

#[test]
fn dir_source_plays_images_in_name_order_and_loops_on_request() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("b.png"), 4, 3, [0, 255, 0]);
    write_png(&dir.path().join("a.png"), 4, 3, [255, 0, 0]);
    write_png(&dir.path().join("c.png"), 4, 3, [0, 0, 255]);
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let uri = format!("dir://{}?fps=2", dir.path().display());
    let (f, eos) = frames(open(&uri).unwrap().as_mut(), 10);
    assert!(eos);
    let colours: Vec<[u8; 3]> = f.iter().map(|f| f.pixel(1, 1).unwrap()).collect();
    assert_eq!(colours, vec![[255, 0, 0], [0, 255, 0], [0, 0, 255]]);
    assert_eq!(f[2].timestamp, Duration::from_secs(1));
    let (f, eos) = frames(open(&format!("{uri}&loop=1")).unwrap().as_mut(), 5);
    assert!(!eos);
    assert_eq!(f[4].pixel(0, 0), Some([0, 255, 0]));
    // A bare directory path opens the same way.
    let (f, _) = frames(
        open(&dir.path().display().to_string()).unwrap().as_mut(),
        10,
    );
    assert_eq!(f.len(), 3);
}

#[test]
fn file_source_gives_one_frame_then_end_of_stream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("still.png");
    write_png(&path, 5, 2, [10, 20, 30]);
    let mut src = open(&format!("file://{}", path.display())).unwrap();
    assert_eq!(src.frame_size(), Some((5, 2)));
    let (f, eos) = frames(src.as_mut(), 3);
    assert!(eos);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].rgb, [10, 20, 30].repeat(10));
}

#[test]
fn broken_sources_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let err = open(&format!("file://{}", bad.display()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("broken.png"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        open(&format!("dir://{}", empty.path().display())),
        Err(CameraError::EmptyDir { .. })
    ));
}

#[test]
fn dataset_answers_agree_with_the_scene_truth_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let cfg = DatasetConfig {
        count: 40,
        seed: 5,
        ..DatasetConfig::default()
    };
    let summary = write_dataset(&out, &cfg).unwrap();
    assert!(summary.single > 0 && summary.multi > 0);
    let scenes: Vec<serde_json::Value> = std::fs::read_to_string(out.join("scenes.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (mut checked, mut latest_frame_questions) = (0, 0);
    for line in std::fs::read_to_string(out.join("qa.jsonl"))
        .unwrap()
        .lines()
    {
        let q: serde_json::Value = serde_json::from_str(line).unwrap();
        let clip = &scenes[q["clip"].as_u64().unwrap() as usize];
        assert_eq!(clip["images"], q["images"]);
        let truth = clip["truth"].as_array().unwrap();
        let n_last = truth.last().unwrap()["objects"].as_array().unwrap().len();
        let n_first = truth[0]["objects"].as_array().unwrap().len();
        let answer = q["answer"].as_str().unwrap();
        match q["question"].as_str().unwrap() {
            "how many objects are there?" => {
                assert_eq!(answer, n_last.to_string());
                checked += 1;
            }
            "how many objects now vs before?" => {
                assert_eq!(answer, format!("{n_last} vs {n_first}"));
                checked += 1;
            }
            _ => {}
        }
        // Multi-frame questions only on multi-frame clips; single-frame questions on both
        // (about the latest frame of a multi-frame clip).
        if q["kind"] == "multi" {
            assert!(truth.len() > 1);
        } else if truth.len() > 1 {
            latest_frame_questions += 1;
        }
    }
    assert!(checked > 0);
    assert!(latest_frame_questions > 0);
}
