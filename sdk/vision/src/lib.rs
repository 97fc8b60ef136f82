//! jetvlm-vision: from a camera frame to image embeddings.
//!
//! - [`preprocess`]: resize (stretch / centre-crop / letterbox), mean/std normalisation,
//!   NCHW or NHWC, f32/f16/u8 — with a slow reference twin.
//! - [`package`]: the model package (`jetvlm.yaml` + encoder + HF decoder dir), validated
//!   up front with every problem reported at once.
//! - [`onnx`]: an ONNX model's input/output signature read without loading weights.
//! - [`encoder`]: the [`VisionEncoder`] trait and [`OrtEncoder`] (ONNX Runtime with
//!   TensorRT > CUDA > CPU execution providers).
//! - [`library`]: finding and loading `libonnxruntime.so`.

pub mod encoder;
mod error;
pub mod library;
pub mod onnx;
pub mod package;
pub mod preprocess;
pub mod providers;

pub use encoder::{Embeddings, EncoderSpec, EncoderStats, OrtConfig, OrtEncoder, VisionEncoder};
pub use error::VisionError;
pub use package::{Issue, Manifest, ModelPackage};
pub use preprocess::{
    ImageView, InputDType, Interpolation, Layout, PreprocessConfig, Preprocessed, Preprocessor,
    ResizeMode, RgbImage,
};
pub use providers::{ExecutionProvider, TensorRtSettings};
