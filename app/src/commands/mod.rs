//! One file per subcommand; shared options here.

pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod fit;
pub mod infer;
pub mod labels;
pub mod report;
#[cfg(feature = "studio")]
pub mod studio;
pub mod watch;
pub mod weights;

use anyhow::Result;
use candle_core::Device;
use loupe_engine::backbone::{weights::default_weights_path, Backbone};
use loupe_engine::device::DeviceChoice;
use loupe_engine::methods::setting_docs;
use loupe_engine::methods::{Family, REGISTRY};
use loupe_engine::model_file;
use std::path::PathBuf;
use std::sync::Arc;

/// Options every command that runs the backbone takes.
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// cpu, cuda or metal (the latter two only when built with that feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Backbone weights (.safetensors or .pth); default: the file `loupe weights fetch` writes.
    #[arg(long)]
    pub weights: Option<PathBuf>,
}

impl EngineArgs {
    pub fn load_backbone(&self) -> Result<Arc<Backbone>> {
        self.load_backbone_on(&self.device.open()?)
    }

    fn load_backbone_on(&self, device: &Device) -> Result<Arc<Backbone>> {
        let path = self.weights.clone().unwrap_or_else(default_weights_path);
        Ok(Arc::new(Backbone::load(&path, device)?))
    }

    /// A model file with its backbone (the one a bundle carries, else the installed weights), and the device
    /// it runs on.
    pub fn open_model(&self, path: &std::path::Path) -> Result<(model_file::LoadedModel, Device)> {
        let device = self.device.open()?;
        let loaded = model_file::open(path, &device, || self.load_backbone_on(&device))?;
        Ok((loaded, device))
    }
}

#[derive(clap::Args)]
pub struct MethodsArgs {
    /// Explain this method's settings: label, help, default, allowed range, unit, the paper's value.
    #[arg(long, value_name = "METHOD")]
    pub settings: Option<String>,
}

pub fn list_methods(args: MethodsArgs) -> Result<()> {
    if let Some(name) = &args.settings {
        return explain_settings(name);
    }
    for family in Family::ALL {
        let methods: Vec<_> = REGISTRY.iter().filter(|m| m.family == family).collect();
        println!("{}", family.title());
        if methods.is_empty() {
            println!("  (none yet)");
        }
        for method in methods {
            println!("  {:<12} {}", method.name, method.summary);
            println!("  {:<12} {}", "", method.guide);
            for preset in method.presets {
                println!("  {:<12}   --preset {}: {}", "", preset.name, preset.about);
            }
            let defaults = (method.default_settings)();
            for (name, value) in defaults.as_object().into_iter().flatten() {
                let range = method.range_of(name).map(|r| format!("  (allowed {})", r.describe())).unwrap_or_default();
                println!("  {:<12}   --set {name}={value}{range}", "");
            }
        }
    }
    println!("\n`loupe methods --settings NAME` explains a method's settings.");
    Ok(())
}

/// One method's settings in words, common ones first (the studio's Train view shows the same).
fn explain_settings(name: &str) -> Result<()> {
    let method = loupe_engine::methods::find_method(name)?;
    println!("{} ({}): {}\n{}", method.title, method.family.title(), method.summary, method.guide);
    let defaults = (method.default_settings)();
    for advanced in [false, true] {
        println!("\n{}", if advanced { "Advanced" } else { "Common" });
        for (key, value) in defaults.as_object().into_iter().flatten() {
            let Some(doc) = setting_docs::doc(method.name, key) else { continue };
            if doc.advanced != advanced {
                continue;
            }
            let unit = if doc.unit.is_empty() { String::new() } else { format!(" {}", doc.unit) };
            let range = method.range_of(key).map(|r| format!(", allowed {}", r.describe())).unwrap_or_default();
            let paper = doc.paper.map(|p| format!(", paper: {p}")).unwrap_or_default();
            println!("  {} (--set {key}={value}{unit}{range}{paper})", doc.label);
            println!("      {}", doc.help);
        }
    }
    Ok(())
}
