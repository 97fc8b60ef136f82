//! `jetvlm eval`: the accuracy study. The same held-out synthetic clips (re-rendered from
//! their seed) are answered under each KV policy; for each policy: accuracy (single- and
//! multi-frame), answers changed vs FP16, mean KL divergence of the first answer token's
//! distribution vs FP16, KV bytes, TTFT and TPOT.
//!
//! `--weights stored,q8,q4` repeats the study with the package's decoder quantized (as
//! `jetvlm quantize` writes it) or replaced by a quantized decoder directory: a temporary
//! package links the package's files and holds that decoder as its `decoder.dir`.

use super::bench::decode::{WeightChoice, parse_weights};
use anyhow::{Context, Result, bail};
use clap::Args;
use jetvlm_camera::Frame;
use jetvlm_camera::qa::{DatasetConfig, Kind, clip};
use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir};
use jetvlm_runtime::{Pipeline, RuntimeConfig};
use serde::Serialize;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm eval --count 300\n  \
    jetvlm eval --kv-calibration models/demo/kv-calibration.yaml --json\n  \
    jetvlm eval --count 300 --policies fp16 --weights stored,q8,q4g32,q4")]
pub struct EvalArgs {
    /// Model package directory (default: the bundled demo model, models/demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Held-out clips to evaluate (each has several questions).
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Seed of the held-out set (the demo model trained on seeds 101-114 and was scored on 1001).
    #[arg(long, default_value_t = 1001)]
    pub seed: u64,
    /// KV policies to compare, separated by spaces (a policy's own options use commas, e.g.
    /// `mixed:bits=4,group=32`); the first is the reference for "changed" and KL (use fp16).
    #[arg(
        long,
        num_args = 1..,
        default_values_t = ["fp16", "mixed", "int8-frames", "int2-frames", "int4-all"].map(String::from)
    )]
    pub policies: Vec<String>,
    /// KV calibration files (from `jetvlm calibrate`) to compare too, one row each after
    /// the policies.
    #[arg(long)]
    pub kv_calibration: Vec<PathBuf>,
    /// Decoder weights to compare, comma-separated, each under every policy: `stored` (the
    /// package's decoder as it is), `q8`, `q4` (the decoder quantized as `jetvlm quantize
    /// --bits 8|4 --head-bits 8` does, groups of 64; `q4g32`, `q8g32` name the group), or a
    /// quantized decoder directory. The first weights under the first policy is the
    /// reference.
    #[arg(long, value_delimiter = ',', default_value = "stored")]
    pub weights: Vec<String>,
    /// Maximum tokens per answer.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// One JSON object with a row per policy.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
struct PolicyRow {
    /// The `--weights` entry the decoder was loaded as.
    weights: String,
    /// The policy as given on the command line.
    policy: String,
    /// Its full form, with the package's block sizes where the policy gave none.
    policy_resolved: String,
    questions: usize,
    accuracy: f64,
    single_accuracy: f64,
    multi_accuracy: f64,
    changed_vs_reference: usize,
    mean_kl_vs_reference: f64,
    kv_bytes_mean: f64,
    kv_fp16_equivalent_bytes_mean: f64,
    ttft_ms_mean: f64,
    tpot_ms_mean: f64,
}

struct Item {
    frames: Vec<Frame>,
    question: String,
    answer: String,
    multi: bool,
}

fn held_out(count: usize, seed: u64) -> Result<Vec<Item>> {
    let cfg = DatasetConfig {
        count,
        seed,
        ..DatasetConfig::default()
    };
    let (w, h) = (cfg.scene.width, cfg.scene.height);
    let mut items = Vec::new();
    for index in 0..count {
        let (c, questions) =
            clip(&cfg, index).with_context(|| format!("rendering clip {index}"))?;
        let frames = c.into_frames(w, h);
        for q in questions {
            items.push(Item {
                frames: frames.clone(),
                question: q.question,
                answer: q.answer,
                multi: q.kind == Kind::Multi,
            });
        }
    }
    Ok(items)
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p || q) from log-probabilities.
fn kl(logp: &[f64], logq: &[f64]) -> f64 {
    logp.iter()
        .zip(logq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// A temporary package directory, removed on drop.
struct TempPackage(PathBuf);

impl Drop for TempPackage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The package to load for the `--weights` entry `name`: the package itself (`stored`), or
/// a temporary package whose `decoder.dir` holds the package's decoder quantized (or links
/// the directory given) and whose other files link to the package's.
fn package_for(
    model: &Path,
    name: &str,
    choice: &WeightChoice,
    index: usize,
) -> Result<(PathBuf, Option<TempPackage>)> {
    if *choice == WeightChoice::Stored {
        return Ok((model.to_path_buf(), None));
    }
    if !model.join("jetvlm.yaml").is_file() {
        bail!(
            "--weights {name}: --model {} is not a model package (no jetvlm.yaml)",
            model.display()
        );
    }
    let decoder = super::decoder_dir(model)?;
    let rel = decoder
        .strip_prefix(model)
        .ok()
        .filter(|r| {
            r.components().count() > 0 && r.components().all(|c| matches!(c, Component::Normal(_)))
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--weights {name}: the package's decoder.dir {} is not a directory inside the package",
                decoder.display()
            )
        })?
        .to_path_buf();
    let tmp = TempPackage(
        std::env::temp_dir().join(format!("jetvlm-eval-{}-{index}", std::process::id())),
    );
    if tmp.0.exists() {
        std::fs::remove_dir_all(&tmp.0).with_context(|| format!("removing {}", tmp.0.display()))?;
    }
    // Link every entry along the way to the decoder directory but the path itself.
    let comps: Vec<_> = rel
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let (mut from, mut to) = (model.to_path_buf(), tmp.0.clone());
    for comp in &comps {
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        for e in std::fs::read_dir(&from).with_context(|| format!("listing {}", from.display()))? {
            let e = e.with_context(|| format!("listing {}", from.display()))?;
            if e.file_name() == *comp {
                continue;
            }
            let target = std::fs::canonicalize(e.path())
                .with_context(|| format!("resolving {}", e.path().display()))?;
            link(&target, &to.join(e.file_name()))?;
        }
        from.push(comp);
        to.push(comp);
    }
    match choice {
        WeightChoice::Quantize(format) => {
            eprintln!("--weights {name}: quantizing {}...", decoder.display());
            let opts = QuantizeOptions {
                format: *format,
                head_int8: true,
            };
            quantize_dir(&decoder, &to, &opts)
                .with_context(|| format!("--weights {name}: quantizing {}", decoder.display()))?;
        }
        WeightChoice::Dir(dir) => {
            let target = std::fs::canonicalize(dir)
                .with_context(|| format!("--weights {name}: resolving {}", dir.display()))?;
            link(&target, &to)?;
        }
        WeightChoice::Stored | WeightChoice::Convert(_) => {
            bail!("--weights {name}: not a quantized decoder")
        }
    }
    Ok((tmp.0.clone(), Some(tmp)))
}

#[cfg(unix)]
fn link(target: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at)
        .with_context(|| format!("linking {} to {}", at.display(), target.display()))
}

#[cfg(not(unix))]
fn link(target: &Path, _at: &Path) -> Result<()> {
    bail!(
        "--weights: building a package that links {} needs a Unix system",
        target.display()
    )
}

pub fn run(args: EvalArgs) -> Result<()> {
    anyhow::ensure!(!args.policies.is_empty(), "--policies is empty");
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    anyhow::ensure!(!args.weights.is_empty(), "--weights is empty");
    let model = super::model_or_default(args.model.as_deref())?;
    let choices = args
        .weights
        .iter()
        .map(|w| match parse_weights(w)? {
            WeightChoice::Convert(_) => bail!(
                "--weights {w}: eval loads the package's decoder as stored; give stored, q8, q4 (q4g32, ...) or a quantized decoder directory"
            ),
            c => Ok(c),
        })
        .collect::<Result<Vec<_>>>()?;
    let items = held_out(args.count, args.seed)?;
    let mut reference: Option<(Vec<String>, Vec<Vec<f64>>)> = None;
    let mut rows = Vec::new();
    let runs: Vec<_> = args
        .policies
        .iter()
        .map(|p| (p.clone(), Some(p.clone()), None))
        .chain(args.kv_calibration.iter().map(|f| {
            (
                format!("calibration {}", f.display()),
                None,
                Some(f.clone()),
            )
        }))
        .collect();
    let runs = args
        .weights
        .iter()
        .zip(&choices)
        .enumerate()
        .flat_map(|(i, (w, c))| runs.iter().map(move |r| (i, w, c, r.clone())));
    let mut package: Option<(usize, PathBuf, Option<TempPackage>)> = None;
    for (wi, weights, choice, (policy, kv_policy, kv_calibration)) in runs {
        let pkg_dir = match &package {
            Some((i, dir, _)) if *i == wi => dir.clone(),
            _ => {
                // The previous weights' temporary package goes first.
                drop(package.take());
                let (dir, tmp) = package_for(&model, weights, choice, wi)?;
                package = Some((wi, dir.clone(), tmp));
                dir
            }
        };
        let cfg = RuntimeConfig {
            kv_policy,
            kv_calibration,
            max_new_tokens: args.max_tokens,
            ..RuntimeConfig::default()
        };
        let mut pipeline = Pipeline::load(&pkg_dir, cfg).with_context(|| {
            format!(
                "loading {} (--weights {weights}) with KV policy {policy}",
                model.display()
            )
        })?;
        let mut row = PolicyRow {
            weights: weights.clone(),
            policy: policy.clone(),
            policy_resolved: pipeline.kv_policy(),
            questions: items.len(),
            ..PolicyRow::default()
        };
        let (mut correct, mut single, mut single_ok, mut multi_ok) =
            (0usize, 0usize, 0usize, 0usize);
        let mut answers = Vec::with_capacity(items.len());
        let mut dists = Vec::with_capacity(items.len());
        let mut tpot_n = 0usize;
        for item in &items {
            let logits = pipeline.first_token_logits(&item.frames, &item.question)?;
            dists.push(log_softmax(&logits));
            let answer = pipeline.ask(&item.frames, &item.question)?.finish()?;
            let text = answer.text.trim().to_string();
            let ok = text == item.answer;
            correct += usize::from(ok);
            if item.multi {
                multi_ok += usize::from(ok);
            } else {
                single += 1;
                single_ok += usize::from(ok);
            }
            let s = &answer.stats;
            row.kv_bytes_mean += s.kv.total_bytes as f64;
            row.kv_fp16_equivalent_bytes_mean += s.kv.fp16_equivalent_bytes as f64;
            row.ttft_ms_mean += s.ttft_ms;
            if s.tokens > 1 {
                row.tpot_ms_mean += s.tpot_ms;
                tpot_n += 1;
            }
            answers.push(text);
        }
        let n = items.len() as f64;
        let multi = items.len() - single;
        row.accuracy = correct as f64 / n;
        row.single_accuracy = single_ok as f64 / single.max(1) as f64;
        row.multi_accuracy = multi_ok as f64 / multi.max(1) as f64;
        row.kv_bytes_mean /= n;
        row.kv_fp16_equivalent_bytes_mean /= n;
        row.ttft_ms_mean /= n;
        row.tpot_ms_mean /= tpot_n.max(1) as f64;
        match &reference {
            None => reference = Some((answers, dists)),
            Some((ref_answers, ref_dists)) => {
                row.changed_vs_reference = answers
                    .iter()
                    .zip(ref_answers)
                    .filter(|(a, b)| a != b)
                    .count();
                row.mean_kl_vs_reference = dists
                    .iter()
                    .zip(ref_dists)
                    .map(|(q, p)| kl(p, q))
                    .sum::<f64>()
                    / n;
            }
        }
        rows.push(row);
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let doc = serde_json::json!({
            "model": model.display().to_string(),
            "clips": args.count,
            "seed": args.seed,
            "questions": items.len(),
            "reference_policy": rows.first().map(|r| r.policy.clone()),
            "reference_weights": rows.first().map(|r| r.weights.clone()),
            "policies": rows,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    let with_weights = args.weights != ["stored"];
    let label = |r: &PolicyRow| {
        if with_weights {
            format!("{} {}", r.weights, r.policy)
        } else {
            r.policy.clone()
        }
    };
    writeln!(
        out,
        "jetvlm eval: {} on {} held-out clips (seed {}), {} questions; reference {}",
        model.display(),
        args.count,
        args.seed,
        items.len(),
        rows.first().map(label).as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "{:<28} {:>7} {:>7} {:>7} {:>8} {:>10} {:>9} {:>9} {:>8} {:>8}",
        if with_weights {
            "weights policy"
        } else {
            "policy"
        },
        "acc",
        "single",
        "multi",
        "changed",
        "KL",
        "KV KiB",
        "FP16 KiB",
        "TTFT ms",
        "TPOT ms"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<28} {:>6.1}% {:>6.1}% {:>6.1}% {:>8} {:>10.2e} {:>9.1} {:>9.1} {:>8.2} {:>8.2}",
            label(r),
            100.0 * r.accuracy,
            100.0 * r.single_accuracy,
            100.0 * r.multi_accuracy,
            r.changed_vs_reference,
            r.mean_kl_vs_reference,
            r.kv_bytes_mean / 1024.0,
            r.kv_fp16_equivalent_bytes_mean / 1024.0,
            r.ttft_ms_mean,
            r.tpot_ms_mean
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        assert!(kl(&p, &p).abs() < 1e-12);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl(&p, &q) > 0.1);
    }

    #[test]
    fn log_softmax_normalises() {
        let p = log_softmax(&[1000.0, 1000.0]);
        assert!((p[0] - 0.5f64.ln()).abs() < 1e-12);
    }
}
