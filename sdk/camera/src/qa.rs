//! Video-analytics questions and answers from scene ground truth, and the on-disk dataset.
//!
//! A *clip* is 1 frame (single-frame questions: count, colour, shape, zone, presence) or
//! 2..=4 consecutive frames (multi-frame questions about change between the first frame,
//! "before", and the last, "now": count change, what moved, appeared, left or entered a
//! zone). Answers are short words ("3", "red", "circle", "left", "yes", "red square",
//! "nothing", "4 vs 2") so a small decoder can learn them. A question is only asked when its
//! answer is unambiguous (unique names, no object at a zone boundary, no borderline motion).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{CameraError, Result};
use crate::rng::Rng;
use crate::scene::{Colour, FrameTruth, Object, Scene, SceneConfig, Shape, Zone};

/// Single-frame or multi-frame question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Single,
    Multi,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::Multi => "multi",
        }
    }
}

/// Single-frame question categories.
pub const SINGLE_CATEGORIES: [&str; 8] = [
    "count",
    "count_colour",
    "count_shape",
    "colour",
    "shape",
    "zone",
    "presence",
    "zone_count",
];
/// Multi-frame question categories.
pub const MULTI_CATEGORIES: [&str; 8] = [
    "count_change",
    "more_fewer",
    "moved",
    "moved_count",
    "did_move",
    "appeared",
    "left",
    "entered_zone",
];

/// One question with its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Question {
    pub question: String,
    pub answer: String,
    pub kind: Kind,
    pub category: &'static str,
}

/// Fraction of the shorter side below which a position change is not called a move, and the
/// distance from a zone boundary below which an object's zone is not asked about.
const MOVE_MIN: f32 = 0.04;
const ZONE_MARGIN: f32 = 0.03;

fn side(t: &FrameTruth) -> f32 {
    t.width.min(t.height) as f32
}

fn zone_clear(o: &Object, t: &FrameTruth) -> bool {
    Zone::boundary_distance(o.x, t.width as f32) >= ZONE_MARGIN * t.width as f32
}

fn single(category: &'static str, t: &FrameTruth, rng: &mut Rng) -> Option<(String, String)> {
    let objs = &t.objects;
    match category {
        "count" => Some(("how many objects are there?".into(), objs.len().to_string())),
        "count_colour" => {
            let present: Vec<Colour> = objs.iter().map(|o| o.colour).collect();
            let c = if rng.chance(0.7) && !present.is_empty() {
                *rng.choose(&present)?
            } else {
                *rng.choose(&Colour::ALL)?
            };
            let n = objs.iter().filter(|o| o.colour == c).count();
            Some((
                format!("how many {} objects are there?", c.name()),
                n.to_string(),
            ))
        }
        "count_shape" => {
            let s = *rng.choose(&Shape::ALL)?;
            let n = objs.iter().filter(|o| o.shape == s).count();
            Some((format!("how many {} are there?", s.plural()), n.to_string()))
        }
        "colour" => {
            let unique: Vec<&Object> = objs
                .iter()
                .filter(|o| objs.iter().filter(|p| p.shape == o.shape).count() == 1)
                .collect();
            let o = rng.choose(&unique)?;
            Some((
                format!("what colour is the {}?", o.shape.name()),
                o.colour.name().into(),
            ))
        }
        "shape" => {
            let unique: Vec<&Object> = objs
                .iter()
                .filter(|o| objs.iter().filter(|p| p.colour == o.colour).count() == 1)
                .collect();
            let o = rng.choose(&unique)?;
            Some((
                format!("what shape is the {} object?", o.colour.name()),
                o.shape.name().into(),
            ))
        }
        "zone" => {
            let clear: Vec<&Object> = objs.iter().filter(|o| zone_clear(o, t)).collect();
            let o = rng.choose(&clear)?;
            Some((
                format!("where is the {}?", o.name()),
                o.zone(t.width).name().into(),
            ))
        }
        "presence" => {
            let (c, s) = if rng.chance(0.5) && !objs.is_empty() {
                let o = rng.choose(objs)?;
                (o.colour, o.shape)
            } else {
                (*rng.choose(&Colour::ALL)?, *rng.choose(&Shape::ALL)?)
            };
            let present = objs.iter().any(|o| o.colour == c && o.shape == s);
            let answer = if present { "yes" } else { "no" };
            Some((
                format!("is there a {} {}?", c.name(), s.name()),
                answer.into(),
            ))
        }
        "zone_count" => {
            if !objs.iter().all(|o| zone_clear(o, t)) {
                return None;
            }
            let z = *rng.choose(&Zone::ALL)?;
            let n = objs.iter().filter(|o| o.zone(t.width) == z).count();
            Some((
                format!("how many objects are in the {} zone?", z.name()),
                n.to_string(),
            ))
        }
        _ => None,
    }
}

/// The ground-truth answer to a single-frame question about frame `t`, for the questions the
/// dataset asks (same wording, case and surrounding spaces ignored). `None` when the question
/// is not one of them or its answer would be ambiguous in this frame (a name that is not
/// unique, an object near a zone boundary), exactly as the dataset would not ask it.
pub fn single_frame_answer(question: &str, t: &FrameTruth) -> Option<String> {
    let q = question.trim().to_lowercase();
    let objs = &t.objects;
    let count = |f: &dyn Fn(&Object) -> bool| objs.iter().filter(|o| f(o)).count().to_string();
    if q == "how many objects are there?" {
        return Some(objs.len().to_string());
    }
    for c in Colour::ALL {
        if q == format!("how many {} objects are there?", c.name()) {
            return Some(count(&|o| o.colour == c));
        }
        if q == format!("what shape is the {} object?", c.name()) {
            let mut it = objs.iter().filter(|o| o.colour == c);
            return match (it.next(), it.next()) {
                (Some(o), None) => Some(o.shape.name().into()),
                _ => None,
            };
        }
        for s in Shape::ALL {
            if q == format!("is there a {} {}?", c.name(), s.name()) {
                let present = objs.iter().any(|o| o.colour == c && o.shape == s);
                return Some(if present { "yes" } else { "no" }.into());
            }
            if q == format!("where is the {} {}?", c.name(), s.name()) {
                let mut it = objs.iter().filter(|o| o.colour == c && o.shape == s);
                return match (it.next(), it.next()) {
                    (Some(o), None) if zone_clear(o, t) => Some(o.zone(t.width).name().into()),
                    _ => None,
                };
            }
        }
    }
    for s in Shape::ALL {
        if q == format!("how many {} are there?", s.plural()) {
            return Some(count(&|o| o.shape == s));
        }
        if q == format!("what colour is the {}?", s.name()) {
            let mut it = objs.iter().filter(|o| o.shape == s);
            return match (it.next(), it.next()) {
                (Some(o), None) => Some(o.colour.name().into()),
                _ => None,
            };
        }
    }
    for z in Zone::ALL {
        if q == format!("how many objects are in the {} zone?", z.name()) {
            if !objs.iter().all(|o| zone_clear(o, t)) {
                return None;
            }
            return Some(count(&|o| o.zone(t.width) == z));
        }
    }
    None
}

/// Objects present in both frames, with their displacement; `None` when any displacement is
/// borderline (neither clearly still nor clearly moved).
fn displacements<'a>(
    first: &'a FrameTruth,
    last: &'a FrameTruth,
) -> Option<Vec<(&'a Object, bool)>> {
    let min = MOVE_MIN * side(last);
    let mut out = Vec::new();
    for o in &last.objects {
        if let Some(p) = first.find(o.id) {
            let d = ((o.x - p.x).powi(2) + (o.y - p.y).powi(2)).sqrt();
            if d > 0.0 && d < min {
                return None;
            }
            out.push((o, d >= min));
        }
    }
    Some(out)
}

fn one_or_nothing(names: Vec<String>) -> Option<String> {
    match names.len() {
        0 => Some("nothing".into()),
        1 => names.into_iter().next(),
        _ => None,
    }
}

fn multi(
    category: &'static str,
    first: &FrameTruth,
    last: &FrameTruth,
    rng: &mut Rng,
) -> Option<(String, String)> {
    match category {
        "count_change" => Some((
            "how many objects now vs before?".into(),
            format!("{} vs {}", last.objects.len(), first.objects.len()),
        )),
        "more_fewer" => {
            let (now, before) = (last.objects.len(), first.objects.len());
            let a = match now.cmp(&before) {
                std::cmp::Ordering::Greater => "more",
                std::cmp::Ordering::Less => "fewer",
                std::cmp::Ordering::Equal => "same",
            };
            Some((
                "are there more or fewer objects than before?".into(),
                a.into(),
            ))
        }
        "moved" => {
            let d = displacements(first, last)?;
            let names = d
                .iter()
                .filter(|(_, m)| *m)
                .map(|(o, _)| o.name())
                .collect();
            Some(("which object moved?".into(), one_or_nothing(names)?))
        }
        "moved_count" => {
            let d = displacements(first, last)?;
            let n = d.iter().filter(|(_, m)| *m).count();
            Some(("how many objects moved?".into(), n.to_string()))
        }
        "did_move" => {
            let d = displacements(first, last)?;
            let (o, m) = rng.choose(&d)?;
            Some((
                format!("did the {} move?", o.name()),
                if *m { "yes" } else { "no" }.into(),
            ))
        }
        "appeared" => {
            let names = last
                .objects
                .iter()
                .filter(|o| first.find(o.id).is_none())
                .map(|o| o.name())
                .collect();
            Some(("what appeared?".into(), one_or_nothing(names)?))
        }
        "left" => {
            let names = first
                .objects
                .iter()
                .filter(|o| last.find(o.id).is_none())
                .map(|o| o.name())
                .collect();
            Some(("what left?".into(), one_or_nothing(names)?))
        }
        "entered_zone" => {
            if !first.objects.iter().all(|o| zone_clear(o, first))
                || !last.objects.iter().all(|o| zone_clear(o, last))
            {
                return None;
            }
            let z = *rng.choose(&Zone::ALL)?;
            let names = last
                .objects
                .iter()
                .filter(|o| o.zone(last.width) == z)
                .filter(|o| first.find(o.id).is_none_or(|p| p.zone(first.width) != z))
                .map(|o| o.name())
                .collect();
            Some((
                format!("what entered the {} zone?", z.name()),
                one_or_nothing(names)?,
            ))
        }
        _ => None,
    }
}

/// Up to `n` questions of distinct categories about a clip (1 frame: single-frame questions
/// about it; more: multi-frame questions about its first and last frames). [`clip`] adds
/// single-frame questions about the last frame of a multi-frame clip.
pub fn questions(truths: &[FrameTruth], n: usize, rng: &mut Rng) -> Vec<Question> {
    let (Some(first), Some(last)) = (truths.first(), truths.last()) else {
        return Vec::new();
    };
    let (kind, cats): (Kind, &[&'static str]) = if truths.len() == 1 {
        (Kind::Single, &SINGLE_CATEGORIES)
    } else {
        (Kind::Multi, &MULTI_CATEGORIES)
    };
    let mut order: Vec<&'static str> = cats.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut out = Vec::new();
    for category in order {
        if out.len() >= n {
            break;
        }
        let qa = match kind {
            Kind::Single => single(category, last, rng),
            Kind::Multi => multi(category, first, last, rng),
        };
        if let Some((question, answer)) = qa {
            out.push(Question {
                question,
                answer,
                kind,
                category,
            });
        }
    }
    out
}

/// A rendered clip with its ground truth.
#[derive(Clone, Debug)]
pub struct Clip {
    pub frames: Vec<Vec<u8>>,
    pub truths: Vec<FrameTruth>,
}

impl Clip {
    /// The clip's RGB8 images as camera [`Frame`](crate::Frame)s (`width` x `height`, the
    /// scene's size), 100 ms apart as the synthetic camera at 10 fps delivers them.
    pub fn into_frames(self, width: u32, height: u32) -> Vec<crate::Frame> {
        self.frames
            .into_iter()
            .enumerate()
            .map(|(i, rgb)| crate::Frame {
                index: i as u64,
                timestamp: std::time::Duration::from_millis(100 * i as u64),
                width,
                height,
                rgb,
            })
            .collect()
    }
}

/// Dataset parameters.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    pub scene: SceneConfig,
    /// Number of clips.
    pub count: usize,
    pub seed: u64,
    /// Fraction of clips that are multi-frame.
    pub multi_fraction: f32,
    /// Frame count range of multi-frame clips.
    pub frames: (usize, usize),
    /// Questions asked per clip (distinct categories).
    pub questions_per_clip: usize,
    /// Single-frame questions about the latest frame added to each multi-frame clip (after
    /// its multi-frame questions), so that a model also answers "how many objects are
    /// there?" with several frames in its context, as a camera session asks it.
    pub latest_frame_questions: usize,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        // More churn than the live stream, so short clips often show entries and exits.
        let scene = SceneConfig {
            p_enter: 0.35,
            p_leave: 0.12,
            ..SceneConfig::default()
        };
        Self {
            scene,
            count: 100,
            seed: 0,
            multi_fraction: 0.5,
            frames: (2, 4),
            questions_per_clip: 3,
            latest_frame_questions: 1,
        }
    }
}

/// Clip `index` of a dataset and its questions; independent of every other clip, so a
/// held-out set is just another seed.
pub fn clip(cfg: &DatasetConfig, index: usize) -> Result<(Clip, Vec<Question>)> {
    if cfg.frames.0 < 2 || cfg.frames.0 > cfg.frames.1 || cfg.frames.1 > 16 {
        return Err(CameraError::InvalidScene(format!(
            "multi-frame range {:?} must satisfy 2 <= lo <= hi <= 16",
            cfg.frames
        )));
    }
    let mut rng = Rng::derive(cfg.seed, index as u64 + 1);
    let n_frames = if rng.chance(cfg.multi_fraction) {
        cfg.frames.0 + rng.below(cfg.frames.1 - cfg.frames.0 + 1)
    } else {
        1
    };
    let mut scene = Scene::new(cfg.scene.clone(), rng.next_u64())?;
    let mut clip = Clip {
        frames: Vec::new(),
        truths: Vec::new(),
    };
    for f in 0..n_frames {
        if f > 0 {
            scene.step();
        }
        clip.truths.push(scene.truth());
        clip.frames.push(scene.render());
    }
    let mut qs = questions(&clip.truths, cfg.questions_per_clip, &mut rng);
    if n_frames > 1
        && cfg.latest_frame_questions > 0
        && let Some(last) = clip.truths.last()
    {
        qs.extend(questions(
            std::slice::from_ref(last),
            cfg.latest_frame_questions,
            &mut rng,
        ));
    }
    Ok((clip, qs))
}

/// One line of `qa.jsonl`.
#[derive(Debug, Serialize)]
struct QaLine<'a> {
    id: String,
    clip: usize,
    images: &'a [String],
    question: &'a str,
    answer: &'a str,
    kind: Kind,
    category: &'a str,
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetSummary {
    pub clips: usize,
    pub images: usize,
    pub questions: usize,
    pub single: usize,
    pub multi: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CameraError + '_ {
    move |source| CameraError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the dataset to `out`: `images/CLIP_F.png`, `qa.jsonl` (one question per line: id,
/// clip, images, question, answer, kind, category), `scenes.jsonl` (ground truth per clip)
/// and `meta.json`. Everything is written into a temporary sibling directory that is renamed
/// to `out` at the end, so `out` is never half-written. `out` must not exist or must be an
/// empty directory.
pub fn write_dataset(out: &Path, cfg: &DatasetConfig) -> Result<DatasetSummary> {
    write_dataset_replacing(out, cfg, false)
}

/// [`write_dataset`], and with `replace` an existing non-empty dataset directory at `out` is
/// replaced too: the old directory stays untouched until the new one is complete, then the
/// two are swapped and the old one removed. An `out` that is a file is never replaced.
pub fn write_dataset_replacing(
    out: &Path,
    cfg: &DatasetConfig,
    replace: bool,
) -> Result<DatasetSummary> {
    if out.exists() && !out.is_dir() {
        return Err(CameraError::Write {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output exists and is not a directory",
            ),
        });
    }
    if out.exists() && !replace && !replace_allowed(out)? {
        return Err(CameraError::Write {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory exists and is not empty (pass --force to replace it)",
            ),
        });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let tmp: PathBuf = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    let result = write_into(&tmp, cfg);
    match result {
        Ok(summary) => {
            if out.exists() {
                // Move the old directory aside first, so that a failure before the rename
                // below leaves either the old dataset or the new one in place, never neither.
                let old = parent.join(format!(".{name}.old-{}", std::process::id()));
                std::fs::rename(out, &old).map_err(io_err(out))?;
                if let Err(e) = std::fs::rename(&tmp, out) {
                    let _ = std::fs::rename(&old, out);
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(io_err(out)(e));
                }
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            } else {
                std::fs::rename(&tmp, out).map_err(io_err(out))?;
            }
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn replace_allowed(out: &Path) -> Result<bool> {
    let mut entries = std::fs::read_dir(out).map_err(io_err(out))?;
    Ok(entries.next().is_none())
}

fn write_into(dir: &Path, cfg: &DatasetConfig) -> Result<DatasetSummary> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    let qa_path = dir.join("qa.jsonl");
    let scenes_path = dir.join("scenes.jsonl");
    let mut qa =
        std::io::BufWriter::new(std::fs::File::create(&qa_path).map_err(io_err(&qa_path))?);
    let mut scenes =
        std::io::BufWriter::new(std::fs::File::create(&scenes_path).map_err(io_err(&scenes_path))?);
    let mut summary = DatasetSummary::default();
    let (w, h) = (cfg.scene.width, cfg.scene.height);
    for i in 0..cfg.count {
        let (clip, qs) = clip(cfg, i)?;
        let mut paths = Vec::new();
        for (f, rgb) in clip.frames.iter().enumerate() {
            let rel = format!("images/{i:06}_{f}.png");
            let path = dir.join(&rel);
            image::save_buffer(&path, rgb, w, h, image::ExtendedColorType::Rgb8).map_err(
                |source| CameraError::WriteImage {
                    path: path.clone(),
                    source,
                },
            )?;
            paths.push(rel);
        }
        summary.images += paths.len();
        summary.clips += 1;
        let line = serde_json::json!({"clip": i, "images": paths, "truth": clip.truths});
        writeln!(scenes, "{line}").map_err(io_err(&scenes_path))?;
        for (k, q) in qs.iter().enumerate() {
            let line = QaLine {
                id: format!("{i:06}-{k}"),
                clip: i,
                images: &paths,
                question: &q.question,
                answer: &q.answer,
                kind: q.kind,
                category: q.category,
            };
            let text = serde_json::to_string(&line).map_err(|e| CameraError::Write {
                path: qa_path.clone(),
                source: e.into(),
            })?;
            writeln!(qa, "{text}").map_err(io_err(&qa_path))?;
            summary.questions += 1;
            match q.kind {
                Kind::Single => summary.single += 1,
                Kind::Multi => summary.multi += 1,
            }
        }
    }
    qa.flush().map_err(io_err(&qa_path))?;
    scenes.flush().map_err(io_err(&scenes_path))?;
    let meta = serde_json::json!({
        "format": 1,
        "generator": "jetvlm-camera synthetic scenes",
        "seed": cfg.seed,
        "count": cfg.count,
        "width": w,
        "height": h,
        "multi_fraction": cfg.multi_fraction,
        "frames": [cfg.frames.0, cfg.frames.1],
        "questions_per_clip": cfg.questions_per_clip,
        "latest_frame_questions": cfg.latest_frame_questions,
        "images": summary.images,
        "questions": summary.questions,
        "single": summary.single,
        "multi": summary.multi,
    });
    let meta_path = dir.join("meta.json");
    std::fs::write(&meta_path, format!("{meta:#}\n")).map_err(io_err(&meta_path))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(objects: Vec<(u32, Colour, Shape, f32, f32)>) -> FrameTruth {
        let mut scene = Scene::new(
            SceneConfig {
                p_enter: 0.0,
                p_leave: 0.0,
                ..SceneConfig::default()
            },
            1,
        )
        .unwrap();
        let template = scene.truth().objects.first().cloned();
        scene.step();
        let template = template.unwrap_or_else(|| panic!("seed 1 has objects"));
        FrameTruth {
            index: 0,
            width: 128,
            height: 128,
            objects: objects
                .into_iter()
                .map(|(id, colour, shape, x, y)| Object {
                    id,
                    colour,
                    shape,
                    x,
                    y,
                    ..template.clone()
                })
                .collect(),
        }
    }

    #[test]
    fn single_frame_answers_match_truth() {
        let t = truth(vec![
            (0, Colour::Red, Shape::Circle, 20.0, 60.0),
            (1, Colour::Red, Shape::Square, 100.0, 30.0),
            (2, Colour::Blue, Shape::Triangle, 64.0, 100.0),
        ]);
        let mut rng = Rng::new(5);
        for _ in 0..200 {
            for q in questions(std::slice::from_ref(&t), 8, &mut rng) {
                assert_eq!(q.kind, Kind::Single);
                let expect = match q.question.as_str() {
                    "how many objects are there?" => "3",
                    "how many red objects are there?" => "2",
                    "how many blue objects are there?" | "how many circles are there?" => "1",
                    "what colour is the triangle?" => "blue",
                    "what shape is the blue object?" => "triangle",
                    "where is the red circle?" => "left",
                    "where is the red square?" => "right",
                    "where is the blue triangle?" => "center",
                    "is there a red square?" => "yes",
                    "how many objects are in the left zone?" => "1",
                    "what shape is the red object?" => panic!("red is not unique"),
                    _ => continue,
                };
                assert_eq!(q.answer, expect, "{}", q.question);
            }
        }
    }

    #[test]
    fn multi_frame_answers_match_truth() {
        let first = truth(vec![
            (0, Colour::Red, Shape::Circle, 20.0, 60.0),
            (1, Colour::Green, Shape::Square, 100.0, 30.0),
            (2, Colour::Blue, Shape::Triangle, 64.0, 100.0),
        ]);
        let last = truth(vec![
            (0, Colour::Red, Shape::Circle, 20.0, 60.0),
            (2, Colour::Blue, Shape::Triangle, 20.0, 100.0),
            (3, Colour::Yellow, Shape::Circle, 100.0, 100.0),
            (4, Colour::Purple, Shape::Square, 110.0, 20.0),
        ]);
        let mut rng = Rng::new(9);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            for q in questions(&[first.clone(), last.clone()], 8, &mut rng) {
                seen.insert(q.category);
                let expect = match q.question.as_str() {
                    "how many objects now vs before?" => "4 vs 3",
                    "are there more or fewer objects than before?" => "more",
                    "which object moved?" => "blue triangle",
                    "how many objects moved?" => "1",
                    "did the red circle move?" => "no",
                    "did the blue triangle move?" => "yes",
                    "what left?" => "green square",
                    "what entered the left zone?" => "blue triangle",
                    "what entered the center zone?" => "nothing",
                    "what appeared?" => panic!("two objects appeared: ambiguous"),
                    "what entered the right zone?" => panic!("two objects entered the right zone"),
                    other => panic!("unexpected question {other}"),
                };
                assert_eq!(q.answer, expect, "{}", q.question);
            }
        }
        assert!(!seen.contains("appeared"));
        assert!(seen.contains("entered_zone") && seen.contains("moved"));
    }

    #[test]
    fn borderline_motion_is_not_asked() {
        let first = truth(vec![(0, Colour::Red, Shape::Circle, 20.0, 60.0)]);
        let last = truth(vec![(0, Colour::Red, Shape::Circle, 22.0, 60.0)]);
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            for q in questions(&[first.clone(), last.clone()], 8, &mut rng) {
                assert!(!["moved", "moved_count", "did_move"].contains(&q.category));
            }
        }
    }

    #[test]
    fn clips_are_deterministic_and_mixed() {
        let cfg = DatasetConfig {
            count: 40,
            seed: 3,
            ..DatasetConfig::default()
        };
        let (a, qa) = clip(&cfg, 5).unwrap();
        let (b, qb) = clip(&cfg, 5).unwrap();
        assert_eq!(a.frames, b.frames);
        assert_eq!(qa, qb);
        let kinds: Vec<usize> = (0..40)
            .map(|i| clip(&cfg, i).unwrap().0.frames.len())
            .collect();
        assert!(
            kinds.contains(&1) && kinds.iter().any(|&k| k >= 2) && kinds.iter().all(|&k| k <= 4)
        );
    }

    #[test]
    fn dataset_is_written_whole_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let cfg = DatasetConfig {
            count: 6,
            seed: 2,
            ..DatasetConfig::default()
        };
        let s = write_dataset(&out, &cfg).unwrap();
        assert_eq!(s.clips, 6);
        let qa = std::fs::read_to_string(out.join("qa.jsonl")).unwrap();
        assert_eq!(qa.lines().count(), s.questions);
        for line in qa.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for img in v["images"].as_array().unwrap() {
                let p = out.join(img.as_str().unwrap());
                let im = image::open(&p).unwrap();
                assert_eq!((im.width(), im.height()), (128, 128));
            }
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary directory left behind");
        let err = write_dataset(&out, &cfg).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        // The refused write left the existing dataset as it was.
        assert_eq!(std::fs::read_to_string(out.join("qa.jsonl")).unwrap(), qa);

        // --force replaces it with a complete new dataset and leaves nothing beside it.
        let cfg2 = DatasetConfig {
            seed: 9,
            count: 4,
            ..cfg
        };
        let s2 = write_dataset_replacing(&out, &cfg2, true).unwrap();
        assert_eq!(s2.clips, 4);
        let qa2 = std::fs::read_to_string(out.join("qa.jsonl")).unwrap();
        assert_eq!(qa2.lines().count(), s2.questions);
        assert_ne!(qa2, qa);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no old or temporary directory left behind"
        );

        // A file is never replaced, not even with --force.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(write_dataset_replacing(&file, &cfg2, true).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn single_frame_answers_agree_with_every_generated_question() {
        let cfg = DatasetConfig {
            count: 300,
            seed: 11,
            ..DatasetConfig::default()
        };
        let mut checked = 0;
        for i in 0..cfg.count {
            let (c, qs) = clip(&cfg, i).unwrap();
            if c.truths.len() != 1 {
                continue;
            }
            for q in qs {
                assert_eq!(
                    single_frame_answer(&q.question, &c.truths[0]).as_deref(),
                    Some(q.answer.as_str()),
                    "{}",
                    q.question
                );
                checked += 1;
            }
        }
        assert!(checked > 300, "only {checked} questions checked");
        let t = &clip(&cfg, 0).unwrap().0.truths[0];
        assert_eq!(single_frame_answer("what is the meaning of life?", t), None);
        assert_eq!(
            single_frame_answer("  How many objects are there? ", t),
            Some(t.objects.len().to_string())
        );
    }

    #[test]
    fn multi_frame_clips_also_ask_about_the_latest_frame() {
        let cfg = DatasetConfig {
            count: 60,
            seed: 4,
            ..DatasetConfig::default()
        };
        let without = DatasetConfig {
            latest_frame_questions: 0,
            ..cfg.clone()
        };
        let mut multi_clips = 0;
        for i in 0..cfg.count {
            let (c, qs) = clip(&cfg, i).unwrap();
            let (_, base) = clip(&without, i).unwrap();
            // The extra question comes after the clip's own questions, which stay the same.
            assert_eq!(&qs[..base.len()], &base[..]);
            if c.truths.len() == 1 {
                assert_eq!(qs.len(), base.len());
                continue;
            }
            multi_clips += 1;
            assert_eq!(qs.len(), base.len() + 1);
            let extra = &qs[base.len()];
            assert_eq!(extra.kind, Kind::Single);
            let last = c.truths.last().unwrap();
            assert_eq!(
                single_frame_answer(&extra.question, last).as_deref(),
                Some(extra.answer.as_str())
            );
        }
        assert!(multi_clips > 10);
    }
}
