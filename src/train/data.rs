//! Examples, their tokenisation (with loss masks) and padded batches.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::{Result, bail, err};
use crate::tokenizer::Tokenizer;

/// Label value the loss ignores (as in PyTorch / transformers).
pub const IGNORE: i64 = -100;

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Every token is trained on.
    Text(String),
    /// Only the completion's tokens count in the loss.
    PromptCompletion { prompt: String, completion: String },
    /// A conversation of (role, content) turns, rendered with the model's chat template;
    /// only the assistant turns (each with its end-of-turn marker) count in the loss.
    Chat { messages: Vec<(String, String)> },
}

impl Example {
    /// One JSON record: a string, `{"text": ...}`, `{"prompt": ..., "completion": ...}` or
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`.
    pub fn from_json(v: &serde_json::Value) -> Result<Example> {
        if let Some(m) = v.get("messages") {
            return chat_messages(m).map(|messages| Example::Chat { messages });
        }
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        match (v, s("text"), s("prompt"), s("completion")) {
            (serde_json::Value::String(t), ..) => Ok(Example::Text(t.clone())),
            (_, Some(t), None, None) => Ok(Example::Text(t)),
            (_, None, Some(prompt), Some(completion)) => Ok(Example::PromptCompletion { prompt, completion }),
            _ => Err(err!(Data, "expected {{\"text\": ...}}, {{\"prompt\": ..., \"completion\": ...}} or {{\"messages\": [...]}} with string values")),
        }
    }
}

/// `[{"role": "user", "content": "..."}, ...]`: the turns of a chat example.
fn chat_messages(v: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let list = v.as_array().ok_or_else(|| err!(Data, "`messages` must be a list of {{\"role\": ..., \"content\": ...}}"))?;
    if list.is_empty() {
        bail!(Data, "`messages` is empty");
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| m.get(k).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| err!(Data, "messages[{i}]: expected a string `{k}`"));
            Ok((field("role")?, field("content")?))
        })
        .collect()
}

/// How a data file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// One example per non-empty line.
    Text,
    /// One JSON object per line (see [`Example::from_json`]).
    Jsonl,
    /// A header row naming a `text` column, or `prompt` and `completion` columns; fields
    /// separated by `delimiter` (`,` for .csv, tab for .tsv).
    Csv { delimiter: u8 },
}

impl DataFormat {
    /// From a file name's extension (`.txt`, `.jsonl`/`.json`, `.csv`/`.tsv`); `None` when
    /// the name does not say.
    pub fn from_name(name: &str) -> Option<DataFormat> {
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
        Some(match ext.as_str() {
            "txt" | "text" | "md" => DataFormat::Text,
            "jsonl" | "json" | "ndjson" => DataFormat::Jsonl,
            "csv" => DataFormat::Csv { delimiter: b',' },
            "tsv" => DataFormat::Csv { delimiter: b'\t' },
            _ => return None,
        })
    }
}

/// Parse a data file by its name's extension (or, failing that, its content, as
/// [`parse_examples`]). Errors name the file and the line.
pub fn parse_data_file(name: &str, text: &str) -> Result<Vec<Example>> {
    let r = match DataFormat::from_name(name) {
        Some(DataFormat::Text) => text_lines(text),
        Some(DataFormat::Jsonl) => jsonl(text),
        Some(DataFormat::Csv { delimiter }) => csv_rows(text, delimiter),
        None => parse_examples(text),
    };
    r.map_err(|e| e.context(name))
}

/// Parse data without a file name: JSONL when every non-empty line is a JSON object, else
/// plain text, one example per line.
pub fn parse_examples(text: &str) -> Result<Vec<Example>> {
    let jsonl_like = text.lines().filter(|l| !l.trim().is_empty()).all(|l| l.trim_start().starts_with('{'));
    if jsonl_like { jsonl(text) } else { text_lines(text) }
}

fn non_empty<T>(v: Vec<T>) -> Result<Vec<T>> {
    if v.is_empty() {
        bail!(Data, "the data has no examples (empty file)");
    }
    Ok(v)
}

fn text_lines(text: &str) -> Result<Vec<Example>> {
    non_empty(text.lines().filter(|l| !l.trim().is_empty()).map(|l| Example::Text(l.to_string())).collect())
}

fn jsonl(text: &str) -> Result<Vec<Example>> {
    let rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| err!(Data, "line {}: invalid JSON: {e}", i + 1))?;
            Example::from_json(&v).map_err(|e| e.context(format!("line {}", i + 1)))
        })
        .collect::<Result<Vec<_>>>()?;
    non_empty(rows)
}

fn csv_rows(text: &str, delimiter: u8) -> Result<Vec<Example>> {
    let mut r = csv::ReaderBuilder::new().delimiter(delimiter).flexible(false).from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().map_err(|e| err!(Data, "header row: {e}"))?.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    let col = |n: &str| header.iter().position(|h| h == n);
    if col("label").is_some() {
        bail!(Unsupported, "a `label` column is classification data: train a classifier on an encoder model (`webpeft classify`), or give `text`, or `prompt` and `completion` columns");
    }
    enum Cols {
        Text(usize),
        Pc(usize, usize),
    }
    let cols = match (col("text"), col("prompt"), col("completion")) {
        (Some(t), None, None) => Cols::Text(t),
        (None, Some(p), Some(c)) => Cols::Pc(p, c),
        _ => bail!(Data, "header row {header:?}: expected a `text` column, or `prompt` and `completion` columns"),
    };
    let rows = r
        .records()
        .map(|rec| {
            let rec = rec.map_err(|e| err!(Data, "{e}"))?;
            let line = rec.position().map_or(0, |p| p.line());
            let f = |i: usize| rec.get(i).map(str::to_string).ok_or_else(|| err!(Data, "line {line}: missing column {}", header[i]));
            Ok(match cols {
                Cols::Text(t) => Example::Text(f(t)?),
                Cols::Pc(p, c) => Example::PromptCompletion { prompt: f(p)?, completion: f(c)? },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    non_empty(rows)
}

/// Rows of two named fields from a data file: CSV/TSV with a header naming both columns, or
/// JSONL records with both keys (a JSON number reads as its text, e.g. a numeric label).
/// The format comes from `name`'s extension, or the content when that does not say.
/// Errors name the file and the line.
pub fn two_fields(name: &str, text: &str, fields: [&str; 2]) -> Result<Vec<[String; 2]>> {
    let [a, b] = fields;
    let rows = match DataFormat::from_name(name) {
        Some(DataFormat::Csv { delimiter }) => two_csv(text, delimiter, fields),
        Some(DataFormat::Jsonl) => two_jsonl(text, fields),
        _ if text.trim_start().starts_with('{') => two_jsonl(text, fields),
        _ => Err(err!(Data, "expected .csv/.tsv with `{a}` and `{b}` columns, or .jsonl ({{\"{a}\": ..., \"{b}\": ...}})")),
    };
    rows.map_err(|e| e.context(name))
}

fn two_csv(text: &str, delimiter: u8, [a, b]: [&str; 2]) -> Result<Vec<[String; 2]>> {
    let mut r = csv::ReaderBuilder::new().delimiter(delimiter).flexible(false).from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().map_err(|e| err!(Data, "header row: {e}"))?.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    let col = |n: &str| header.iter().position(|h| h == n);
    let (Some(ia), Some(ib)) = (col(a), col(b)) else { bail!(Data, "header row {header:?}: expected `{a}` and `{b}` columns") };
    r.records()
        .map(|rec| {
            let rec = rec.map_err(|e| err!(Data, "{e}"))?;
            let line = rec.position().map_or(0, |p| p.line());
            let f = |i: usize| rec.get(i).map(str::to_string).ok_or_else(|| err!(Data, "line {line}: missing column {}", header[i]));
            Ok([f(ia)?, f(ib)?])
        })
        .collect()
}

fn two_jsonl(text: &str, fields: [&str; 2]) -> Result<Vec<[String; 2]>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| err!(Data, "line {}: invalid JSON: {e}", i + 1))?;
            let field = |k: &str| match v.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                _ => Err(err!(Data, "line {}: expected a string `{k}`", i + 1)),
            };
            Ok([field(fields[0])?, field(fields[1])?])
        })
        .collect()
}

/// Token ids and per-token labels (IGNORE where the loss must not look).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Tokenise one example. Text: exactly the tokenizer's default encoding (plus EOS only when
/// `append_eos`). Prompt/completion: prompt encoded with default special tokens, then the
/// completion without them, then EOS; prompt tokens are masked out of the loss. Chat: the
/// conversation rendered by the chat template and encoded as transformers'
/// `apply_chat_template(messages, tokenize=True)` does (no extra special tokens); only the
/// assistant turns are trained on (see [`chat_tokens`]); cut to `max_len` from the end.
pub fn tokenize(tok: &Tokenizer, ex: &Example, append_eos: bool, max_len: usize) -> Result<Tokenized> {
    let eos = || tok.eos_id.ok_or_else(|| err!(Config, "the tokenizer has no EOS token"));
    let (mut ids, mut labels) = match ex {
        Example::Text(t) => {
            let mut ids = tok.encode(t)?;
            if append_eos {
                ids.push(eos()?);
            }
            let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            (ids, labels)
        }
        Example::PromptCompletion { prompt, completion } => {
            let mut p = tok.encode(prompt)?;
            let mut c = tok.encode_opts(completion, false)?;
            c.push(eos()?);
            // Too long: keep the whole completion (up to max_len) and the end of the prompt.
            if p.len() + c.len() > max_len {
                c.truncate(max_len);
                let keep = max_len - c.len();
                p.drain(..p.len() - keep);
            }
            let labels = p.iter().map(|_| IGNORE).chain(c.iter().map(|&i| i as i64)).collect();
            (p.into_iter().chain(c).collect(), labels)
        }
        Example::Chat { messages } => chat_tokens(tok, messages)?,
    };
    ids.truncate(max_len);
    labels.truncate(max_len);
    if ids.len() < 2 {
        bail!(Data, "an example has fewer than 2 tokens: nothing to predict");
    }
    Ok(Tokenized { ids, labels })
}

/// Tokenise examples for training: as [`tokenize`], except that a plain text longer than
/// `max_len` tokens is split into consecutive windows of `max_len` tokens (each trained on in
/// full; a last window of fewer than 2 tokens is dropped) instead of being cut, so a long
/// document trains on all of its text. Errors name the example.
pub fn tokenize_all(tok: &Tokenizer, examples: &[Example], append_eos: bool, max_len: usize) -> Result<Vec<Tokenized>> {
    let mut rows = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        match ex {
            Example::Text(t) if max_len >= 2 => {
                let mut ids = tok.encode(t).map_err(|e| e.context(format!("example {i}")))?;
                if append_eos {
                    ids.push(tok.eos_id.ok_or_else(|| err!(Config, "the tokenizer has no EOS token"))?);
                }
                if ids.len() < 2 {
                    return Err(err!(Data, "an example has fewer than 2 tokens: nothing to predict").context(format!("example {i}")));
                }
                for w in ids.chunks(max_len).filter(|w| w.len() >= 2) {
                    rows.push(Tokenized { ids: w.to_vec(), labels: w.iter().map(|&x| x as i64).collect() });
                }
            }
            _ => rows.push(tokenize(tok, ex, append_eos, max_len).map_err(|e| e.context(format!("example {i}")))?),
        }
    }
    Ok(rows)
}

/// A conversation's token ids and labels. An assistant turn's trained part is what the
/// template adds for it after the generation prompt: the text between rendering the turns
/// before it with `add_generation_prompt` and rendering it closed (its content and the
/// end-of-turn marker). A token is trained when it starts inside such a part.
fn chat_tokens(tok: &Tokenizer, messages: &[(String, String)]) -> Result<(Vec<u32>, Vec<i64>)> {
    if !messages.iter().any(|(r, _)| r == "assistant") {
        bail!(Data, "a chat example has no assistant message: nothing to train on");
    }
    let full = tok.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    for (i, (role, _)) in messages.iter().enumerate() {
        if role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        let upto = tok.apply_chat_template(&messages[..=i], false)?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            bail!(
                Unsupported,
                "the chat template does not render the conversation turn by turn (at message {i}), so the assistant's part cannot be told apart: give prompt/completion examples instead"
            );
        }
        spans.push(before.len()..upto.len());
    }
    let (ids, offsets) = tok.encode_with_offsets(&full, false)?;
    let labels = ids.iter().zip(&offsets).map(|(&id, &(start, _))| if spans.iter().any(|s| s.contains(&start)) { id as i64 } else { IGNORE }).collect();
    Ok((ids, labels))
}

/// Split off a held-out share of the examples (a validation set), after a seeded shuffle:
/// `round(fraction * n)` of them, at least one and leaving at least one for training.
/// Returns (train, validation), each in the original order.
pub fn split_validation(examples: &[Example], fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        bail!(Config, "the validation share must be in [0, 1), got {fraction}");
    }
    if fraction == 0.0 {
        return Ok((examples.to_vec(), vec![]));
    }
    if examples.len() < 2 {
        bail!(Data, "a validation split needs at least 2 examples (got {})", examples.len());
    }
    let n_val = ((fraction * examples.len() as f64).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(seed ^ 0x7a11_da7e));
    let mut held = vec![false; examples.len()];
    order[..n_val].iter().for_each(|&i| held[i] = true);
    let (val, train): (Vec<_>, Vec<_>) = examples.iter().zip(&held).partition(|(_, h)| **h);
    Ok((train.into_iter().map(|(e, _)| e.clone()).collect(), val.into_iter().map(|(e, _)| e.clone()).collect()))
}

/// A right-padded batch, row-major [B, T].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    /// Multi-task training: the task (adapter) of each row; empty = one task.
    pub tasks: Vec<usize>,
}

impl Batch {
    pub fn new(rows: &[Tokenized], pad_id: u32) -> Result<Self> {
        let len = rows.iter().map(|r| r.ids.len()).max().ok_or_else(|| err!(Data, "empty batch"))?;
        let mut b = Batch { batch: rows.len(), len, input_ids: vec![], attention_mask: vec![], labels: vec![], tasks: vec![] };
        for r in rows {
            let pad = len - r.ids.len();
            b.input_ids.extend(r.ids.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad_id as i64, pad)));
            b.attention_mask.extend(std::iter::repeat_n(1, r.ids.len()).chain(std::iter::repeat_n(0, pad)));
            b.labels.extend(r.labels.iter().copied().chain(std::iter::repeat_n(IGNORE, pad)));
        }
        Ok(b)
    }

    /// Labels shifted left by one (the target at each position), IGNORE at the end of rows.
    pub fn shifted_targets(&self) -> Vec<i64> {
        self.shifted_targets_with_prefix(0)
    }

    /// The same for rows preceded by `n` virtual tokens labelled IGNORE: [B, n + T] row-major.
    pub fn shifted_targets_with_prefix(&self, n: usize) -> Vec<i64> {
        let row = n + self.len;
        let mut t = vec![IGNORE; self.batch * row];
        for b in 0..self.batch {
            for j in n.saturating_sub(1)..row - 1 {
                t[b * row + j] = self.labels[b * self.len + (j + 1 - n)];
            }
        }
        t
    }

    /// Number of positions the loss counts (virtual tokens add the first real token).
    pub fn num_targets_with_prefix(&self, n: usize) -> usize {
        self.shifted_targets_with_prefix(n).iter().filter(|&&x| x != IGNORE).count()
    }

    pub fn num_targets(&self) -> usize {
        self.num_targets_with_prefix(0)
    }

    /// Each row as its own one-row batch (same padded length).
    pub fn rows(&self) -> Vec<Batch> {
        (0..self.batch)
            .map(|b| {
                let r = b * self.len..(b + 1) * self.len;
                Batch {
                    batch: 1,
                    len: self.len,
                    input_ids: self.input_ids[r.clone()].to_vec(),
                    attention_mask: self.attention_mask[r.clone()].to_vec(),
                    labels: self.labels[r].to_vec(),
                    tasks: self.tasks.get(b).map(|&t| vec![t]).unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// An endless, seeded, epoch-wise shuffled stream of batches.
pub struct Batcher {
    rows: Vec<Tokenized>,
    /// The task of each row (multi-task training), or empty.
    tasks: Vec<usize>,
    /// Poisson sampling rate (DP-SGD): each row joins each batch independently with this
    /// probability, so batches vary in size and may be empty.
    poisson: Option<f64>,
    order: Vec<usize>,
    pos: usize,
    rng: SmallRng,
    batch: usize,
    pad_id: u32,
    pub epoch: usize,
}

impl Batcher {
    pub fn new(rows: Vec<Tokenized>, batch: usize, pad_id: u32, seed: u64) -> Result<Self> {
        if rows.is_empty() || batch == 0 {
            bail!(Data, "no examples or batch size 0");
        }
        let mut b = Batcher { order: (0..rows.len()).collect(), rows, tasks: vec![], poisson: None, pos: 0, rng: SmallRng::seed_from_u64(seed), batch, pad_id, epoch: 0 };
        b.order.shuffle(&mut b.rng);
        Ok(b)
    }

    /// Rows of several tasks mixed in one stream (examples-proportional mixing): each batch
    /// records the task of each of its rows.
    pub fn with_tasks(rows: Vec<Tokenized>, tasks: Vec<usize>, batch: usize, pad_id: u32, seed: u64) -> Result<Self> {
        if tasks.len() != rows.len() {
            bail!(Data, "{} rows but {} task labels", rows.len(), tasks.len());
        }
        let mut b = Self::new(rows, batch, pad_id, seed)?;
        b.tasks = tasks;
        Ok(b)
    }

    /// Switch to Poisson sampling with rate `batch / rows` for an expected batch of `batch`.
    pub fn set_poisson_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
        self.set_poisson();
    }

    /// Switch to Poisson sampling with rate `batch / rows` (the expected batch size stays).
    /// Draw batches of `batch` rows from now on (rows are drawn in the same order whatever the
    /// batch size, so two batches of 2 hold what one of 4 would).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    pub fn set_poisson(&mut self) {
        self.poisson = Some((self.batch as f64 / self.rows.len() as f64).min(1.0));
    }

    /// The sampling rate q of a step: batch / rows (Poisson) or its fixed-size equivalent.
    pub fn sample_rate(&self) -> f64 {
        (self.batch as f64 / self.rows.len() as f64).min(1.0)
    }

    /// SHA-256 of the tokenized rows (ids, labels, tasks): identifies the data of a run, so
    /// that a checkpoint only resumes on the data it was trained on.
    pub fn digest(&self) -> String {
        let mut bytes = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            bytes.extend((r.ids.len() as u64).to_le_bytes());
            r.ids.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
            r.labels.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
            bytes.extend((self.tasks.get(i).copied().unwrap_or(0) as u64).to_le_bytes());
        }
        crate::train::checkpoint::sha256_hex(&bytes)
    }

    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// The token rows are padded with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        let mut picked = Vec::with_capacity(self.batch);
        let mut tasks = Vec::new();
        if let Some(q) = self.poisson {
            for i in 0..self.rows.len() {
                if self.rng.random::<f64>() < q {
                    picked.push(self.rows[i].clone());
                    if let Some(&t) = self.tasks.get(i) {
                        tasks.push(t);
                    }
                }
            }
            self.pos += self.batch;
            if self.pos >= self.rows.len() {
                self.pos = 0;
                self.epoch += 1;
            }
            if picked.is_empty() {
                return Ok(Batch { batch: 0, len: 0, input_ids: vec![], attention_mask: vec![], labels: vec![], tasks: vec![] });
            }
            let mut b = Batch::new(&picked, self.pad_id)?;
            b.tasks = tasks;
            return Ok(b);
        }
        while picked.len() < self.batch {
            if self.pos == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
                self.epoch += 1;
            }
            picked.push(self.rows[self.order[self.pos]].clone());
            if let Some(&t) = self.tasks.get(self.order[self.pos]) {
                tasks.push(t);
            }
            self.pos += 1;
        }
        let mut b = Batch::new(&picked, self.pad_id)?;
        b.tasks = tasks;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_formats() {
        assert_eq!(parse_examples("a\n\nb\n").unwrap(), vec![Example::Text("a".into()), Example::Text("b".into())]);
        let j = "{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"text\": \"t\"}";
        assert_eq!(parse_examples(j).unwrap()[1], Example::Text("t".into()));
        assert!(parse_examples("{\"foo\": 1}").is_err());
        assert!(parse_examples("\n\n").is_err());
        let csv = "id,Text\n1,\"a, b\"\n2,c\n";
        assert_eq!(parse_data_file("d.csv", csv).unwrap(), vec![Example::Text("a, b".into()), Example::Text("c".into())]);
        let pc = parse_data_file("d.tsv", "prompt\tcompletion\nq\ta\n").unwrap();
        assert_eq!(pc, vec![Example::PromptCompletion { prompt: "q".into(), completion: "a".into() }]);
        let e = parse_data_file("d.csv", "text,x\n1,2,3\n").unwrap_err();
        assert!(e.message.starts_with("d.csv: "), "{e}");
        assert_eq!(parse_data_file("d.csv", "text,label\na,1\n").unwrap_err().code, crate::ErrorCode::Unsupported);
        let e = parse_data_file("d.jsonl", "{\"text\": \"a\"}\n\n{\"text\": 1}\n").unwrap_err();
        assert!(e.message.starts_with("d.jsonl: line 3: "), "{e}");
        let chat = parse_data_file("c.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n").unwrap();
        assert_eq!(chat, vec![Example::Chat { messages: vec![("user".into(), "hi".into()), ("assistant".into(), "yo".into())] }]);
        let e = parse_data_file("c.jsonl", "{\"messages\": [{\"role\": \"user\"}]}\n").unwrap_err();
        assert!(e.message.contains("line 1: messages[0]: expected a string `content`"), "{e}");
        assert!(parse_data_file("c.jsonl", "{\"messages\": []}\n").unwrap_err().message.contains("empty"));
    }

    #[test]
    fn validation_split() {
        let ex: Vec<Example> = (0..10).map(|i| Example::Text(format!("{i}"))).collect();
        let (train, val) = split_validation(&ex, 0.2, 3).unwrap();
        assert_eq!((train.len(), val.len()), (8, 2));
        assert!(val.iter().all(|v| !train.contains(v)));
        assert_eq!(split_validation(&ex, 0.2, 3).unwrap().1, val, "seeded");
        assert!((0..20).any(|s| split_validation(&ex, 0.2, s).unwrap().1 != val), "the seed matters");
        assert_eq!(split_validation(&ex, 0.01, 0).unwrap().1.len(), 1, "at least one held out");
        assert!(split_validation(&ex[..1], 0.5, 0).is_err());
        assert!(split_validation(&ex, 1.0, 0).is_err());
        assert_eq!(split_validation(&ex, 0.0, 0).unwrap().0, ex);
    }

    #[test]
    fn padding_and_shift() {
        let rows = vec![Tokenized { ids: vec![5, 6, 7], labels: vec![IGNORE, 6, 7] }, Tokenized { ids: vec![8, 9], labels: vec![8, 9] }];
        let b = Batch::new(&rows, 0).unwrap();
        assert_eq!(b.input_ids, vec![5, 6, 7, 8, 9, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.shifted_targets(), vec![6, 7, IGNORE, 9, IGNORE, IGNORE]);
        assert_eq!(b.num_targets(), 3);
    }
}
