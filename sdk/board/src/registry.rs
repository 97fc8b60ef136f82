//! Finding board profiles by name: the bundled `boards/*.yaml` (embedded in the binary, so
//! an installed `jetvlm` works anywhere), an optional directory of extra profiles, or a path
//! to one YAML file.

use crate::{BoardError, BoardProfile};
use jetvlm_core::ConfigError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The board profiles shipped in `boards/`, as `(name, yaml)`; the name is the file stem.
pub(crate) const BUNDLED: &[(&str, &str)] = &[
    (
        "agx-orin-32gb",
        include_str!("../../../boards/agx-orin-32gb.yaml"),
    ),
    (
        "agx-orin-64gb",
        include_str!("../../../boards/agx-orin-64gb.yaml"),
    ),
    (
        "agx-xavier-32gb",
        include_str!("../../../boards/agx-xavier-32gb.yaml"),
    ),
    (
        "agx-xavier-64gb",
        include_str!("../../../boards/agx-xavier-64gb.yaml"),
    ),
    (
        "orin-nano-4gb",
        include_str!("../../../boards/orin-nano-4gb.yaml"),
    ),
    (
        "orin-nano-4gb-super",
        include_str!("../../../boards/orin-nano-4gb-super.yaml"),
    ),
    (
        "orin-nano-8gb",
        include_str!("../../../boards/orin-nano-8gb.yaml"),
    ),
    (
        "orin-nano-8gb-super",
        include_str!("../../../boards/orin-nano-8gb-super.yaml"),
    ),
    (
        "orin-nx-8gb",
        include_str!("../../../boards/orin-nx-8gb.yaml"),
    ),
    (
        "orin-nx-16gb",
        include_str!("../../../boards/orin-nx-16gb.yaml"),
    ),
    (
        "thor-t5000",
        include_str!("../../../boards/thor-t5000.yaml"),
    ),
    (
        "xavier-nx-8gb",
        include_str!("../../../boards/xavier-nx-8gb.yaml"),
    ),
    (
        "xavier-nx-16gb",
        include_str!("../../../boards/xavier-nx-16gb.yaml"),
    ),
];

#[derive(Clone, Debug)]
enum Source {
    Bundled(&'static str),
    File(PathBuf),
}

/// Board names and where each profile comes from.
#[derive(Clone, Debug)]
pub struct BoardRegistry {
    boards: BTreeMap<String, Source>,
}

impl Default for BoardRegistry {
    fn default() -> Self {
        Self::bundled()
    }
}

impl BoardRegistry {
    /// The profiles compiled into the binary.
    pub fn bundled() -> Self {
        let boards = BUNDLED
            .iter()
            .map(|(name, text)| ((*name).to_string(), Source::Bundled(text)))
            .collect();
        BoardRegistry { boards }
    }

    /// Adds every `*.yaml` / `*.yml` in `dir` (named by file stem); a file named like a
    /// bundled board replaces it.
    pub fn with_dir(mut self, dir: &Path) -> Result<Self, BoardError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let is_yaml = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml")
            );
            if !is_yaml || !path.is_file() {
                continue;
            }
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                self.boards
                    .insert(stem.to_string(), Source::File(path.clone()));
            }
        }
        Ok(self)
    }

    /// Known board names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.boards.keys().cloned().collect()
    }

    /// Loads the profile registered under `name`. The profile's `name` field must equal the
    /// registered name (the file stem), so a copied file cannot masquerade as another board.
    pub fn get(&self, name: &str) -> Result<BoardProfile, BoardError> {
        let source = self
            .boards
            .get(name)
            .ok_or_else(|| BoardError::UnknownBoard {
                name: name.to_string(),
                known: self.names(),
            })?;
        let (profile, origin) = match source {
            Source::Bundled(text) => {
                let origin = PathBuf::from(format!("boards/{name}.yaml"));
                (BoardProfile::from_yaml_str(text, &origin)?, origin)
            }
            Source::File(path) => (BoardProfile::from_file(path)?, path.clone()),
        };
        if profile.name != name {
            return Err(ConfigError::invalid(
                &origin,
                "name",
                format!("`{}` differs from the file name `{name}`", profile.name),
            )
            .into());
        }
        Ok(profile)
    }

    /// A registered name, or a path to a board YAML file (anything ending in `.yaml` /
    /// `.yml`, or containing a path separator).
    pub fn resolve(&self, name_or_path: &str) -> Result<BoardProfile, BoardError> {
        if self.boards.contains_key(name_or_path) {
            return self.get(name_or_path);
        }
        let looks_like_path = name_or_path.ends_with(".yaml")
            || name_or_path.ends_with(".yml")
            || name_or_path.contains('/')
            || name_or_path.contains(std::path::MAIN_SEPARATOR);
        if looks_like_path {
            return BoardProfile::from_file(Path::new(name_or_path));
        }
        Err(BoardError::UnknownBoard {
            name: name_or_path.to_string(),
            known: self.names(),
        })
    }

    /// Every registered profile, loaded and validated.
    pub fn all(&self) -> Result<Vec<BoardProfile>, BoardError> {
        self.boards.keys().map(|n| self.get(n)).collect()
    }
}
