//! The `distill-serve` command line.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use distill_serve::checkpoint::ModelConfig;
use distill_serve::config::ServeArgs;
use distill_serve::constrain::{self, DescriptionTypes, SnomedOptions, SourceKind};
use distill_serve::distill::client::{DistillCommand, ServerArgs};
use distill_serve::distill::trainer::TrainConfig;
use distill_serve::distill::{encoder_train, finetune};
use distill_serve::doctor::DoctorArgs;
use distill_serve::export::{self, Activations, Attention, ExternalData, Int8Format, Precision};
use distill_serve::recipe;
use distill_serve::telemetry::{TraceLayer, Tracing};
use distill_serve::tiny::{self, TinySpec};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "distill-serve",
    version,
    about = "Serve, export and refresh distilled INT8 student models"
)]
struct Cli {
    /// Log lines (on stderr) as text or as one JSON object per line, for log shippers. The
    /// level comes from RUST_LOG [default: info].
    #[arg(
        long,
        global = true,
        value_enum,
        env = "DISTILL_SERVE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr at RUST_LOG's levels (info by default) in `format`; `traces` (when exporting)
/// sees spans by its own filter, so RUST_LOG cannot turn traces off.
fn init_logging(format: LogFormat, traces: Option<TraceLayer>) {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
        .from_env_lossy();
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => Box::new(log.with_ansi(std::io::stderr().is_terminal()).with_filter(filter)),
        // Span fields (the request id) go into each line's `span` and `spans` keys.
        LogFormat::Json => Box::new(
            log.json()
                .with_current_span(true)
                .with_span_list(true)
                .with_filter(filter),
        ),
    };
    tracing_subscriber::registry().with(traces).with(log).init();
}

/// Runs the server, logging, and exporting traces when `--otlp-endpoint` is given.
fn serve(args: ServeArgs, log_format: LogFormat) -> Result<()> {
    let config = args.resolve()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (tracing, layer) = match &config.traces {
        Some(settings) => {
            let (tracing, layer) = Tracing::start(settings, runtime.handle().clone())?;
            (Some(tracing), Some(layer))
        }
        None => (None, None),
    };
    init_logging(log_format, layer);
    let served = runtime.block_on(distill_serve::server::run(config));
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    served
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic random-weight student checkpoint (Hugging Face layout).
    Tiny {
        #[command(flatten)]
        spec: TinySpec,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Export a checkpoint to ONNX (FP32, or INT8 with --int8).
    Export(ExportArgs),
    /// Serve the models of a model repository over HTTP.
    Serve(Box<ServeArgs>),
    /// Check what this machine and build can run: ONNX Runtime, GPUs, CUDA, TensorRT, and
    /// whether the configured execution providers load (exit status 1 when one cannot).
    Doctor(DoctorArgs),
    /// Terminologies (ICD-10-CM, SNOMED CT, lists) for constrained decoding.
    #[command(subcommand)]
    Terminology(TerminologyCommand),
    /// Fine-tune a checkpoint on labelled prompts (cross-entropy on the labels).
    Train(TrainArgs),
    /// Build the datasets of the project's recipes.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Distillation refresh on a running server: datasets, jobs, rollback, evaluation.
    Distill {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: DistillCommand,
    },
}

#[derive(Subcommand)]
enum TerminologyCommand {
    /// Load a release file and print, as JSON, what it yields and what loading it and compiling
    /// its constraint automata cost.
    Inspect {
        /// The release format.
        #[arg(value_enum)]
        kind: SourceKind,
        path: PathBuf,
        /// SNOMED CT: language codes to keep (all when none).
        #[arg(long, value_delimiter = ',')]
        language: Vec<String>,
        /// SNOMED CT: which descriptions become terms.
        #[arg(long, value_enum, default_value = "all")]
        descriptions: DescriptionTypes,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// The ICD-10-CM coding dataset (train.jsonl, heldout.jsonl, corpus.txt) from the CMS
    /// tabular XML.
    Icd10cmData {
        /// `icd10cm_tabular_*.xml`.
        #[arg(long)]
        xml: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Code prefixes to keep (all billable codes when none).
        #[arg(long, value_delimiter = ',')]
        prefixes: Vec<String>,
        /// At most this many codes, drawn with --seed.
        #[arg(long)]
        max_codes: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// At most this many augmented phrasings per code (`NOS` forms, nonessential
        /// modifiers, abbreviations, sibling substitution) join the training pairs.
        #[arg(long, default_value_t = 0)]
        augment_per_code: usize,
    },
    /// ICD-10-CM chapter classification texts (an encoder student's dataset) from the CMS
    /// tabular XML: every billable code's description and inclusion terms, labelled with its
    /// chapter's range; one category in `--held-out-every` held out whole.
    IcdChapters {
        #[arg(long)]
        xml: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        held_out_every: usize,
        #[arg(long, default_value_t = 50_000)]
        max_train: usize,
        #[arg(long, default_value_t = 2_000)]
        max_held_out: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Chinese/English financial entity texts (companies, amounts, dates) from templates; the
    /// held-out texts use company names and one template per language never trained on.
    ZhEnEntities {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 5_000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        held_out: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Checkpoint folder to start from.
    #[arg(long)]
    checkpoint: PathBuf,
    /// JSONL training data: prompts with labels (decoders), or texts with `label`, `labels` or
    /// `entities` (encoders).
    #[arg(long)]
    data: PathBuf,
    /// Encoders: held-out JSONL texts, scored before and after training.
    #[arg(long)]
    held_out: Option<PathBuf>,
    /// Output checkpoint folder.
    #[arg(long)]
    out: PathBuf,
    /// Training settings as JSON (the `train` object of a refresh job).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
}

/// Resident memory of this process, in bytes (Linux; 0 elsewhere).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer files).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output folder for model.onnx and the copied config and tokenizer files.
    #[arg(long)]
    out: PathBuf,
    /// Quantise linear layers and the token embedding to INT8.
    #[arg(long)]
    int8: bool,
    /// How INT8 layers are expressed for ONNX Runtime.
    #[arg(long, value_enum, default_value = "matmul-integer", requires = "int8")]
    int8_format: Int8Format,
    /// When to write weights to model.onnx_data.
    #[arg(long, value_enum, default_value = "auto")]
    external_data: ExternalData,
    /// How a decoder's attention is written: gqa (ONNX Runtime's fused GroupQueryAttention over
    /// a shared cache written in place; the default where the head size is a multiple of 16) or
    /// with-past (standard operators, the cache grown by a copy each step).
    #[arg(long, value_enum)]
    attention: Option<Attention>,
    /// The float type of activations and cache: fp32, or fp16 for GPUs (with --attention gqa;
    /// logits of each row's last position only).
    #[arg(long, value_enum, default_value = "fp32")]
    activations: Activations,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // `serve` sets up its own logging, with its trace exporter.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(cli.log_format, None);
    }
    match cli.command {
        Command::Tiny { spec, out } => {
            let config = tiny::write_tiny(&spec, &out)?;
            eprintln!("wrote a {} student to {}", config.family().model_type(), out.display());
        }
        Command::Export(args) => {
            let precision = if args.int8 {
                Precision::Int8(args.int8_format)
            } else {
                Precision::Fp32
            };
            let attention = match args.attention {
                Some(attention) => attention,
                None => export::preferred_attention(&args.checkpoint)?,
            };
            let form = export::Form {
                attention,
                activations: args.activations,
            };
            let report = export::export_form(&args.checkpoint, &args.out, precision, args.external_data, form)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Train(args) => train(args)?,
        Command::Recipe(RecipeCommand::IcdChapters {
            xml,
            out,
            held_out_every,
            max_train,
            max_held_out,
            seed,
        }) => {
            let terminology = constrain::load_icd10cm_xml(&xml)?;
            let d = recipe::encoders::icd10cm_chapters(&terminology, held_out_every, max_train, max_held_out, seed);
            println!(
                "{}",
                serde_json::to_string_pretty(&recipe::write_encoder_dataset(&d, &out)?)?
            );
        }
        Command::Recipe(RecipeCommand::ZhEnEntities {
            out,
            train,
            held_out,
            seed,
        }) => {
            let d = recipe::encoders::zh_en_entities(train, held_out, seed);
            println!(
                "{}",
                serde_json::to_string_pretty(&recipe::write_encoder_dataset(&d, &out)?)?
            );
        }
        Command::Recipe(RecipeCommand::Icd10cmData {
            xml,
            out,
            prefixes,
            max_codes,
            seed,
            augment_per_code,
        }) => {
            let spec = distill_serve::recipe::dataset::DatasetSpec {
                prefixes,
                max_codes,
                seed,
                augment_per_code,
            };
            let summary = distill_serve::recipe::write_icd10cm_dataset(&xml, &spec, &out)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Distill { server, command } => {
            tokio::runtime::Runtime::new()?.block_on(distill_serve::distill::client::run(server, command))?;
        }
        Command::Serve(args) => serve(*args, cli.log_format)?,
        Command::Doctor(args) => {
            let report = distill_serve::doctor::check(&args);
            for line in &report.lines {
                println!("{line}");
            }
            if !report.failures.is_empty() {
                anyhow::bail!(
                    "a configured execution provider cannot run here:\n  {}",
                    report.failures.join("\n  ")
                );
            }
            println!("ok: every configured execution provider runs here");
        }
        Command::Terminology(TerminologyCommand::Inspect {
            kind,
            path,
            language,
            descriptions,
        }) => {
            let options = SnomedOptions {
                languages: language,
                types: descriptions,
                concepts: None,
            };
            let before = resident_bytes();
            let started = std::time::Instant::now();
            let terminology = constrain::load(kind, &path, &options)?;
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            // The automata constraints use: billable codes, and their terms.
            let started = std::time::Instant::now();
            let billable = || terminology.entries.iter().filter(|e| e.billable);
            let codes = constrain::TermSet::new(billable().map(|e| e.code.as_bytes()));
            let terms = constrain::TermSet::new(
                billable().flat_map(|e| std::iter::once(&e.description).chain(&e.synonyms).map(|t| t.as_bytes())),
            );
            let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
            let report = serde_json::json!({
                "kind": kind,
                "path": path,
                "stats": terminology.stats(),
                "load_ms": load_ms,
                "compile_ms": compile_ms,
                "automaton_bytes": {"codes": codes.heap_bytes(), "terms": terms.heap_bytes()},
                "resident_growth_bytes": resident_bytes().saturating_sub(before),
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let mut config: TrainConfig = match &args.config {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        None => TrainConfig::default(),
    };
    config.steps = args.steps.unwrap_or(config.steps);
    config.threads = args.threads.unwrap_or(config.threads);
    config.seed = args.seed.unwrap_or(config.seed);
    let every = (config.steps / 20).max(1);
    let started = std::time::Instant::now();
    let config_text = std::fs::read_to_string(args.checkpoint.join("config.json"))?;
    if let ModelConfig::Encoder(_) = ModelConfig::from_json(&config_text)? {
        let train = finetune::read_jsonl(&args.data)?;
        let held_out = match &args.held_out {
            Some(path) => finetune::read_jsonl(path)?,
            None => Vec::new(),
        };
        let report =
            encoder_train::train_encoder_checkpoint(&args.checkpoint, &train, &held_out, &config, &args.out, |s| {
                if s.step % every == 0 || s.step == s.steps {
                    eprintln!(
                        "step {}/{} loss {:.4} lr {:.2e} ({:.0} s)",
                        s.step,
                        s.steps,
                        s.loss,
                        s.learning_rate,
                        started.elapsed().as_secs_f64()
                    );
                }
            })?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprintln!("wrote {}", args.out.display());
        return Ok(());
    }
    if args.held_out.is_some() {
        anyhow::bail!("--held-out is for encoders; decoders are evaluated by `distill evaluate`");
    }
    let prompts = finetune::read_jsonl(&args.data)?;
    finetune::finetune(&args.checkpoint, prompts, &config, &args.out, |r| {
        if r.step % every == 0 || r.step == r.steps {
            eprintln!(
                "step {}/{} loss {:.4} lr {:.2e} ({:.0} s)",
                r.step,
                r.steps,
                r.loss.total,
                r.learning_rate,
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
