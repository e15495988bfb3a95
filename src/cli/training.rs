//! Training heads on a running server, following training jobs, and
//! evaluating heads on labelled examples.

use std::path::PathBuf;

use anyhow::Result;

use tlserve::{client, client::text_files::TextFormat, proto};

use super::{print_json, ServerAddr};

/// Where labelled examples come from (`train`, `evaluate`).
#[derive(clap::Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("data").required(true).args(["images", "examples"])))]
struct DataArgs {
    /// A folder with one subfolder per class, named as its label, holding
    /// PNG, JPEG or WebP images (the layout of Keras' image_dataset_from_directory
    /// and torchvision's ImageFolder).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// A text file: `LABEL<TAB>TEXT` lines (.tsv, .txt), CSV (.csv) or JSON
    /// Lines (.jsonl, .ndjson).
    #[arg(long, value_name = "FILE")]
    examples: Option<PathBuf>,
    /// The text file's format, when its extension does not say it.
    #[arg(long, value_enum, requires = "examples")]
    format: Option<TextFormat>,
    /// CSV column (header name, or number from 1) or JSON field holding the
    /// text; default: `text` (CSV without a header: column 2).
    #[arg(long, value_name = "COLUMN", requires = "examples")]
    text_column: Option<client::text_files::Column>,
    /// CSV column or JSON field holding the label; default: `label` (CSV
    /// without a header: column 1).
    #[arg(long, value_name = "COLUMN", requires = "examples")]
    label_column: Option<client::text_files::Column>,
    /// Go on without images that cannot be read (each is reported) instead of
    /// stopping.
    #[arg(long, requires = "images")]
    skip_bad: bool,
}

/// Training options; each one left out is not sent and takes the server's
/// default (see the README's "Training heads").
#[derive(clap::Args)]
struct TrainingArgs {
    /// The solver; default: L-BFGS for a linear head unless an AdamW option
    /// is given, AdamW otherwise.
    #[arg(long, value_enum)]
    solver: Option<tlserve::head::Solver>,
    /// AdamW: passes over the examples; default: chosen by early stopping.
    #[arg(long)]
    epochs: Option<u32>,
    /// AdamW: the peak learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// AdamW: examples per step.
    #[arg(long)]
    batch_size: Option<u32>,
    /// AdamW: decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// AdamW: share of the examples held out for validation, in (0, 0.5].
    #[arg(long)]
    validation_fraction: Option<f32>,
    /// Train on every example and report no validation metrics.
    #[arg(long)]
    no_validation: bool,
    /// AdamW: epochs without a better validation loss before stopping.
    #[arg(long)]
    early_stopping_patience: Option<u32>,
    /// L-BFGS: the L2 penalty; default: chosen by cross-validation.
    #[arg(long)]
    l2: Option<f32>,
    /// L-BFGS: folds of the cross-validation.
    #[arg(long)]
    cv_folds: Option<u32>,
    /// Weight each label by the inverse of its frequency.
    #[arg(long)]
    balance_classes: bool,
    /// Seed of every random choice of the job (and of --holdout's split).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    fine_tuning: FineTuningArgs,
}

/// What of the backbone trains with the head.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    /// The backbone stays frozen; the head trains on its features.
    Frozen,
    /// LoRA adapters on the backbone's top layers train with the head.
    Lora,
    /// The backbone's top layers train in full with the head.
    #[value(name = "top-layers", alias = "top_layers")]
    TopLayers,
}

/// Fine-tuning options of `tlserve train`; the LoRA ones need `--method lora`,
/// the others `--method lora` or `--method top-layers`.
#[derive(clap::Args)]
struct FineTuningArgs {
    /// frozen: train on the backbone's features (default); lora: fine-tune
    /// low-rank adapters of its top layers together with a linear head;
    /// top-layers: fine-tune its top layers in full with a linear head.
    #[arg(long, value_enum, default_value = "frozen")]
    method: MethodArg,
    /// LoRA and top layers: top encoder layers trained; default: all (LoRA),
    /// 2 (top layers).
    #[arg(long)]
    layers: Option<u32>,
    /// LoRA: rank of each adapter; default: 8.
    #[arg(long)]
    rank: Option<u32>,
    /// LoRA: updates are scaled by alpha / rank; default: twice the rank.
    #[arg(long)]
    alpha: Option<f32>,
    /// LoRA: dropout on each adapter's input while training; default: 0.
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// LoRA: adapted projections, comma-separated (query, key, value,
    /// attention_output, intermediate, output); default: query,value.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// LoRA and top layers: peak learning rate of the backbone's trained
    /// weights; default: 0.0005 (LoRA), 0.00005 (top layers)
    /// (--learning-rate is the head's).
    #[arg(long)]
    backbone_learning_rate: Option<f32>,
    /// LoRA and top layers: share of the steps spent warming up; default: 0.1.
    #[arg(long)]
    warmup_fraction: Option<f32>,
}

impl FineTuningArgs {
    /// The fine-tuning options to send, None for a frozen backbone; refuses
    /// options that the chosen method does not use.
    fn flags(self) -> Result<Option<client::FineTuningFlags>> {
        let flags = client::FineTuningFlags {
            top_layers: self.method == MethodArg::TopLayers,
            layers: self.layers,
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.lora_dropout,
            targets: self.targets,
            backbone_learning_rate: self.backbone_learning_rate,
            warmup_fraction: self.warmup_fraction,
        };
        let lora_only_given = flags.rank.is_some()
            || flags.alpha.is_some()
            || flags.dropout.is_some()
            || !flags.targets.is_empty();
        let tuning_given = flags.layers.is_some()
            || flags.backbone_learning_rate.is_some()
            || flags.warmup_fraction.is_some();
        match self.method {
            MethodArg::Lora => Ok(Some(flags)),
            MethodArg::TopLayers if lora_only_given => anyhow::bail!(
                "--rank, --alpha, --lora-dropout and --targets are LoRA options; they need \
                 --method lora"
            ),
            MethodArg::TopLayers => Ok(Some(flags)),
            MethodArg::Frozen if lora_only_given || tuning_given => {
                anyhow::bail!("the fine-tuning options need --method lora or top-layers")
            }
            MethodArg::Frozen => Ok(None),
        }
    }
}

/// `tlserve train`: the backbone, the head's name, the examples and the
/// options of the job.
#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    server: ServerAddr,
    #[arg(long, short)]
    backbone: String,
    /// Name to publish the head under.
    #[arg(long)]
    head: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    training: TrainingArgs,
    /// Train an MLP head with this hidden size (dropout 0.1) instead of a
    /// linear head.
    #[arg(long)]
    mlp_hidden: Option<u32>,
    /// Hold out this share of each label's examples (a seeded, stratified
    /// split) and evaluate the published head on them at the end.
    #[arg(long, value_name = "SHARE")]
    holdout: Option<f64>,
    /// Sets whose encoded examples pass this many bytes are uploaded in
    /// chunks (UploadDataset) instead of sent in the TrainHead request.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024)]
    upload_threshold_bytes: usize,
    /// Print the job's id once it has started and leave it running, instead
    /// of following it (`tlserve watch JOB` follows it later).
    #[arg(long, conflicts_with = "holdout")]
    detach: bool,
}

/// `tlserve evaluate`: the head and the labelled examples.
#[derive(clap::Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The head: `name`, `name@version`, or a built-in one.
    #[arg(long)]
    head: String,
    #[command(flatten)]
    data: DataArgs,
    /// Inputs per Predict request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Print the metrics as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `tlserve watch`: the job to follow.
#[derive(clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    server: ServerAddr,
    /// The job's id, as `tlserve train` printed it.
    job: String,
}

impl DataArgs {
    /// The client's description of the examples to read.
    fn source(self) -> client::DataSource {
        use client::text_files::Columns;
        match (self.images, self.examples) {
            (Some(dir), _) => client::DataSource::Images {
                dir,
                skip_bad: self.skip_bad,
            },
            // clap requires one of the two.
            (None, path) => client::DataSource::Text {
                path: path.unwrap_or_default(),
                format: self.format,
                columns: Columns {
                    text: self.text_column,
                    label: self.label_column,
                },
            },
        }
    }
}

impl TrainingArgs {
    /// The options to send; an unset one is left to the server.
    fn flags(self) -> Result<client::TrainingFlags> {
        Ok(client::TrainingFlags {
            solver: self.solver.map(tlserve::wire::convert::solver),
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            weight_decay: self.weight_decay,
            validation_fraction: self.validation_fraction,
            no_validation: self.no_validation,
            early_stopping_patience: self.early_stopping_patience,
            l2: self.l2,
            cv_folds: self.cv_folds,
            balance_classes: self.balance_classes,
            seed: self.seed,
            fine_tuning: self.fine_tuning.flags()?,
        })
    }
}

/// Trains a head and prints it, or the job's id when detached.
pub async fn train(args: TrainArgs) -> Result<()> {
    let training = client::training_config(&args.training.flags()?)?;
    let spec = args.mlp_hidden.map(|hidden_size| proto::HeadSpec {
        kind: Some(proto::head_spec::Kind::Mlp(proto::MlpHead {
            hidden_size,
            dropout: 0.1,
        })),
    });
    let command = client::TrainCommand {
        backbone: args.backbone,
        head: args.head,
        examples: client::data::load(&args.data.source())?,
        spec,
        training,
        holdout: args.holdout,
        upload_threshold_bytes: args.upload_threshold_bytes,
        evaluate_batch_size: 64,
        detach: args.detach,
    };
    let channel = client::connect(&args.server.addr).await?;
    match client::train(channel, command).await? {
        client::Trained::Head(head) => print_json(&head),
        client::Trained::Started { job_id } => {
            println!("{job_id}");
            Ok(())
        }
    }
}

/// Follows a job to its end and prints the published head.
pub async fn watch(args: WatchArgs) -> Result<()> {
    let channel = client::connect(&args.server.addr).await?;
    let head = client::watch(channel, args.job).await?;
    print_json(&client::head_json(&head))
}

/// Evaluates a head and prints its metrics.
pub async fn evaluate(args: EvaluateArgs) -> Result<()> {
    let examples = client::data::load(&args.data.source())?;
    let channel = client::connect(&args.server.addr).await?;
    let result =
        client::evaluate::evaluate(channel, &args.head, examples, args.batch_size as usize).await?;
    if args.json {
        print_json(&result.to_json())
    } else {
        print!("{}", result.table());
        Ok(())
    }
}
