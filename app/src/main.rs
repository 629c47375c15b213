//! `loupe`: the command line of the Loupe anomaly-detection studio.
//!
//! Exit codes: 0 success, 1 the work failed (message on stderr), 2 the command line was wrong, 3 `infer
//! --fail-on` found an image at or above that verdict.

mod commands;
mod progress_bar;

use loupe::overlay;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "loupe", version, about = "Unsupervised visual anomaly detection for industrial images")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a folder of normal images (an MVTec folder trains on train/good).
    Fit(commands::fit::FitArgs),
    /// Score a labelled test set and print image/pixel AUROC, AUPRO, F1-max, FAR/MAR.
    Eval(commands::eval::EvalArgs),
    /// Score images or folders; write heatmaps overlaid on the images.
    Infer(commands::infer::InferArgs),
    /// Export a model to run outside Loupe (ONNX), or show what an exported file carries.
    Export(commands::export::ExportArgs),
    /// Write a project model's report: one HTML file a manager opens without Loupe.
    Report(commands::report::ReportArgs),
    /// Get or convert the ImageNet backbone weights.
    Weights(commands::weights::WeightsArgs),
    /// Generate the synthetic demo set, train PatchCore on it and print its metrics.
    Demo(commands::demo::DemoArgs),
    /// List the methods, grouped by family; `--settings NAME` explains one method's settings.
    Methods(commands::MethodsArgs),
    /// Micro-benchmarks (backbone speed, coreset selection, threshold recomputation).
    Bench(commands::bench::BenchArgs),
    /// Open the studio window (the default when no command is given).
    #[cfg(feature = "studio")]
    Studio(commands::studio::StudioArgs),
    /// The line runtime: score every image that arrives in a folder, once; log, sort and report each verdict.
    Watch(commands::watch::WatchArgs),
    /// Import labelme annotations into a project; export its labels in MVTec AD layout.
    Labels(commands::labels::LabelsArgs),
}

fn main() {
    loupe_engine::device::configure_cpu_thread_pools();
    let cli = Cli::parse();
    let Some(command) = cli.command.or_else(default_command) else {
        eprintln!("loupe was built without the studio (`--no-default-features`): name a command, see `loupe --help`");
        std::process::exit(2);
    };
    if matches!(command, Command::Infer(_) | Command::Eval(_) | Command::Export(_) | Command::Methods(_)) {
        end_quietly_when_the_reader_closes();
    }
    let result = match command {
        Command::Fit(args) => commands::fit::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Infer(args) => commands::infer::run(args).map(|status| {
            if status != 0 {
                std::process::exit(status);
            }
        }),
        Command::Export(args) => commands::export::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Weights(args) => commands::weights::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Methods(args) => commands::list_methods(args),
        Command::Bench(args) => commands::bench::run(args),
        #[cfg(feature = "studio")]
        Command::Studio(args) => commands::studio::run(args),
        Command::Labels(args) => commands::labels::run(args),
        Command::Watch(args) => commands::watch::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// What `loupe` alone runs: the studio, where it is built in.
fn default_command() -> Option<Command> {
    #[cfg(feature = "studio")]
    return Some(Command::Studio(commands::studio::StudioArgs::default()));
    #[cfg(not(feature = "studio"))]
    None
}

/// `loupe infer … | head` ends quietly when the reader closes, as other Unix tools do, instead of panicking on
/// the next line printed: Rust ignores SIGPIPE, this restores its default action. Only for the commands whose
/// output is read through pipes: a long-running one with network sinks must survive a closed connection.
fn end_quietly_when_the_reader_closes() {
    #[cfg(unix)]
    // SAFETY: sets the process-wide disposition of SIGPIPE to its default; no handler of ours runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
