//! The manifest's prompt template turned into an ordered list of text and frame parts.
//!
//! `{frames}` expands, for each frame i (oldest first, 1-based), to `frame_prefix` (with
//! `{i}` = i), the frame's embeddings, then `frame_suffix`; `{question}` is the question.
//! A package that splits frames into tiles (`vision.tiles`) lays a frame's embeddings out as
//! its processor does: `tile_prefix` (`{row}`, `{col}`) and each tile's embeddings row by
//! row, `row_suffix` after each row, then `global_prefix` and the global image's.
//! Adjacent text is merged, so each text part is tokenized as one string.

use jetvlm_vision::package::{PromptSection, TileSection};

/// One part of a prompt, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// The frame at this index of the frames given.
    Frame(usize),
    /// Encoder run `tile` (row-major tiles, then the global image) of frame `frame`.
    Tile {
        frame: usize,
        tile: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Frames,
    Question,
}

/// A parsed prompt template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate {
    pieces: Vec<Piece>,
    frame_prefix: String,
    frame_suffix: String,
    /// Text placed before the template in a streaming session (system prompt).
    system: Option<String>,
    /// How a frame is split into tiles (`None`: one run per frame).
    tiles: Option<TileSection>,
}

impl PromptTemplate {
    pub fn new(p: &PromptSection) -> Self {
        let mut pieces = Vec::new();
        let mut rest = p.template.as_str();
        while !rest.is_empty() {
            let next = [("{frames}", Piece::Frames), ("{question}", Piece::Question)]
                .into_iter()
                .filter_map(|(pat, piece)| rest.find(pat).map(|i| (i, pat.len(), piece)))
                .min_by_key(|(i, _, _)| *i);
            match next {
                Some((i, len, piece)) => {
                    if i > 0 {
                        pieces.push(Piece::Text(rest[..i].to_string()));
                    }
                    pieces.push(piece);
                    rest = &rest[i + len..];
                }
                None => {
                    pieces.push(Piece::Text(rest.to_string()));
                    rest = "";
                }
            }
        }
        PromptTemplate {
            pieces,
            frame_prefix: p.frame_prefix.clone(),
            frame_suffix: p.frame_suffix.clone(),
            system: p.system.clone(),
            tiles: None,
        }
    }

    /// This template for a package whose frames are split into `tiles`.
    pub fn with_tiles(self, tiles: Option<&TileSection>) -> Self {
        PromptTemplate {
            tiles: tiles.cloned(),
            ..self
        }
    }

    /// The whole prompt for `n_frames` frames and a question.
    pub fn layout(&self, n_frames: usize, question: &str) -> Vec<Part> {
        let mut parts = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => push_text(&mut parts, t),
                Piece::Question => push_text(&mut parts, question),
                Piece::Frames => {
                    for i in 0..n_frames {
                        push_text(
                            &mut parts,
                            &self.frame_prefix.replace("{i}", &(i + 1).to_string()),
                        );
                        self.push_frame(&mut parts, i);
                        push_text(
                            &mut parts,
                            &self.frame_suffix.replace("{i}", &(i + 1).to_string()),
                        );
                    }
                }
            }
        }
        parts
    }

    /// Frame `i`'s embeddings: the whole frame, or its tiles with their text.
    fn push_frame(&self, parts: &mut Vec<Part>, i: usize) {
        let Some(t) = &self.tiles else {
            parts.push(Part::Frame(i));
            return;
        };
        let mut tile = 0;
        for row in 0..t.rows {
            for col in 0..t.cols {
                push_text(parts, &t.tile_text(row, col));
                parts.push(Part::Tile { frame: i, tile });
                tile += 1;
            }
            push_text(parts, &t.row_suffix);
        }
        if t.global_image {
            push_text(parts, &t.global_prefix);
            parts.push(Part::Tile { frame: i, tile });
        }
    }

    /// For a streaming session: the text kept before the frames (system prompt and the
    /// template up to `{frames}`) and the text after them with the question. `None` when the
    /// template puts the question before the frames (a rolling window cannot keep it).
    pub fn session_split(&self, question: &str) -> Option<(String, String)> {
        let at = self.pieces.iter().position(|p| *p == Piece::Frames)?;
        if self.pieces[..at].contains(&Piece::Question) {
            return None;
        }
        let mut before = self.system.clone().unwrap_or_default();
        for p in &self.pieces[..at] {
            if let Piece::Text(t) = p {
                before.push_str(t);
            }
        }
        let mut after = String::new();
        for p in &self.pieces[at + 1..] {
            match p {
                Piece::Text(t) => after.push_str(t),
                Piece::Question => after.push_str(question),
                Piece::Frames => return None,
            }
        }
        Some((before, after))
    }
}

fn push_text(parts: &mut Vec<Part>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Part::Text(last)) = parts.last_mut() {
        last.push_str(text);
    } else {
        parts.push(Part::Text(text.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(template: &str, prefix: &str) -> PromptSection {
        PromptSection {
            template: template.into(),
            frame_prefix: prefix.into(),
            frame_suffix: String::new(),
            add_bos: true,
            stop: vec![],
            default_question: None,
            image_token: None,
            system: Some("SYS ".into()),
            max_frames: None,
        }
    }

    #[test]
    fn frames_and_question_expand_in_order() {
        let t = PromptTemplate::new(&section(
            "<frames>{frames}</frames><q>{question}</q><a>",
            "<f{i}>",
        ));
        assert_eq!(
            t.layout(2, "how many?"),
            vec![
                Part::Text("<frames><f1>".into()),
                Part::Frame(0),
                Part::Text("<f2>".into()),
                Part::Frame(1),
                Part::Text("</frames><q>how many?</q><a>".into()),
            ]
        );
        assert_eq!(
            t.session_split("why?"),
            Some((
                "SYS <frames>".to_string(),
                "</frames><q>why?</q><a>".to_string()
            ))
        );
    }

    #[test]
    fn llava_style_and_question_first() {
        let t = PromptTemplate::new(&section("USER: {frames}\n{question} ASSISTANT:", ""));
        assert_eq!(
            t.layout(1, "what?"),
            vec![
                Part::Text("USER: ".into()),
                Part::Frame(0),
                Part::Text("\nwhat? ASSISTANT:".into())
            ]
        );
        let q_first = PromptTemplate::new(&section("{question} {frames}", ""));
        assert_eq!(q_first.session_split("x"), None);
        assert_eq!(q_first.layout(0, "x"), vec![Part::Text("x ".into())]);
    }

    /// A 2 x 3 grid with the global image, as Idefics3's processor lays out a split image:
    /// `<fake><row_r_col_c>` + tile per tile, "\n" after each row, then
    /// "\n<fake><global-img>" + the global image + the frame suffix; rows before columns.
    #[test]
    fn tiled_frames_lay_out_rows_then_columns_then_the_global_image() {
        let mut p = section("U:{frames}{question}", "");
        p.frame_suffix = "<f>".into();
        let tiles = TileSection {
            frame: jetvlm_vision::package::ImageSize {
                width: 130,
                height: 80,
            },
            longest_edge: Some(96),
            rows: 2,
            cols: 3,
            global_image: true,
            tile_prefix: "<f><row_{row}_col_{col}>".into(),
            row_suffix: "\n".into(),
            global_prefix: "\n<f><g>".into(),
        };
        let t = PromptTemplate::new(&p).with_tiles(Some(&tiles));
        let tile = |frame, tile| Part::Tile { frame, tile };
        let text = |s: &str| Part::Text(s.into());
        assert_eq!(
            t.layout(1, "q"),
            vec![
                text("U:<f><row_1_col_1>"),
                tile(0, 0),
                text("<f><row_1_col_2>"),
                tile(0, 1),
                text("<f><row_1_col_3>"),
                tile(0, 2),
                text("\n<f><row_2_col_1>"),
                tile(0, 3),
                text("<f><row_2_col_2>"),
                tile(0, 4),
                text("<f><row_2_col_3>"),
                tile(0, 5),
                text("\n\n<f><g>"),
                tile(0, 6),
                text("<f>q"),
            ]
        );
        // Without the global image the frame suffix follows the last row.
        let no_global = TileSection {
            global_image: false,
            ..tiles
        };
        let t = PromptTemplate::new(&p).with_tiles(Some(&no_global));
        let parts = t.layout(2, "q");
        assert_eq!(
            parts
                .iter()
                .filter(|p| matches!(p, Part::Tile { .. }))
                .count(),
            12
        );
        assert_eq!(parts[parts.len() - 2], tile(1, 5));
        assert_eq!(parts[parts.len() - 1], text("\n<f>q"));
    }
}
