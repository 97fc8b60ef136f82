//! Renders the synthetic scene (`synthetic://scene?seed=SEED`, the same frames) into numbered
//! PNGs, `DIR/frame_00000.png` ..., the input of `tests/fixtures/make_clip.py`; the RTSP
//! benchmark (`apps/analytics/bench/multi_source.sh --rtsp`) serves clips made from them.
//!
//!     cargo run --release -p jetvlm-analytics --example scene_clip -- DIR FRAMES SEED
//!
//! DIR must not exist or be empty; it is filled under a temporary name and renamed into
//! place, so a failed run leaves no half-written clip.

use anyhow::{Context, Result, bail};
use jetvlm_camera::scene::{Scene, SceneConfig};
use std::path::PathBuf;

fn main() {
    if let Err(e) = run() {
        eprintln!("scene_clip: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, frames, seed] = args.as_slice() else {
        bail!("usage: scene_clip DIR FRAMES SEED");
    };
    let dir = PathBuf::from(dir);
    let frames: u32 = frames
        .parse()
        .ok()
        .filter(|n| (1..=100_000).contains(n))
        .with_context(|| format!("FRAMES: `{frames}` is not 1..=100000"))?;
    let seed: u64 = seed
        .parse()
        .with_context(|| format!("SEED: `{seed}` is not an unsigned integer"))?;
    if dir.exists() && dir.read_dir()?.next().is_some() {
        bail!("{}: exists and is not empty", dir.display());
    }
    let name = dir
        .file_name()
        .with_context(|| format!("{}: no directory name", dir.display()))?;
    let part = dir.with_file_name(format!("{}.part", name.to_string_lossy()));
    if part.exists() {
        std::fs::remove_dir_all(&part).with_context(|| format!("removing {}", part.display()))?;
    }
    std::fs::create_dir_all(&part).with_context(|| format!("creating {}", part.display()))?;
    let cfg = SceneConfig::default();
    let (w, h) = (cfg.width, cfg.height);
    let mut scene = Scene::new(cfg, seed)?;
    for i in 0..frames {
        if i > 0 {
            scene.step();
        }
        let path = part.join(format!("frame_{i:05}.png"));
        image::save_buffer(&path, &scene.render(), w, h, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if dir.exists() {
        std::fs::remove_dir(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&part, &dir)
        .with_context(|| format!("renaming {} to {}", part.display(), dir.display()))?;
    Ok(())
}
