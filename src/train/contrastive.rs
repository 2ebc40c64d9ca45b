//! Tuning sentence embeddings to the user's pairs: (anchor, positive) data and
//! sentence-transformers' MultipleNegativesRankingLoss (in-batch negatives).

use burn::tensor::Tensor;

use crate::error::{Result, bail, err};
use crate::train::classify::cross_entropy;
use crate::train::data::DataFormat;

/// sentence-transformers' default scale of the cosine similarities.
pub const MNRL_SCALE: f64 = 20.0;

/// One training pair: a text and one that should embed close to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub anchor: String,
    pub positive: String,
}

/// Parse pairs: CSV/TSV with `anchor` and `positive` columns, or JSONL records
/// `{"anchor": ..., "positive": ...}`. Errors name the file and the line.
pub fn parse_pairs_file(name: &str, text: &str) -> Result<Vec<Pair>> {
    let rows = match DataFormat::from_name(name) {
        Some(DataFormat::Csv { delimiter }) => pairs_csv(text, delimiter),
        Some(DataFormat::Jsonl) => pairs_jsonl(text),
        _ if text.trim_start().starts_with('{') => pairs_jsonl(text),
        _ => Err(err!(Data, "pair data must be .csv/.tsv (with `anchor` and `positive` columns) or .jsonl ({{\"anchor\": ..., \"positive\": ...}})")),
    };
    let rows = rows.map_err(|e| e.context(name))?;
    if rows.len() < 2 {
        bail!(Data, "{name}: in-batch negatives need at least two pairs, the data has {}", rows.len());
    }
    Ok(rows)
}

fn pairs_csv(text: &str, delimiter: u8) -> Result<Vec<Pair>> {
    let mut r = csv::ReaderBuilder::new().delimiter(delimiter).flexible(false).from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().map_err(|e| err!(Data, "header row: {e}"))?.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    let col = |n: &str| header.iter().position(|h| h == n);
    let (Some(a), Some(p)) = (col("anchor"), col("positive")) else { bail!(Data, "header row {header:?}: expected `anchor` and `positive` columns") };
    r.records()
        .map(|rec| {
            let rec = rec.map_err(|e| err!(Data, "{e}"))?;
            let line = rec.position().map_or(0, |p| p.line());
            let f = |i: usize| rec.get(i).map(str::to_string).ok_or_else(|| err!(Data, "line {line}: missing column {}", header[i]));
            Ok(Pair { anchor: f(a)?, positive: f(p)? })
        })
        .collect()
}

fn pairs_jsonl(text: &str) -> Result<Vec<Pair>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| err!(Data, "line {}: invalid JSON: {e}", i + 1))?;
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| err!(Data, "line {}: expected a string `{k}`", i + 1));
            Ok(Pair { anchor: s("anchor")?, positive: s("positive")? })
        })
        .collect()
}

/// MultipleNegativesRankingLoss: with unit embeddings `anchors` and `positives` [B, d], the
/// cross-entropy of `scale · anchors · positivesᵀ` with row i's target i (every other
/// positive in the batch is a negative), averaged over the rows, [1].
pub fn mnrl_loss(anchors: Tensor<2>, positives: Tensor<2>, scale: f64) -> Result<Tensor<1>> {
    let b = anchors.dims()[0];
    if positives.dims()[0] != b || b < 2 {
        bail!(Shape, "MNRL needs as many positives as anchors, two at least ({b} / {})", positives.dims()[0]);
    }
    let scores = anchors.matmul(positives.transpose()).mul_scalar(scale);
    cross_entropy(scores, &(0..b).collect::<Vec<_>>(), None, b as f64)
}
