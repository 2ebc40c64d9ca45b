//! Tuning sentence embeddings to the user's pairs: (anchor, positive) data and
//! sentence-transformers' MultipleNegativesRankingLoss (in-batch negatives).

use burn::tensor::Tensor;

use crate::error::{Result, bail};
use crate::train::classify::cross_entropy;
use crate::train::data::two_fields;

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
    let rows = two_fields(name, text, ["anchor", "positive"])?;
    if rows.len() < 2 {
        bail!(Data, "{name}: in-batch negatives need at least two pairs, the data has {}", rows.len());
    }
    Ok(rows.into_iter().map(|[anchor, positive]| Pair { anchor, positive }).collect())
}

/// MultipleNegativesRankingLoss: with unit embeddings `anchors` and `positives` [B, d], the
/// cross-entropy of `scale · anchors · positivesᵀ` with row i's target i (every other
/// positive in the batch is a negative), averaged over the rows, [1].
pub fn mnrl_loss(anchors: Tensor<2>, positives: Tensor<2>, scale: f64) -> Result<Tensor<1>> {
    let b = anchors.dims()[0];
    if positives.dims()[0] != b || b < 2 {
        bail!(Shape, "MNRL needs as many positives as anchors, two at least ({b} / {})", positives.dims()[0]);
    }
    let scores = crate::matmul::matmul(anchors, positives.transpose()).mul_scalar(scale);
    cross_entropy(scores, &(0..b).collect::<Vec<_>>(), None, b as f64)
}
