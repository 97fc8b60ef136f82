//! The exit statuses of the jetvlm binaries, defined once: [`ExitCode`] (the table `--help`
//! and `docs/cli.md` show), [`Exit`] (an error that carries its status) and [`classify`],
//! which picks the status of any error by its type.
//!
//! A script tells the cases apart without reading the message: 2 a command line clap
//! refused, 3 a file, config, package or value that is invalid, 4 a model or workload that
//! does not fit, 5 a check that ran and failed, 1 anything else that went wrong at run time;
//! `jetvlm doctor` adds 6, 7 and 8 for its verdicts.

use std::error::Error as StdError;
use std::fmt;

/// An exit status of `jetvlm`, `jetvlm-analytics` and `jetvlm-assistant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitCode {
    /// The command did what it was asked (`doctor`: ready).
    Success,
    /// Something failed while running (a device, a library, a camera, an I/O error).
    Failure,
    /// The command line is wrong (an unknown flag, a missing argument, a value clap refuses).
    Usage,
    /// An input is invalid: a file, config, model package, board profile or flag value.
    BadInput,
    /// The model and workload do not fit (the memory plan, the KV cache, the positions).
    DoesNotFit,
    /// A check ran and failed (`selftest`, `bundle verify`).
    CheckFailed,
    /// `doctor`: ready, with warnings.
    ReadyWithWarnings,
    /// `doctor`: not ready (a check failed).
    NotReady,
    /// `doctor`: something it needs could not be read, so readiness is unknown.
    CouldNotCheck,
}

impl ExitCode {
    /// Every status, in numeric order.
    pub const ALL: [ExitCode; 9] = [
        ExitCode::Success,
        ExitCode::Failure,
        ExitCode::Usage,
        ExitCode::BadInput,
        ExitCode::DoesNotFit,
        ExitCode::CheckFailed,
        ExitCode::ReadyWithWarnings,
        ExitCode::NotReady,
        ExitCode::CouldNotCheck,
    ];

    /// The process exit status.
    pub const fn code(self) -> i32 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::BadInput => 3,
            ExitCode::DoesNotFit => 4,
            ExitCode::CheckFailed => 5,
            ExitCode::ReadyWithWarnings => 6,
            ExitCode::NotReady => 7,
            ExitCode::CouldNotCheck => 8,
        }
    }

    /// The status with exit code `code`.
    pub fn from_code(code: i32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A short name (`bad-input`), used in JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "runtime-failure",
            ExitCode::Usage => "usage",
            ExitCode::BadInput => "bad-input",
            ExitCode::DoesNotFit => "does-not-fit",
            ExitCode::CheckFailed => "check-failed",
            ExitCode::ReadyWithWarnings => "ready-with-warnings",
            ExitCode::NotReady => "not-ready",
            ExitCode::CouldNotCheck => "could-not-check",
        }
    }

    /// What the status means, one line.
    pub const fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "success (doctor: ready)",
            ExitCode::Failure => "runtime failure (device, library, camera, I/O)",
            ExitCode::Usage => "usage error (unknown flag, missing or malformed argument)",
            ExitCode::BadInput => "bad input (invalid file, config, model package, board or value)",
            ExitCode::DoesNotFit => "does not fit (memory plan, KV cache, model positions)",
            ExitCode::CheckFailed => "check failed (selftest, bundle verify)",
            ExitCode::ReadyWithWarnings => "doctor: ready with warnings",
            ExitCode::NotReady => "doctor: not ready (a check failed)",
            ExitCode::CouldNotCheck => "doctor: could not check (a fact it needs is unreadable)",
        }
    }

    /// Whether the status reports an error (everything but success and doctor's "ready
    /// with warnings").
    pub const fn is_error(self) -> bool {
        !matches!(self, ExitCode::Success | ExitCode::ReadyWithWarnings)
    }

    /// The table of statuses for a command's `--help` (`after_help`).
    pub fn help_table() -> String {
        let mut s = String::from("Exit status:\n");
        for c in Self::ALL {
            s.push_str(&format!("  {}  {}\n", c.code(), c.meaning()));
        }
        s
    }
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error that carries its exit status: what a command returns when the status is not
/// implied by the type of the error behind it (a plan that does not fit, a failed check).
#[derive(Debug)]
pub struct Exit {
    pub code: ExitCode,
    pub message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Exit {}

impl Exit {
    /// The error `message` that exits with `code`.
    pub fn error(code: ExitCode, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code,
            message: message.into(),
        })
    }
}

/// An invalid input (exit 3), for a check made in an app rather than by a library's typed
/// error: `--camera 0x480`, a flag value out of range.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    Exit::error(ExitCode::BadInput, message)
}

/// A model or workload that does not fit (exit 4).
pub fn does_not_fit(message: impl Into<String>) -> anyhow::Error {
    Exit::error(ExitCode::DoesNotFit, message)
}

/// A check that ran and failed (exit 5).
pub fn check_failed(message: impl Into<String>) -> anyhow::Error {
    Exit::error(ExitCode::CheckFailed, message)
}

/// The exit status of an error: an [`Exit`] anywhere in its chain gives its own; otherwise
/// the first error in the chain whose type says (the SDK crates' error enums, classified by
/// variant); otherwise [`ExitCode::Failure`].
pub fn classify(error: &anyhow::Error) -> ExitCode {
    if let Some(e) = error.chain().find_map(|e| e.downcast_ref::<Exit>()) {
        return e.code;
    }
    error
        .chain()
        .find_map(classify_typed)
        .unwrap_or(ExitCode::Failure)
}

/// The status one error's type (and variant) implies, if it implies one. Errors wrapped
/// `#[error(transparent)]` hide the wrapped error from `source()`, so wrapping variants are
/// looked into here.
fn classify_typed(e: &(dyn StdError + 'static)) -> Option<ExitCode> {
    use ExitCode::{BadInput, DoesNotFit, Failure};
    if e.is::<jetvlm_core::ConfigError>()
        || e.is::<jetvlm_quant::PolicyError>()
        || e.is::<jetvlm_board::BoardError>()
    {
        return Some(BadInput);
    }
    if let Some(e) = e.downcast_ref::<jetvlm_runtime::RuntimeError>() {
        use jetvlm_runtime::RuntimeError as R;
        return Some(match e {
            R::Vision(v) => vision(v),
            R::Decoder(d) => decoder(d),
            R::Cuda(c) => cuda(c),
            R::Calibration(c) => calibration(c),
            R::Kv(k) => kv(k),
            R::Camera { source, .. } => camera(source),
            R::Config(_) | R::Prompt { .. } | R::Frame { .. } | R::Unsupported { .. } => BadInput,
            R::ContextTooLong { .. } => DoesNotFit,
            _ => Failure,
        });
    }
    if let Some(e) = e.downcast_ref::<jetvlm_vision::VisionError>() {
        return Some(vision(e));
    }
    if let Some(e) = e.downcast_ref::<jetvlm_decoder::DecoderError>() {
        return Some(decoder(e));
    }
    if let Some(e) = e.downcast_ref::<jetvlm_cuda::CudaError>() {
        return Some(cuda(e));
    }
    if let Some(e) = e.downcast_ref::<jetvlm_calibration::CalibrationError>() {
        return Some(calibration(e));
    }
    if let Some(e) = e.downcast_ref::<jetvlm_kvcache::KvError>() {
        return Some(kv(e));
    }
    if let Some(e) = e.downcast_ref::<jetvlm_camera::CameraError>() {
        return Some(camera(e));
    }
    None
}

fn vision(e: &jetvlm_vision::VisionError) -> ExitCode {
    use jetvlm_vision::VisionError as V;
    match e {
        V::Package { .. }
        | V::ModelMismatch { .. }
        | V::UnknownProvider(_)
        | V::BadImage { .. }
        | V::Decode { .. }
        | V::ImageTooLarge { .. }
        | V::Io { .. }
        | V::OnnxFormat { .. } => ExitCode::BadInput,
        _ => ExitCode::Failure,
    }
}

fn decoder(e: &jetvlm_decoder::DecoderError) -> ExitCode {
    use jetvlm_decoder::DecoderError as D;
    match e {
        D::Kv(k) => kv(k),
        D::RefCache(_) => ExitCode::Failure,
        // The model's files, the tokenizer, the prompt and the sampling settings.
        _ => ExitCode::BadInput,
    }
}

fn cuda(e: &jetvlm_cuda::CudaError) -> ExitCode {
    use jetvlm_cuda::CudaError as C;
    match e {
        C::Decoder(d) => decoder(d),
        C::Model { .. } | C::DecoderModel { .. } | C::Policy { .. } => ExitCode::BadInput,
        C::KvFull { .. } => ExitCode::DoesNotFit,
        _ => ExitCode::Failure,
    }
}

fn calibration(e: &jetvlm_calibration::CalibrationError) -> ExitCode {
    use jetvlm_calibration::CalibrationError as C;
    match e {
        C::Kv(k) => kv(k),
        C::Config(_) | C::Target { .. } | C::Invalid { .. } => ExitCode::BadInput,
        _ => ExitCode::Failure,
    }
}

fn kv(e: &jetvlm_kvcache::KvError) -> ExitCode {
    use jetvlm_kvcache::KvError as K;
    match e {
        K::InvalidPolicy(_) | K::InvalidShape { .. } => ExitCode::BadInput,
        K::CapacityExceeded { .. } => ExitCode::DoesNotFit,
        _ => ExitCode::Failure,
    }
}

fn camera(e: &jetvlm_camera::CameraError) -> ExitCode {
    use jetvlm_camera::CameraError as C;
    match e {
        C::Device { .. } | C::DeviceFormat { .. } | C::Write { .. } | C::WriteImage { .. } => {
            ExitCode::Failure
        }
        // URIs, image files and directories named by the user, scene parameters.
        _ => ExitCode::BadInput,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ExitCode::ALL {
            assert!(seen.insert(c.code()), "{c} repeats {}", c.code());
            assert_eq!(ExitCode::from_code(c.code()), Some(c));
        }
        let table = ExitCode::help_table();
        assert_eq!(table.lines().count(), ExitCode::ALL.len() + 1);
    }

    #[test]
    fn typed_errors_are_classified_through_context_and_transparent_wrappers() {
        let config = jetvlm_core::ConfigError::invalid(
            std::path::Path::new("rt.yaml"),
            "window_frames",
            "must be at least 1",
        );
        let wrapped = anyhow::Error::new(jetvlm_runtime::RuntimeError::Config(config))
            .context("loading model package x");
        assert_eq!(classify(&wrapped), ExitCode::BadInput);

        let package = jetvlm_runtime::RuntimeError::Vision(jetvlm_vision::VisionError::Package {
            manifest: "p/jetvlm.yaml".into(),
            issues: Vec::new(),
        });
        assert_eq!(classify(&anyhow::Error::new(package)), ExitCode::BadInput);

        let no_gpu = jetvlm_runtime::RuntimeError::Cuda(jetvlm_cuda::CudaError::DriverNotFound);
        assert_eq!(classify(&anyhow::Error::new(no_gpu)), ExitCode::Failure);

        let too_long = jetvlm_runtime::RuntimeError::ContextTooLong {
            needed: 10,
            limit: 5,
            what: "capacity_tokens",
        };
        assert_eq!(
            classify(&anyhow::Error::new(too_long)),
            ExitCode::DoesNotFit
        );

        let board = jetvlm_board::BoardError::UnknownBoard {
            name: "x".into(),
            known: Vec::new(),
        };
        let r: anyhow::Result<()> = Err(board.into());
        assert_eq!(
            classify(&r.context("--board x").unwrap_err()),
            ExitCode::BadInput
        );
    }

    #[test]
    fn an_exit_error_wins_and_untyped_errors_are_runtime_failures() {
        let e = does_not_fit("does not fit: over budget").context("plan");
        assert_eq!(classify(&e), ExitCode::DoesNotFit);
        assert_eq!(
            classify(&check_failed("1 check failed")),
            ExitCode::CheckFailed
        );
        assert_eq!(
            classify(&anyhow::anyhow!("something broke")),
            ExitCode::Failure
        );
        let io = std::io::Error::other("disk on fire");
        assert_eq!(classify(&anyhow::Error::new(io)), ExitCode::Failure);
    }
}
