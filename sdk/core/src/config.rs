//! Loading YAML (serde-saphyr) and JSON configuration files with errors that name the file,
//! the line (where the parser reports one) and the field path.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration file that could not be read or understood.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {}{message}", path.display(), fmt_line(*line), fmt_field(field))]
    Parse {
        path: PathBuf,
        /// 1-based line, where the parser gives one.
        line: Option<u64>,
        /// Dotted path of the offending field (`gpu.sm`), empty at the document root.
        field: String,
        message: String,
    },
    #[error("{}: field `{field}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A model package manifest (`jetvlm.yaml`) with problems, every one listed
    /// ([`crate::manifest::describe`]).
    #[error("{}", crate::manifest::describe(path, issues))]
    Manifest {
        path: PathBuf,
        issues: Vec<crate::manifest::Issue>,
    },
}

impl ConfigError {
    /// A semantic error found after parsing (a value out of range, a missing file it names).
    pub fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Io { path, .. }
            | ConfigError::Parse { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Manifest { path, .. } => path,
        }
    }

    /// The field the error is about, when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Parse { field, .. } | ConfigError::Invalid { field, .. } => {
                (!field.is_empty()).then_some(field.as_str())
            }
            // The first problem's field.
            ConfigError::Manifest { issues, .. } => issues
                .first()
                .map(|i| i.field.as_str())
                .filter(|f| !f.is_empty()),
        }
    }
}

fn fmt_line(line: Option<u64>) -> String {
    line.map(|l| format!(" line {l}")).unwrap_or_default()
}

fn fmt_field(field: &str) -> impl fmt::Display + '_ {
    struct F<'a>(&'a str);
    impl fmt::Display for F<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.0.is_empty() || self.0 == "." {
                Ok(())
            } else {
                write!(f, "field `{}`: ", self.0)
            }
        }
    }
    F(field)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and deserializes a YAML file.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = read(path)?;
    yaml_from_str(&text, path)
}

/// Deserializes YAML text; `origin` names the file in errors.
pub fn yaml_from_str<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    // First pass: the typed document with field-path tracking.
    let mut track = serde_path_to_error::Track::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        T::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    });
    match result {
        Ok(v) => Ok(v),
        Err(err) => {
            let field = track.path().to_string();
            let line = err.location().map(|l| l.line());
            Err(ConfigError::Parse {
                path: origin.to_path_buf(),
                line,
                field: if field == "." { String::new() } else { field },
                message: strip_yaml_position(&first_line(&err.to_string())),
            })
        }
    }
}

/// Reads and deserializes a JSON file (Hugging Face `config.json` and friends).
pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = read(path)?;
    json_from_str(&text, path)
}

/// Deserializes JSON text; `origin` names the file in errors.
pub fn json_from_str<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner();
        let line = (inner.line() > 0).then_some(inner.line() as u64);
        ConfigError::Parse {
            path: origin.to_path_buf(),
            line,
            field: if field == "." { String::new() } else { field },
            message: strip_json_position(&inner.to_string()),
        }
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// serde-saphyr prefixes messages with `error: line L column C: `; the line is already part of
/// [`ConfigError::Parse`], so keep the column and drop the repetition.
fn strip_yaml_position(s: &str) -> String {
    let s = s.strip_prefix("error: ").unwrap_or(s);
    if let Some(rest) = s.strip_prefix("line ") {
        let mut parts = rest.splitn(2, ": ");
        if let (Some(pos), Some(msg)) = (parts.next(), parts.next())
            && let Some((_, col)) = pos.split_once(" column ")
            && col.chars().all(|c| c.is_ascii_digit())
        {
            return format!("column {col}: {msg}");
        }
    }
    s.to_string()
}

fn strip_json_position(s: &str) -> String {
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Gpu {
        #[allow(dead_code)]
        sm: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        name: String,
        #[allow(dead_code)]
        gpu: Gpu,
    }

    #[test]
    fn yaml_ok() {
        let d: Doc = yaml_from_str("name: x\ngpu:\n  sm: 87\n", Path::new("b.yaml")).unwrap();
        assert_eq!(d.name, "x");
    }

    #[test]
    fn yaml_missing_field_names_file_and_field() {
        let err = yaml_from_str::<Doc>("name: x\ngpu:\n  arch: ampere\n", Path::new("b.yaml"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("b.yaml"), "{msg}");
        assert!(msg.contains("gpu"), "{msg}");
    }

    #[test]
    fn yaml_wrong_type_has_line() {
        let err =
            yaml_from_str::<Doc>("name: x\ngpu:\n  sm: eighty\n", Path::new("b.yaml")).unwrap_err();
        match &err {
            ConfigError::Parse { line, field, .. } => {
                assert_eq!(*line, Some(3), "{err}");
                assert_eq!(field, "gpu.sm", "{err}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn yaml_malformed_is_error_not_panic() {
        let err = yaml_from_str::<Doc>("name: [unclosed\ngpu: {", Path::new("m.yaml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("m.yaml line "), "{msg}");
        assert_eq!(msg.matches("line").count(), 1, "{msg}");
    }

    #[test]
    fn json_error_has_line_and_field() {
        let err = json_from_str::<Doc>(
            "{\n \"name\": \"x\",\n \"gpu\": {\"sm\": \"no\"}\n}",
            Path::new("c.json"),
        )
        .unwrap_err();
        match &err {
            ConfigError::Parse { line, field, .. } => {
                assert_eq!(*line, Some(3));
                assert_eq!(field, "gpu.sm");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = load_yaml::<Doc>(Path::new("/nonexistent/x.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/x.yaml"));
    }
}
