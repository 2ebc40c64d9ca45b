//! Sequence classification: labelled data (`text,label`), the classification head (trained in
//! full, saved as peft saves `modules_to_save = ["classifier"]`: `base_model.model.classifier.*`),
//! (class-weighted) cross-entropy, a stratified validation split, the metrics reported per
//! epoch (accuracy, macro F1, confusion matrix) and calibration (expected calibration error,
//! temperature scaling).

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};

use crate::error::{Result, bail, err};
use crate::io::safetensors::HostTensor;
use crate::models::hooks::Adapter;
use crate::peft::{Layout, NamedParam, Trainable};
use crate::tensor::{floats, upload};
use crate::train::data::two_fields;

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Labeled {
    pub text: String,
    pub label: String,
}

/// Parse labelled data: CSV/TSV with a header naming `text` and `label` columns, or JSONL
/// records `{"text": ..., "label": ...}` (a label may be a string or a number). Errors name
/// the file and the line.
pub fn parse_labeled_file(name: &str, text: &str) -> Result<Vec<Labeled>> {
    let rows = two_fields(name, text, ["text", "label"])?;
    if rows.is_empty() {
        bail!(Data, "{name}: the data has no examples");
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, [text, label])| {
            let label = label.trim().to_string();
            if label.is_empty() {
                bail!(Data, "{name}: example {}: empty label", i + 1);
            }
            Ok(Labeled { text, label })
        })
        .collect()
}

/// The label names (`known`, else the data's, sorted) and each example's label id, given the
/// examples' labels; the data must have two labels at least.
pub fn label_ids<S: AsRef<str>>(labels: &[S], known: &[String]) -> Result<(Vec<String>, Vec<usize>)> {
    let mut present: Vec<&str> = labels.iter().map(AsRef::as_ref).collect();
    present.sort_unstable();
    present.dedup();
    let names: Vec<String> = if known.is_empty() { present.iter().map(|l| l.to_string()).collect() } else { known.to_vec() };
    if names.len() < 2 || present.len() < 2 {
        bail!(Data, "classification needs at least two labels, the data has {present:?}");
    }
    let ids = labels.iter().map(|l| label_id(l.as_ref(), &names)).collect::<Result<_>>()?;
    Ok((names, ids))
}

fn label_id(label: &str, names: &[String]) -> Result<usize> {
    names.iter().position(|n| n == label).ok_or_else(|| err!(Data, "label {label:?} is not one of the model's labels {names:?}"))
}

/// Each example's label id among `names` (e.g. a trained classifier's labels).
pub fn ids_of(rows: &[Labeled], names: &[String]) -> Result<Vec<usize>> {
    rows.iter().map(|r| label_id(&r.label, names)).collect()
}

/// A stratified split: about `fraction` of each class (at least one of every class with two
/// or more examples) goes to validation. Returns (train, validation) indices, deterministic in `seed`.
pub fn stratified_split(labels: &[usize], n_classes: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x57a7_1f1e);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for c in 0..n_classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        idx.shuffle(&mut rng);
        let k = if fraction <= 0.0 || idx.len() < 2 { 0 } else { ((idx.len() as f64 * fraction).round() as usize).clamp(1, idx.len() - 1) };
        val.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Class weights for imbalanced data, as scikit-learn's `class_weight="balanced"`:
/// `n / (classes * count_c)`.
pub fn balanced_weights(labels: &[usize], n_classes: usize) -> Vec<f32> {
    let n = labels.len() as f64;
    (0..n_classes)
        .map(|c| {
            let k = labels.iter().filter(|&&l| l == c).count();
            if k == 0 { 0.0 } else { (n / (n_classes as f64 * k as f64)) as f32 }
        })
        .collect()
}

/// The classification head `logits = features · W (+ b)`, trained in full.
pub struct ClassifierHead {
    /// [hidden, labels] (the transpose of torch's `<module>.weight`)
    pub weight: Tensor<2>,
    /// [1, labels]; None for a head without bias (`LlamaForSequenceClassification.score`).
    pub bias: Option<Tensor<2>>,
    /// Module name in transformers (`classifier` in BERT, `score` in Llama classifiers).
    pub module: String,
}

/// Box-Muller normal sample.
fn normal(rng: &mut SmallRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl ClassifierHead {
    /// A new head as transformers initialises one: weights N(0, 0.02²), bias zero.
    pub fn new(hidden: usize, labels: usize, bias: bool, module: &str, seed: u64, device: &Device) -> Result<Self> {
        crate::tensor::check_size("labels", &[hidden, labels])?;
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xc1a5_51f1);
        let w: Vec<f32> = (0..hidden * labels).map(|_| normal(&mut rng) * 0.02).collect();
        Ok(ClassifierHead { weight: upload(&HostTensor::new(vec![hidden, labels], w), device)?, bias: bias.then(|| Tensor::zeros([1, labels], device)), module: module.into() })
    }

    /// From torch-layout tensors `weight` [labels, hidden] and `bias` [labels].
    pub fn from_host(weight: &HostTensor, bias: Option<&HostTensor>, module: &str, device: &Device) -> Result<Self> {
        let bias = bias.map(|b| upload(&HostTensor::new(vec![1, b.data.len()], b.data.clone()), device)).transpose()?;
        Ok(ClassifierHead { weight: upload(&weight.transposed(), device)?, bias, module: module.into() })
    }

    pub fn num_labels(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward(&self, features: Tensor<2>) -> Tensor<2> {
        let y = crate::matmul::matmul(features, self.weight.clone());
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
}

impl Adapter for ClassifierHead {}

impl Trainable for ClassifierHead {
    fn params_mut(&mut self) -> Vec<NamedParam<'_>> {
        let m = format!("base_model.model.{}", self.module);
        let mut v = vec![NamedParam::new(format!("{m}.weight"), &mut self.weight, Layout::Transposed)];
        if let Some(b) = self.bias.as_mut() {
            v.push(NamedParam::new(format!("{m}.bias"), b, Layout::Row));
        }
        v
    }
}

/// Sum over the rows of `weight(y) * -log softmax(logits)[y]`, divided by `denominator`
/// (torch's `cross_entropy(weight=w)` divides by the sum of the rows' weights), [1].
pub fn cross_entropy(logits: Tensor<2>, labels: &[usize], weights: Option<&[f32]>, denominator: f64) -> Result<Tensor<1>> {
    let [b, n] = logits.dims();
    if labels.len() != b {
        bail!(Shape, "{} labels for {b} rows", labels.len());
    }
    let mut pick = vec![0f32; b * n];
    for (i, &y) in labels.iter().enumerate() {
        if y >= n {
            bail!(Data, "label id {y} is outside the head's {n} labels");
        }
        pick[i * n + y] = weights.map_or(1.0, |w| w[y]);
    }
    let pick: Tensor<2> = floats(pick, [b, n], &logits.device());
    Ok((log_softmax(logits, 1) * pick).sum().neg().div_scalar(denominator).reshape([1]))
}

/// The denominator of [`cross_entropy`] for these labels: the sum of their weights (or the count).
pub fn loss_denominator(labels: &[usize], weights: Option<&[f32]>) -> f64 {
    labels.iter().map(|&y| weights.map_or(1.0, |w| w[y] as f64)).sum::<f64>().max(1e-12)
}

/// Row-wise softmax of host logits with temperature `t`.
pub fn softmax_rows(logits: &[Vec<f32>], t: f64) -> Vec<Vec<f64>> {
    logits
        .iter()
        .map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64 / t));
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 / t - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        })
        .collect()
}

/// Classification metrics of predictions against labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Mean (unweighted) cross-entropy.
    pub loss: f64,
    pub accuracy: f64,
    /// The mean over classes of F1 (a class never predicted nor present counts 0).
    pub macro_f1: f64,
    /// `confusion[true][predicted]`
    pub confusion: Vec<Vec<usize>>,
    /// Expected calibration error (15 equal-width confidence bins).
    pub ece: f64,
}

fn argmax(p: &[f64]) -> usize {
    p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// Metrics of host logits [rows][labels] at temperature `t`.
pub fn metrics(logits: &[Vec<f32>], labels: &[usize], t: f64) -> Metrics {
    let n = logits.first().map_or(0, Vec::len);
    let probs = softmax_rows(logits, t);
    let mut confusion = vec![vec![0usize; n]; n];
    let mut loss = 0.0;
    for (p, &y) in probs.iter().zip(labels) {
        confusion[y][argmax(p)] += 1;
        loss -= p[y].max(1e-300).ln();
    }
    let rows = labels.len().max(1) as f64;
    let right: usize = (0..n).map(|c| confusion[c][c]).sum();
    let f1: f64 = (0..n)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: f64 = (0..n).map(|r| confusion[r][c] as f64).sum();
            let actual: f64 = confusion[c].iter().sum::<usize>() as f64;
            if tp == 0.0 { 0.0 } else { 2.0 * tp / (predicted + actual) }
        })
        .sum::<f64>()
        / n.max(1) as f64;
    Metrics { loss: loss / rows, accuracy: right as f64 / rows, macro_f1: f1, confusion, ece: ece(&probs, labels, 15) }
}

/// Expected calibration error (Guo et al. 2017): confidences (the top probability) in
/// `bins` equal-width bins; the bins' |accuracy − mean confidence|, weighted by their share.
pub fn ece(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> f64 {
    let mut count = vec![0usize; bins];
    let mut conf = vec![0f64; bins];
    let mut right = vec![0f64; bins];
    for (p, &y) in probs.iter().zip(labels) {
        let k = argmax(p);
        let c = p[k];
        // Bins (i/B, (i+1)/B], as torchmetrics.
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        count[b] += 1;
        conf[b] += c;
        right[b] += (k == y) as u8 as f64;
    }
    let n = labels.len().max(1) as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (right[b] / count[b] as f64 - conf[b] / count[b] as f64).abs() * count[b] as f64 / n).sum()
}

/// Temperature scaling (Guo et al. 2017): the T > 0 minimising the mean NLL of
/// `softmax(logits / T)` on held-out data, by golden-section search on log T in [ln 0.01, ln 100].
pub fn fit_temperature(logits: &[Vec<f32>], labels: &[usize]) -> f64 {
    let nll = |log_t: f64| metrics_loss(logits, labels, log_t.exp());
    let (mut a, mut b) = (0.01f64.ln(), 100f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (nll(c), nll(d));
    for _ in 0..80 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = nll(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = nll(d);
        }
    }
    ((a + b) / 2.0).exp()
}

fn metrics_loss(logits: &[Vec<f32>], labels: &[usize], t: f64) -> f64 {
    let probs = softmax_rows(logits, t);
    -probs.iter().zip(labels).map(|(p, &y)| p[y].max(1e-300).ln()).sum::<f64>() / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_and_deterministic() {
        let labels: Vec<usize> = (0..100).map(|i| if i < 90 { 0 } else { 1 }).collect();
        let (t, v) = stratified_split(&labels, 2, 0.2, 7);
        assert_eq!(v.iter().filter(|&&i| labels[i] == 0).count(), 18);
        assert_eq!(v.iter().filter(|&&i| labels[i] == 1).count(), 2);
        assert_eq!(t.len() + v.len(), 100);
        assert_eq!((t.clone(), v.clone()), stratified_split(&labels, 2, 0.2, 7));
        assert_ne!(v, stratified_split(&labels, 2, 0.2, 8).1);
        // sklearn: compute_class_weight("balanced", classes=[0, 1], y) = [100/180, 100/20]
        assert_eq!(balanced_weights(&labels, 2), vec![100.0 / 180.0, 5.0]);
    }

    #[test]
    fn metrics_and_calibration() {
        // Two classes; row 3 wrong.
        let logits = vec![vec![2.0, 0.0], vec![0.0, 3.0], vec![1.0, 0.0], vec![0.0, 0.5]];
        let labels = [0, 1, 0, 0];
        let m = metrics(&logits, &labels, 1.0);
        assert_eq!(m.confusion, vec![vec![2, 1], vec![0, 1]]);
        assert_eq!(m.accuracy, 0.75);
        // F1: class 0 = 2*2/(2+3) = 0.8, class 1 = 2*1/(2+1) = 2/3.
        assert!((m.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // ECE by hand: confidences 0.8808, 0.9526, 0.7311, 0.6225 land in 4 different bins.
        let p = softmax_rows(&logits, 1.0);
        let by_hand = ((1.0 - p[0][0]) + (1.0 - p[1][1]) + (1.0 - p[2][0]) + p[3][1]) / 4.0;
        assert!((m.ece - by_hand).abs() < 1e-12, "{} vs {by_hand}", m.ece);
        // An over-confident model gets T > 1, and the NLL at T is the minimum.
        let logits: Vec<Vec<f32>> = (0..40).map(|i| if i % 4 == 0 { vec![0.0, 6.0] } else { vec![6.0, 0.0] }).collect();
        let labels = vec![0usize; 40];
        let t = fit_temperature(&logits, &labels);
        assert!(t > 1.0, "{t}");
        let at = |t: f64| metrics_loss(&logits, &labels, t);
        assert!(at(t) <= at(t * 1.01) && at(t) <= at(t / 1.01));
        // For this data the optimum is analytic: p(right) = 0.75 at softmax, so 6/T = ln 3.
        assert!((t - 6.0 / 3f64.ln()).abs() < 1e-6, "{t}");
    }
}
