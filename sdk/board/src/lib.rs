//! jetvlm-board: what a Jetson can hold and how fast it can decode.
//!
//! - [`profile`]: the board profile schema (`boards/*.yaml`): DRAM, the OS/desktop
//!   reservation, bandwidth, GPU, CPU, JetPack versions.
//! - [`registry`]: the bundled profiles (embedded in the binary), `--boards-dir`, paths.
//! - [`model`]: the model as the planner sees it: HF `config.json` (language model +
//!   `vision_config` estimate) or a jetvlm package.
//! - [`policy`]: the planner's KV precision policy and its byte arithmetic.
//! - [`plan`]: the memory planner and the roofline TPOT floor (pure functions).
//! - [`detect`]: board detection from `/proc/device-tree/model`, `/etc/nv_tegra_release`,
//!   `/proc/meminfo`.

pub mod detect;
mod error;
pub mod model;
pub mod plan;
pub mod policy;
pub mod profile;
pub mod registry;

pub use error::BoardError;
pub use model::{ModelSpec, VisionEncoder, VisionSource};
pub use plan::{CameraBuffers, MemoryBreakdown, Plan, PlanOptions, WeightFormat, Workload};
pub use policy::{KvFormat, KvPrecision};
pub use profile::{BoardProfile, Family};
pub use registry::BoardRegistry;
