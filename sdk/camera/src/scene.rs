//! The synthetic camera scene: a lit, noisy background with coloured shapes that move,
//! enter and leave between frames, and the exact ground truth of every frame.
//!
//! Dynamics and rendering use separate random streams, so the ground truth of a seed does
//! not depend on whether (or at what size) frames are rendered.

use serde::Serialize;

use crate::error::{CameraError, Result};
use crate::rng::Rng;

/// Object colours, with their nominal RGB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
}

impl Colour {
    pub const ALL: [Colour; 5] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
        }
    }

    fn rgb(self) -> [f32; 3] {
        match self {
            Colour::Red => [210.0, 35.0, 35.0],
            Colour::Green => [35.0, 170.0, 55.0],
            Colour::Blue => [40.0, 70.0, 215.0],
            Colour::Yellow => [230.0, 205.0, 30.0],
            Colour::Purple => [145.0, 50.0, 190.0],
        }
    }
}

/// Object shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }

    /// Whether the point (dx, dy) relative to the centre lies inside a shape of size `r`.
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.88 * r && dy.abs() <= 0.88 * r,
            Shape::Triangle => {
                // Upward equilateral triangle with circumradius 1.2 r.
                let big_r = 1.2 * r;
                let half_base = big_r * 0.866_025_4;
                let bottom = 0.5 * big_r;
                if dy > bottom || dy < -big_r {
                    return false;
                }
                // Width at height dy grows linearly from 0 at the apex to half_base at the base.
                let t = (dy + big_r) / (bottom + big_r);
                dx.abs() <= t * half_base
            }
        }
    }
}

/// Horizontal thirds of the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    Left,
    Center,
    Right,
}

impl Zone {
    pub const ALL: [Zone; 3] = [Zone::Left, Zone::Center, Zone::Right];

    pub fn name(self) -> &'static str {
        match self {
            Zone::Left => "left",
            Zone::Center => "center",
            Zone::Right => "right",
        }
    }

    /// The zone of horizontal position `x` in a frame `width` wide.
    pub fn of(x: f32, width: f32) -> Zone {
        if x < width / 3.0 {
            Zone::Left
        } else if x < 2.0 * width / 3.0 {
            Zone::Center
        } else {
            Zone::Right
        }
    }

    /// Distance from `x` to the nearest zone boundary.
    pub fn boundary_distance(x: f32, width: f32) -> f32 {
        (x - width / 3.0).abs().min((x - 2.0 * width / 3.0).abs())
    }
}

/// Scene parameters. Sizes and speeds are fractions of the shorter frame side, so the same
/// seed gives the same scene layout at every resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneConfig {
    pub width: u32,
    pub height: u32,
    /// Most objects visible at once.
    pub max_objects: usize,
    /// Probability per frame that a new object enters (when below `max_objects`).
    pub p_enter: f32,
    /// Probability per frame and object that it leaves.
    pub p_leave: f32,
    /// Probability that an object is a moving one.
    pub p_moving: f32,
    /// Object size (radius) range, as fractions of the shorter side.
    pub size: (f32, f32),
    /// Speed range of moving objects per frame, as fractions of the shorter side.
    pub speed: (f32, f32),
}

impl Default for SceneConfig {
    fn default() -> Self {
        Self {
            width: 128,
            height: 128,
            max_objects: 5,
            p_enter: 0.25,
            p_leave: 0.08,
            p_moving: 0.45,
            size: (0.085, 0.125),
            speed: (0.06, 0.10),
        }
    }
}

impl SceneConfig {
    /// Checks the parameters, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CameraError::InvalidScene(m));
        if !(16..=4096).contains(&self.width) || !(16..=4096).contains(&self.height) {
            return bad(format!(
                "frame size {}x{} outside 16..=4096",
                self.width, self.height
            ));
        }
        if self.max_objects == 0 || self.max_objects > 12 {
            return bad(format!("max_objects {} outside 1..=12", self.max_objects));
        }
        for (name, p) in [
            ("p_enter", self.p_enter),
            ("p_leave", self.p_leave),
            ("p_moving", self.p_moving),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} {p} outside [0, 1]"));
            }
        }
        if !(self.size.0 > 0.0 && self.size.0 <= self.size.1 && self.size.1 <= 0.25) {
            return bad(format!(
                "size range {:?} must satisfy 0 < lo <= hi <= 0.25",
                self.size
            ));
        }
        if !(self.speed.0 >= 0.0 && self.speed.0 <= self.speed.1 && self.speed.1 <= 0.5) {
            return bad(format!(
                "speed range {:?} must satisfy 0 <= lo <= hi <= 0.5",
                self.speed
            ));
        }
        Ok(())
    }

    fn side(&self) -> f32 {
        self.width.min(self.height) as f32
    }
}

/// One object of the scene, in pixels of the configured frame size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Object {
    /// Stable identity while the object stays in the scene.
    pub id: u32,
    pub colour: Colour,
    pub shape: Shape,
    pub x: f32,
    pub y: f32,
    /// Radius-like size in pixels.
    pub size: f32,
    pub vx: f32,
    pub vy: f32,
    #[serde(skip)]
    pub(crate) tint: [f32; 3],
}

impl Object {
    /// "red square".
    pub fn name(&self) -> String {
        format!("{} {}", self.colour.name(), self.shape.name())
    }

    pub fn zone(&self, width: u32) -> Zone {
        Zone::of(self.x, width as f32)
    }
}

/// Ground truth of one frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrameTruth {
    pub index: u64,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Object>,
}

impl FrameTruth {
    pub fn find(&self, id: u32) -> Option<&Object> {
        self.objects.iter().find(|o| o.id == id)
    }
}

#[derive(Clone, Debug)]
struct Lighting {
    base: [f32; 3],
    dir: (f32, f32),
    strength: f32,
    noise_sigma: f32,
}

/// A deterministic synthetic scene.
#[derive(Clone, Debug)]
pub struct Scene {
    cfg: SceneConfig,
    dynamics: Rng,
    noise: Rng,
    objects: Vec<Object>,
    next_id: u32,
    index: u64,
    /// (colour, shape, frame index it left at): not reused for a while, so names stay unique
    /// over any short clip.
    recently_left: Vec<(Colour, Shape, u64)>,
    lighting: Lighting,
}

const REUSE_AFTER_FRAMES: u64 = 8;

impl Scene {
    /// A new scene for `seed`, at frame 0.
    pub fn new(cfg: SceneConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut dynamics = Rng::derive(seed, 1);
        let noise = Rng::derive(seed, 2);
        let grey = dynamics.range_f32(70.0, 170.0);
        let base = [
            grey + dynamics.range_f32(-15.0, 15.0),
            grey + dynamics.range_f32(-15.0, 15.0),
            grey + dynamics.range_f32(-15.0, 15.0),
        ];
        let angle = dynamics.range_f32(0.0, std::f32::consts::TAU);
        let lighting = Lighting {
            base,
            dir: (angle.cos(), angle.sin()),
            strength: dynamics.range_f32(0.1, 0.4),
            noise_sigma: dynamics.range_f32(2.0, 7.0),
        };
        let mut scene = Self {
            cfg,
            dynamics,
            noise,
            objects: Vec::new(),
            next_id: 0,
            index: 0,
            recently_left: Vec::new(),
            lighting,
        };
        let initial = if scene.dynamics.chance(0.05) {
            0
        } else {
            1 + scene.dynamics.below(scene.cfg.max_objects)
        };
        for _ in 0..initial {
            scene.spawn();
        }
        Ok(scene)
    }

    pub fn config(&self) -> &SceneConfig {
        &self.cfg
    }

    /// Index of the current frame.
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// Ground truth of the current frame.
    pub fn truth(&self) -> FrameTruth {
        FrameTruth {
            index: self.index,
            width: self.cfg.width,
            height: self.cfg.height,
            objects: self.objects.clone(),
        }
    }

    fn fits(&self, x: f32, y: f32, size: f32, skip: Option<u32>) -> bool {
        let (w, h) = (self.cfg.width as f32, self.cfg.height as f32);
        let margin = size * 1.2 + 1.0;
        if x < margin || y < margin || x > w - margin || y > h - margin {
            return false;
        }
        self.objects.iter().filter(|o| Some(o.id) != skip).all(|o| {
            let d = ((o.x - x).powi(2) + (o.y - y).powi(2)).sqrt();
            d >= 1.25 * (o.size + size) + 3.0
        })
    }

    /// Adds a new object with a colour/shape not present or recently gone; false when none fits.
    fn spawn(&mut self) -> bool {
        let index = self.index;
        let taken = |c: Colour, s: Shape, objs: &[Object], left: &[(Colour, Shape, u64)]| {
            objs.iter().any(|o| o.colour == c && o.shape == s)
                || left
                    .iter()
                    .any(|&(lc, ls, at)| lc == c && ls == s && index < at + REUSE_AFTER_FRAMES)
        };
        let mut free = Vec::new();
        for c in Colour::ALL {
            for s in Shape::ALL {
                if !taken(c, s, &self.objects, &self.recently_left) {
                    free.push((c, s));
                }
            }
        }
        let Some(&(colour, shape)) = self.dynamics.choose(&free) else {
            return false;
        };
        let side = self.cfg.side();
        let size = side * self.dynamics.range_f32(self.cfg.size.0, self.cfg.size.1);
        let (w, h) = (self.cfg.width as f32, self.cfg.height as f32);
        for _ in 0..60 {
            let x = self.dynamics.range_f32(0.0, w);
            let y = self.dynamics.range_f32(0.0, h);
            if !self.fits(x, y, size, None) {
                continue;
            }
            let (vx, vy) = if self.dynamics.chance(self.cfg.p_moving) {
                let speed = side * self.dynamics.range_f32(self.cfg.speed.0, self.cfg.speed.1);
                let a = self.dynamics.range_f32(0.0, std::f32::consts::TAU);
                (speed * a.cos(), speed * a.sin())
            } else {
                (0.0, 0.0)
            };
            let tint = [
                self.dynamics.range_f32(-12.0, 12.0),
                self.dynamics.range_f32(-12.0, 12.0),
                self.dynamics.range_f32(-12.0, 12.0),
            ];
            self.objects.push(Object {
                id: self.next_id,
                colour,
                shape,
                x,
                y,
                size,
                vx,
                vy,
                tint,
            });
            self.next_id += 1;
            return true;
        }
        false
    }

    /// Advances to the next frame: objects leave, move (bouncing off walls and each other)
    /// and enter.
    pub fn step(&mut self) {
        self.index += 1;
        let mut kept = Vec::with_capacity(self.objects.len());
        for o in std::mem::take(&mut self.objects) {
            if self.dynamics.chance(self.cfg.p_leave) {
                self.recently_left.push((o.colour, o.shape, self.index));
            } else {
                kept.push(o);
            }
        }
        self.objects = kept;
        let index = self.index;
        self.recently_left
            .retain(|&(_, _, at)| index < at + REUSE_AFTER_FRAMES);
        for i in 0..self.objects.len() {
            let o = &self.objects[i];
            if o.vx == 0.0 && o.vy == 0.0 {
                continue;
            }
            let (id, size) = (o.id, o.size);
            let (mut vx, mut vy) = (o.vx, o.vy);
            let (w, h) = (self.cfg.width as f32, self.cfg.height as f32);
            let margin = size * 1.2 + 1.0;
            let mut nx = o.x + vx;
            let mut ny = o.y + vy;
            if nx < margin || nx > w - margin {
                vx = -vx;
                nx = o.x + vx;
            }
            if ny < margin || ny > h - margin {
                vy = -vy;
                ny = o.y + vy;
            }
            let o = &mut self.objects[i];
            o.vx = vx;
            o.vy = vy;
            if self.fits(nx, ny, size, Some(id)) {
                let o = &mut self.objects[i];
                o.x = nx;
                o.y = ny;
            } else {
                // Blocked: turn around and wait for this frame.
                let o = &mut self.objects[i];
                o.vx = -vx;
                o.vy = -vy;
            }
        }
        if self.objects.len() < self.cfg.max_objects && self.dynamics.chance(self.cfg.p_enter) {
            self.spawn();
        }
    }

    /// Renders the current frame as packed RGB8 (`width * height * 3` bytes).
    pub fn render(&mut self) -> Vec<u8> {
        let (w, h) = (self.cfg.width as usize, self.cfg.height as usize);
        let light = &self.lighting;
        // Slight global flicker, like auto-exposure hunting.
        let gain = 1.0 + 0.02 * self.noise.normal();
        let mut img = vec![0f32; w * h * 3];
        let illum = |x: f32, y: f32| -> f32 {
            let u = x / w as f32 - 0.5;
            let v = y / h as f32 - 0.5;
            gain * (1.0 + 2.0 * light.strength * (u * light.dir.0 + v * light.dir.1))
        };
        for y in 0..h {
            for x in 0..w {
                let l = illum(x as f32 + 0.5, y as f32 + 0.5);
                let i = (y * w + x) * 3;
                for c in 0..3 {
                    img[i + c] = light.base[c] * l;
                }
            }
        }
        const SUB: [(f32, f32); 4] = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)];
        for o in &self.objects {
            let nominal = o.colour.rgb();
            let rgb = [
                nominal[0] + o.tint[0],
                nominal[1] + o.tint[1],
                nominal[2] + o.tint[2],
            ];
            let reach = o.size * 1.25 + 1.0;
            let x0 = (o.x - reach).floor().max(0.0) as usize;
            let x1 = ((o.x + reach).ceil() as usize).min(w);
            let y0 = (o.y - reach).floor().max(0.0) as usize;
            let y1 = ((o.y + reach).ceil() as usize).min(h);
            for y in y0..y1 {
                for x in x0..x1 {
                    let inside = SUB
                        .iter()
                        .filter(|&&(sx, sy)| {
                            o.shape
                                .contains(x as f32 + sx - o.x, y as f32 + sy - o.y, o.size)
                        })
                        .count();
                    if inside == 0 {
                        continue;
                    }
                    let cover = inside as f32 / SUB.len() as f32;
                    // Soft top-lit shading across the object.
                    let shade = 1.0 - 0.12 * (y as f32 - o.y) / o.size;
                    let l = illum(x as f32 + 0.5, y as f32 + 0.5) * shade;
                    let i = (y * w + x) * 3;
                    for c in 0..3 {
                        img[i + c] = img[i + c] * (1.0 - cover) + rgb[c] * l * cover;
                    }
                }
            }
        }
        let sigma = light.noise_sigma;
        img.iter()
            .map(|&v| (v + sigma * self.noise.normal()).round().clamp(0.0, 255.0) as u8)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_frames_and_truth() {
        let mut a = Scene::new(SceneConfig::default(), 7).unwrap();
        let mut b = Scene::new(SceneConfig::default(), 7).unwrap();
        for _ in 0..5 {
            assert_eq!(a.truth(), b.truth());
            assert_eq!(a.render(), b.render());
            a.step();
            b.step();
        }
        let c = Scene::new(SceneConfig::default(), 8).unwrap();
        assert_ne!(a.truth().objects, c.truth().objects);
    }

    #[test]
    fn truth_does_not_depend_on_rendering() {
        let mut a = Scene::new(SceneConfig::default(), 3).unwrap();
        let mut b = Scene::new(SceneConfig::default(), 3).unwrap();
        for _ in 0..20 {
            a.render();
            a.step();
            b.step();
        }
        assert_eq!(a.truth(), b.truth());
    }

    #[test]
    fn objects_stay_inside_apart_and_unique() {
        let cfg = SceneConfig::default();
        for seed in 0..20 {
            let mut s = Scene::new(cfg.clone(), seed).unwrap();
            for _ in 0..40 {
                let t = s.truth();
                assert!(t.objects.len() <= cfg.max_objects);
                for (i, o) in t.objects.iter().enumerate() {
                    assert!(
                        o.x - o.size > 0.0 && o.x + o.size < cfg.width as f32,
                        "{o:?}"
                    );
                    assert!(
                        o.y - o.size > 0.0 && o.y + o.size < cfg.height as f32,
                        "{o:?}"
                    );
                    for p in &t.objects[i + 1..] {
                        assert!((o.colour, o.shape) != (p.colour, p.shape));
                        let d = ((o.x - p.x).powi(2) + (o.y - p.y).powi(2)).sqrt();
                        assert!(d > o.size + p.size, "overlap {o:?} {p:?}");
                    }
                }
                s.step();
            }
        }
    }

    #[test]
    fn objects_move_enter_and_leave() {
        let (mut moved, mut entered, mut left) = (0, 0, 0);
        for seed in 0..10 {
            let mut s = Scene::new(SceneConfig::default(), seed).unwrap();
            for _ in 0..20 {
                let before = s.truth();
                s.step();
                let after = s.truth();
                for o in &after.objects {
                    match before.find(o.id) {
                        Some(p) if (p.x, p.y) != (o.x, o.y) => moved += 1,
                        Some(_) => {}
                        None => entered += 1,
                    }
                }
                left += before
                    .objects
                    .iter()
                    .filter(|o| after.find(o.id).is_none())
                    .count();
            }
        }
        assert!(
            moved > 20 && entered > 10 && left > 10,
            "{moved} {entered} {left}"
        );
    }

    #[test]
    fn rendered_object_has_its_colour() {
        let cfg = SceneConfig {
            p_leave: 0.0,
            ..SceneConfig::default()
        };
        let mut s = Scene::new(cfg.clone(), 11).unwrap();
        let rgb = s.render();
        let t = s.truth();
        assert!(!t.objects.is_empty());
        assert_eq!(rgb.len(), (cfg.width * cfg.height * 3) as usize);
        for o in &t.objects {
            let i = ((o.y as usize) * cfg.width as usize + o.x as usize) * 3;
            let px = [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32];
            let dominant = match o.colour {
                Colour::Red => px[0] > px[1] + 40.0 && px[0] > px[2] + 40.0,
                Colour::Green => px[1] > px[0] + 40.0 && px[1] > px[2] + 40.0,
                Colour::Blue => px[2] > px[0] + 40.0 && px[2] > px[1] + 40.0,
                Colour::Yellow => px[0] > px[2] + 60.0 && px[1] > px[2] + 60.0,
                Colour::Purple => px[0] > px[1] + 30.0 && px[2] > px[1] + 30.0,
            };
            assert!(dominant, "{:?} at centre renders {px:?}", o.colour);
        }
    }

    #[test]
    fn bad_config_is_rejected() {
        let cfg = SceneConfig {
            width: 4,
            ..SceneConfig::default()
        };
        assert!(
            matches!(Scene::new(cfg, 1), Err(CameraError::InvalidScene(m)) if m.contains("4x128"))
        );
        let cfg = SceneConfig {
            p_enter: 1.5,
            ..SceneConfig::default()
        };
        assert!(
            matches!(Scene::new(cfg, 1), Err(CameraError::InvalidScene(m)) if m.contains("p_enter"))
        );
    }
}
