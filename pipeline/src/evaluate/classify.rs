//! `pipeline classify`: FlowBack's training-free classifier (one forward and one backward pass per image,
//! prediction = argmax ∂ log p(x | softmax(λ)ᵀE) / ∂λ at λ = 0) over labelled shards or a cache. Reports
//! top-1 / top-5 accuracy and a confusion summary, and writes `predictions.csv`, `confusion.csv` and
//! `summary.json` into `--out`. Under torchrun/srun each rank classifies a run of the batches and rank 0
//! joins the rows and sums the counts (`rank_parts`).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use tch::{Device, Kind};

use crate::evaluate::labelled;
use crate::evaluate::rank_parts::{RankArgs, Ranks};
use crate::evaluate::trained::TrainedArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    trained: TrainedArgs,
    /// Labelled data: a webdataset shard spec (e.g. `/data/imagenet/imagenet-val-{000000..000049}.tar`)
    /// or a precompute cache directory (holding `manifest.json`)
    #[arg(long)]
    data: String,
    /// Images per forward/backward pass
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Classify at most this many images
    #[arg(long)]
    limit: Option<usize>,
    /// `gradient`: FlowBack's one forward + one backward pass on class-mixing logits; `bayes`: the
    /// Bayes-rule baseline, argmax over K class-conditional log-likelihoods (K forward passes)
    #[arg(long, default_value = "gradient", value_parser = ["gradient", "bayes"])]
    method: String,
    /// Output directory for predictions.csv, confusion.csv and summary.json
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    ranks: RankArgs,
}

/// The running tallies.
#[derive(Default)]
struct Tally {
    n: usize,
    top1: usize,
    top5: usize,
    /// confusion[true][predicted]
    confusion: Vec<Vec<u64>>,
    csv: String,
}

const CSV_HEAD: &str = "id,label,predicted,correct,top5,score_predicted\n";

pub fn run(args: Args) -> anyhow::Result<()> {
    let ranks = Ranks::join(&args.ranks)?;
    let trained = ranks.agree("loading the model", args.trained.load(true, &ranks.launch))?;
    let model = trained.model();
    let k = model.cfg.num_classes;
    if k == 0 {
        bail!("{}: the model is unconditional (num_classes = 0); classification needs a class-conditional flow", trained.checkpoint.display());
    }
    let top = k.min(5);
    let mut tally = Tally {
        confusion: vec![vec![0; k as usize]; k as usize],
        ..Default::default()
    };
    let predictions = args.out.join("predictions.csv");
    let classified = labelled::for_each_batch(
        "classify",
        &args.data,
        &trained,
        args.batch,
        args.limit,
        ranks.split(),
        &mut |batch| {
            if let Some((id, label)) = batch
                .ids
                .iter()
                .zip(&batch.labels)
                .find(|(_, &l)| l < 0 || l >= k)
            {
                bail!(
                    "{}: sample {id} has label {label}; classification needs labels in [0, {k})",
                    args.data
                );
            }
            let out = match args.method.as_str() {
                "bayes" => model::tarflow::classify::classify_bayes(model, &batch.x)?,
                _ => model::tarflow::classify::classify(model, &batch.x)?,
            };
            let scores = out.scores.to_device(Device::Cpu).to_kind(Kind::Float);
            let (values, indices) = scores.topk(top, -1, true, true);
            for (row, (id, &label)) in batch.ids.iter().zip(&batch.labels).enumerate() {
                let best: Vec<i64> = (0..top)
                    .map(|j| indices.int64_value(&[row as i64, j]))
                    .collect();
                let predicted = best[0];
                tally.n += 1;
                tally.top1 += usize::from(predicted == label);
                tally.top5 += usize::from(best.contains(&label));
                tally.confusion[label as usize][predicted as usize] += 1;
                let top5: Vec<String> = best.iter().map(i64::to_string).collect();
                let id = if id.contains([',', '"']) {
                    format!("\"{}\"", id.replace('"', "\"\""))
                } else {
                    id.clone()
                };
                writeln!(
                    tally.csv,
                    "{id},{label},{predicted},{},{},{:.6e}",
                    u8::from(predicted == label),
                    top5.join(";"),
                    values.double_value(&[row as i64, 0])
                )?;
            }
            Ok(())
        },
    )
    .and_then(|_| {
        // Each rank's rows in global order; rank 0 puts the header in front when it joins them.
        if !ranks.single() {
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            stages::atomic::write_bytes_atomic(
                &ranks.part_path(&predictions),
                tally.csv.as_bytes(),
            )?;
        }
        Ok(())
    });
    ranks.agree("classifying", classified)?;
    // Every count is a sum over the ranks' images, so one reduction gives the single-process tally.
    let mut counts = vec![tally.n as i64, tally.top1 as i64, tally.top5 as i64];
    counts.extend(tally.confusion.iter().flatten().map(|&c| c as i64));
    let counts = ranks.sum_i64(&counts)?;
    (tally.n, tally.top1, tally.top5) =
        (counts[0] as usize, counts[1] as usize, counts[2] as usize);
    for (cell, &c) in tally.confusion.iter_mut().flatten().zip(&counts[3..]) {
        *cell = c as u64;
    }
    if !ranks.single() {
        let joined = if ranks.leader() {
            ranks.concat_parts(&predictions, CSV_HEAD.as_bytes())
        } else {
            Ok(())
        };
        ranks.agree("joining the prediction parts", joined)?;
        if !ranks.leader() {
            return Ok(());
        }
    }
    if tally.n == 0 {
        bail!("{}: no samples", args.data);
    }
    if ranks.single() {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        tally.csv.insert_str(0, CSV_HEAD);
        stages::atomic::write_bytes_atomic(&predictions, tally.csv.as_bytes())?;
    }
    let mut confusion_csv = String::from("label");
    for j in 0..k {
        write!(confusion_csv, ",{j}")?;
    }
    confusion_csv.push('\n');
    for (i, row) in tally.confusion.iter().enumerate() {
        write!(confusion_csv, "{i}")?;
        for c in row {
            write!(confusion_csv, ",{c}")?;
        }
        confusion_csv.push('\n');
    }
    let confusion = args.out.join("confusion.csv");
    stages::atomic::write_bytes_atomic(&confusion, confusion_csv.as_bytes())?;

    let mut summary = summarise(&tally, k, top);
    summary["method"] = serde_json::Value::from(args.method.as_str());
    let summary_path = args.out.join("summary.json");
    stages::atomic::write_bytes_atomic(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let (top1, top5, chance) = (
        summary["top1"].as_f64().unwrap_or(0.0),
        summary["top5"].as_f64().unwrap_or(0.0),
        1.0 / k as f64,
    );
    println!(
        "classified {} images from {} with {} ({} method)",
        tally.n,
        args.data,
        trained.checkpoint.display(),
        args.method
    );
    println!(
        "top-1 accuracy: {:.2}% ({:.1}x chance {:.2}%)",
        100.0 * top1,
        top1 / chance,
        100.0 * chance
    );
    println!("top-{top} accuracy: {:.2}%", 100.0 * top5);
    println!("worst classes (recall): {}", summary["worst_classes"]);
    println!(
        "most confused (true -> predicted: count): {}",
        summary["most_confused"]
    );
    println!("predictions: {}", predictions.display());
    println!("confusion matrix: {}", confusion.display());
    println!("summary: {}", summary_path.display());
    Ok(())
}

/// Accuracy, per-class recall of the five worst classes that occur, and the ten largest off-diagonal
/// confusion counts.
fn summarise(tally: &Tally, k: i64, top: i64) -> serde_json::Value {
    let n = tally.n.max(1) as f64;
    let mut recall: Vec<(usize, f64, u64)> = tally
        .confusion
        .iter()
        .enumerate()
        .filter_map(|(i, row)| {
            let total: u64 = row.iter().sum();
            (total > 0).then(|| (i, row[i] as f64 / total as f64, total))
        })
        .collect();
    recall.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut pairs: Vec<(usize, usize, u64)> = Vec::new();
    for (i, row) in tally.confusion.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if i != j && c > 0 {
                pairs.push((i, j, c));
            }
        }
    }
    pairs.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    serde_json::json!({
        "samples": tally.n,
        "classes": k,
        "top1": tally.top1 as f64 / n,
        "top5": tally.top5 as f64 / n,
        "top_k": top,
        "chance": 1.0 / k as f64,
        "worst_classes": recall.iter().take(5).map(|(c, r, t)| serde_json::json!({"class": c, "recall": r, "samples": t})).collect::<Vec<_>>(),
        "most_confused": pairs.iter().take(10).map(|(i, j, c)| format!("{i}->{j}: {c}")).collect::<Vec<_>>(),
    })
}
