//! Training checkpoints: everything needed to resume a run exactly where it stopped (the
//! trainable tensors, AdamW's moments and step, the loop's counters), as two named files:
//! `tensors.safetensors` and `state.json`, whose manifest records each file's size and
//! SHA-256 so that a damaged checkpoint is detected rather than trained on.
//!
//! Natively, [`save_dir`] writes a checkpoint folder atomically (a new folder, then a
//! switch by rename); [`load_dir`] falls back to the previous checkpoint when a crash
//! interrupted the switch or the newest one is corrupt. The browser keeps the same files
//! in its own storage.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::error::{Result, bail, err};
use crate::io::safetensors::{HostTensor, OutTensor, read_all_f32, write};
use crate::peft::Trainable;
use crate::tensor::{read, upload};
use crate::train::optim::Moments;
use crate::train::scaler::LossScaler;
use crate::train::trainer::Trainer;

const FORMAT: &str = "webpeft-checkpoint";
const TENSORS: &str = "tensors.safetensors";
const STATE: &str = "state.json";

/// A training run's state after `iteration` loop iterations.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Loop iterations completed (optimizer steps taken or skipped as non-finite).
    pub iteration: usize,
    /// Optimizer steps applied (AdamW's bias corrections depend on it).
    pub opt_step: usize,
    /// Non-finite steps in a row at this point.
    pub nonfinite: usize,
    /// The loss scaler's state (training over an f16 base).
    pub loss_scale: Option<LossScaler>,
    /// Trainable tensors in the adapter's own order (names kept to check the match).
    pub params: Vec<(String, HostTensor)>,
    /// AdamW's first and second moments, per parameter (absent before the first update).
    pub moments: Vec<Option<(HostTensor, HostTensor)>>,
    /// The settings that decide the run's course; resuming under others is refused.
    pub fingerprint: Json,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    bytes: usize,
    sha256: String,
}

#[derive(Serialize, Deserialize)]
struct State {
    format: String,
    version: u32,
    iteration: usize,
    opt_step: usize,
    nonfinite: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<LossScaler>,
    names: Vec<String>,
    fingerprint: Json,
    files: BTreeMap<String, FileEntry>,
}

/// SHA-256 of `b`, as lowercase hex.
pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

impl Checkpoint {
    /// Capture the adapter's tensors and the trainer's state: the optimizer (read back from
    /// the device), the count of non-finite steps and the loss scaler.
    pub async fn capture(adapter: &mut dyn Trainable, trainer: &Trainer, iteration: usize, fingerprint: Json) -> Result<Checkpoint> {
        let opt = &trainer.opt;
        let mut params = Vec::new();
        for p in adapter.params_mut() {
            params.push((p.name.clone(), read(p.tensor.clone().without_autodiff()).await?));
        }
        let mut moments = Vec::new();
        for st in &opt.state {
            moments.push(match st {
                Some(Moments { m, v }) => Some((read(m.clone()).await?, read(v.clone()).await?)),
                None => None,
            });
        }
        Ok(Checkpoint { iteration, opt_step: opt.step, nonfinite: trainer.nonfinite, loss_scale: trainer.scaler, params, moments, fingerprint })
    }

    /// Put the tensors back into `adapter` and the trainer's state into `trainer`, after
    /// checking that the checkpoint belongs to this run (same settings, same parameters and
    /// shapes).
    pub fn restore(&self, adapter: &mut dyn Trainable, trainer: &mut Trainer, fingerprint: &Json) -> Result<()> {
        if &self.fingerprint != fingerprint {
            let differs: Vec<String> = match (self.fingerprint.as_object(), fingerprint.as_object()) {
                (Some(a), Some(b)) => a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect(),
                _ => vec!["(all)".into()],
            };
            bail!(Config, "checkpoint: it was written by a run with other settings ({}); resume with the same ones or start afresh", differs.join(", "));
        }
        let mut params = adapter.params_mut();
        if params.len() != self.params.len() {
            bail!(Shape, "checkpoint: {} trainable tensors, the adapter has {}", self.params.len(), params.len());
        }
        for (p, (name, h)) in params.iter().zip(&self.params) {
            if &p.name != name || p.tensor.dims().as_slice() != h.shape.as_slice() {
                bail!(Shape, "checkpoint: tensor {name} {:?} does not fit the adapter's {} {:?}", h.shape, p.name, p.tensor.dims());
            }
        }
        for (p, (_, h)) in params.iter_mut().zip(&self.params) {
            *p.tensor = upload(h, &p.tensor.device())?;
        }
        trainer.opt.step = self.opt_step;
        trainer.nonfinite = self.nonfinite;
        trainer.scaler = self.loss_scale;
        // Each parameter's moments on its device (none before the first update).
        trainer.opt.state = params
            .iter()
            .zip(&self.moments)
            .map(|(p, m)| m.as_ref().map(|(m, v)| Ok::<_, crate::Error>(Moments { m: upload(m, &p.tensor.device())?, v: upload(v, &p.tensor.device())? })).transpose())
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The checkpoint as named files (`state.json` last: it holds the others' hashes).
    pub fn to_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut t = BTreeMap::new();
        for (i, (_, h)) in self.params.iter().enumerate() {
            t.insert(format!("param.{i:04}"), OutTensor::F32(h.clone()));
        }
        for (i, m) in self.moments.iter().enumerate() {
            if let Some((m, v)) = m {
                t.insert(format!("adam_m.{i:04}"), OutTensor::F32(m.clone()));
                t.insert(format!("adam_v.{i:04}"), OutTensor::F32(v.clone()));
            }
        }
        let tensors = write(&t, None)?;
        let state = State {
            format: FORMAT.into(),
            version: 1,
            iteration: self.iteration,
            opt_step: self.opt_step,
            nonfinite: self.nonfinite,
            loss_scale: self.loss_scale,
            names: self.params.iter().map(|(n, _)| n.clone()).collect(),
            fingerprint: self.fingerprint.clone(),
            files: BTreeMap::from([(TENSORS.to_string(), FileEntry { bytes: tensors.len(), sha256: sha256_hex(&tensors) })]),
        };
        let state = serde_json::to_vec_pretty(&state)?;
        Ok(vec![(TENSORS.to_string(), tensors), (STATE.to_string(), state)])
    }

    /// Read the files back, checking each against the manifest (size, then SHA-256).
    pub fn from_files(files: &BTreeMap<String, Vec<u8>>) -> Result<Checkpoint> {
        let state = files.get(STATE).ok_or_else(|| err!(Io, "checkpoint: {STATE} missing"))?;
        let state: State = serde_json::from_slice(state).map_err(|e| err!(Format, "checkpoint: {STATE}: {e}"))?;
        if state.format != FORMAT || state.version != 1 {
            bail!(Format, "checkpoint: {STATE} is not a {FORMAT} version 1");
        }
        for (name, want) in &state.files {
            let got = files.get(name).ok_or_else(|| err!(Io, "checkpoint: {name} missing"))?;
            if got.len() != want.bytes {
                bail!(Format, "checkpoint: {name} has {} bytes, the manifest says {}: truncated or damaged", got.len(), want.bytes);
            }
            if sha256_hex(got) != want.sha256 {
                bail!(Format, "checkpoint: {name} does not match its SHA-256 in {STATE}: damaged");
            }
        }
        let bytes = files.get(TENSORS).filter(|_| state.files.contains_key(TENSORS)).ok_or_else(|| err!(Format, "checkpoint: {TENSORS} missing from the manifest"))?;
        let mut t = read_all_f32(bytes).map_err(|e| e.context(format!("checkpoint: {TENSORS}")))?;
        let mut take = |k: String| t.remove(&k);
        let params = state
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| take(format!("param.{i:04}")).map(|h| (n.clone(), h)).ok_or_else(|| err!(Format, "checkpoint: tensor {n} missing")))
            .collect::<Result<Vec<_>>>()?;
        let moments = (0..params.len()).map(|i| take(format!("adam_m.{i:04}")).zip(take(format!("adam_v.{i:04}")))).collect();
        Ok(Checkpoint { iteration: state.iteration, opt_step: state.opt_step, nonfinite: state.nonfinite, loss_scale: state.loss_scale, params, moments, fingerprint: state.fingerprint })
    }
}

/// Write a checkpoint folder atomically: into `<dir>.new`, synced, then `<dir>` becomes
/// `<dir>.old` and `<dir>.new` becomes `<dir>`, then `<dir>.old` goes. A crash at any point
/// leaves an intact checkpoint in `<dir>` or `<dir>.old` (see [`load_dir`]).
#[cfg(not(target_family = "wasm"))]
pub fn save_dir(dir: &std::path::Path, c: &Checkpoint) -> Result<()> {
    use std::io::Write;
    let sibling = |ext: &str| dir.with_file_name(format!("{}.{ext}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint")));
    let (new, old) = (sibling("new"), sibling("old"));
    let io = |what: &str, e: std::io::Error| err!(Io, "checkpoint {}: {what}: {e}", dir.display());
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(|e| io("removing a stale .new", e))?;
    }
    std::fs::create_dir_all(&new).map_err(|e| io("create", e))?;
    for (name, bytes) in c.to_files()? {
        let mut f = std::fs::File::create(new.join(&name)).map_err(|e| io(&name, e))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| io(&name, e))?;
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io("removing a stale .old", e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io("rename to .old", e))?;
    }
    std::fs::rename(&new, dir).map_err(|e| io("rename .new", e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("removing .old", e))?;
    }
    Ok(())
}

/// Read the newest intact checkpoint: `<dir>`, or `<dir>.old` when `<dir>` is missing
/// (a crash between the renames) or damaged. `Ok(None)` when there is none at all.
#[cfg(not(target_family = "wasm"))]
pub fn load_dir(dir: &std::path::Path) -> Result<Option<Checkpoint>> {
    let read = |d: &std::path::Path| -> Result<Checkpoint> {
        let mut files = BTreeMap::new();
        for name in [TENSORS, STATE] {
            let p = d.join(name);
            if p.is_file() {
                files.insert(name.to_string(), std::fs::read(&p).map_err(|e| err!(Io, "{}: {e}", p.display()))?);
            }
        }
        Checkpoint::from_files(&files).map_err(|e| e.context(d.display()))
    };
    let old = dir.with_file_name(format!("{}.old", dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint")));
    match (dir.is_dir(), old.is_dir()) {
        (false, false) => Ok(None),
        (true, false) => read(dir).map(Some),
        (false, true) => read(&old).map(Some),
        (true, true) => match read(dir) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                log::warn!("{e}; using the previous checkpoint");
                read(&old).map(Some)
            }
        },
    }
}
