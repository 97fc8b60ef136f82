use anyhow::Result;
use clap::Args;

/// Arguments of `jetvlm plan` (being built).
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Board profile name (see boards/).
    #[arg(long)]
    pub board: Option<String>,
}

pub fn run(_args: PlanArgs) -> Result<()> {
    anyhow::bail!("jetvlm plan is being built")
}
