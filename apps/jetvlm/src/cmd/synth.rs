//! `jetvlm synth`: writes a synthetic camera-scene question/answer dataset.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use jetvlm_camera::qa::{DatasetConfig, write_dataset_replacing};
use jetvlm_camera::scene::SceneConfig;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm synth --out /tmp/frames --count 100 --seed 3\n  \
    jetvlm synth --out /tmp/frames --count 1 --multi-fraction 1 --frames 2-2 --seed 3 --force")]
pub struct SynthArgs {
    /// Output directory (must not exist, or be empty, unless --force); written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing non-empty output directory (only once the new dataset is complete).
    #[arg(long)]
    pub force: bool,
    /// Number of clips (each 1 frame or a multi-frame sequence, with several questions).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Random seed; a held-out set is another seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frame count range of multi-frame clips, e.g. `2-4`.
    #[arg(long, default_value = "2-4")]
    pub frames: String,
    /// Frame size WxH.
    #[arg(long, default_value = "128x128")]
    pub size: String,
    /// Fraction of clips that are multi-frame.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub multi_fraction: f32,
    /// Questions per clip (distinct categories).
    #[arg(long, default_value_t = 3)]
    pub questions_per_clip: usize,
    /// Single-frame questions about the latest frame added to each multi-frame clip.
    #[arg(long, default_value_t = 1)]
    pub latest_frame_questions: usize,
}

fn parse_pair(s: &str, sep: char, what: &str) -> Result<(u64, u64)> {
    let parse = |p: &str| {
        p.trim()
            .parse::<u64>()
            .with_context(|| format!("{what} `{s}`: `{p}` is not a number"))
    };
    match s.split_once(sep) {
        Some((a, b)) => Ok((parse(a)?, parse(b)?)),
        None => {
            let v = parse(s)?;
            Ok((v, v))
        }
    }
}

pub fn run(args: SynthArgs) -> Result<()> {
    let (w, h) = parse_pair(&args.size, 'x', "--size")?;
    let (lo, hi) = parse_pair(&args.frames, '-', "--frames")?;
    if !(0.0..=1.0).contains(&args.multi_fraction) {
        bail!("--multi-fraction {} outside [0, 1]", args.multi_fraction);
    }
    let defaults = DatasetConfig::default();
    let cfg = DatasetConfig {
        scene: SceneConfig {
            width: u32::try_from(w).context("--size width")?,
            height: u32::try_from(h).context("--size height")?,
            ..defaults.scene
        },
        count: args.count,
        seed: args.seed,
        multi_fraction: args.multi_fraction,
        frames: (lo as usize, hi as usize),
        questions_per_clip: args.questions_per_clip,
        latest_frame_questions: args.latest_frame_questions,
    };
    cfg.scene.validate()?;
    let started = std::time::Instant::now();
    let s = write_dataset_replacing(&args.out, &cfg, args.force)
        .with_context(|| format!("writing dataset {}", args.out.display()))?;
    println!(
        "wrote {}: {} clips, {} images, {} questions ({} single-frame, {} multi-frame) in {:.1}s",
        args.out.display(),
        s.clips,
        s.images,
        s.questions,
        s.single,
        s.multi,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
