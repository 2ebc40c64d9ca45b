//! `TaskModel`: classification and sentence embeddings from JavaScript (see [`crate::task`]).
//! A text classifier (LoRA + head) on an encoder or a decoder, an image classifier on a ViT
//! (images decoded and resized in the module), predictions with the fitted temperature,
//! sentence embeddings and their tuning on pairs, peft adapters in and out.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Array, Float32Array, Function, Object, Uint8Array};
use serde::Deserialize;
use wasm_bindgen::prelude::*;

use super::{busy, compute, files_of, from_js, promise, set};
use crate::error::{Result, err};
use crate::io::source::ModelFiles;
use crate::peft::lora::LoraConfig;
use crate::task::{ClassifyOptions, ClassifyReport, EpochReport, HEAD_FILE, LabeledImage, TaskKind, TaskSession};
use crate::train::Schedule;
use crate::train::classify::{Labeled, Metrics};
use crate::train::contrastive::Pair;

/// Training options from JS; absent ones take [`ClassifyOptions`]' defaults.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct JsTaskOptions {
    epochs: Option<usize>,
    max_steps: Option<usize>,
    batch: Option<usize>,
    seq_len: Option<usize>,
    lr: Option<f64>,
    weight_decay: Option<f64>,
    warmup: Option<usize>,
    schedule: Option<String>,
    max_grad_norm: Option<f64>,
    seed: Option<u64>,
    val_split: Option<f64>,
    class_weights: Option<bool>,
    patience: Option<usize>,
    calibrate: Option<bool>,
}

impl JsTaskOptions {
    fn options(self) -> Result<ClassifyOptions> {
        let d = ClassifyOptions::default();
        Ok(ClassifyOptions {
            epochs: self.epochs.unwrap_or(d.epochs),
            max_steps: self.max_steps,
            batch: self.batch.unwrap_or(d.batch),
            seq_len: self.seq_len.unwrap_or(d.seq_len),
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            warmup: self.warmup.unwrap_or(d.warmup),
            schedule: self.schedule.as_deref().map(Schedule::parse).transpose()?.unwrap_or(d.schedule),
            max_grad_norm: match self.max_grad_norm {
                Some(x) if x <= 0.0 => None,
                Some(x) => Some(x),
                None => d.max_grad_norm,
            },
            seed: self.seed.unwrap_or(d.seed),
            val_fraction: self.val_split.unwrap_or(d.val_fraction),
            class_weights: self.class_weights.unwrap_or(d.class_weights),
            patience: self.patience,
            calibrate: self.calibrate.unwrap_or(d.calibrate),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsLabeled {
    text: String,
    label: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsPair {
    anchor: String,
    positive: String,
}

fn metrics_js(m: &Metrics) -> JsValue {
    let o = Object::new();
    set(&o, "loss", m.loss);
    set(&o, "accuracy", m.accuracy);
    set(&o, "macroF1", m.macro_f1);
    set(&o, "ece", m.ece);
    let rows = Array::new();
    for r in &m.confusion {
        rows.push(&JsValue::from(r.iter().map(|&x| JsValue::from(x as u32)).collect::<Array>()));
    }
    set(&o, "confusion", rows);
    o.into()
}

fn epoch_js(e: &EpochReport) -> JsValue {
    let o = Object::new();
    set(&o, "epoch", e.epoch as u32);
    set(&o, "steps", e.steps as u32);
    set(&o, "trainLoss", e.train_loss);
    set(&o, "seconds", e.seconds);
    set(&o, "tokensPerSecond", e.tokens_per_second);
    set(&o, "val", e.val.as_ref().map_or(JsValue::NULL, metrics_js));
    o.into()
}

fn report_js(rep: &ClassifyReport, epochs: Array) -> JsValue {
    let out = Object::new();
    set(&out, "labels", rep.labels.iter().map(|l| JsValue::from(l.as_str())).collect::<Array>());
    set(&out, "epochs", epochs);
    set(&out, "bestEpoch", rep.best_epoch as u32);
    set(&out, "temperature", rep.temperature);
    set(&out, "val", rep.val_uncalibrated.as_ref().map_or(JsValue::NULL, metrics_js));
    set(&out, "valCalibrated", rep.val_calibrated.as_ref().map_or(JsValue::NULL, metrics_js));
    set(&out, "trainExamples", rep.train_examples as u32);
    set(&out, "valExamples", rep.val_examples as u32);
    out.into()
}

/// `[{ label, id, probabilities, logits }]`, probabilities at the session's temperature.
fn predictions_js(sess: &TaskSession, logits: &[Vec<f32>]) -> JsValue {
    let probs = crate::train::classify::softmax_rows(logits, sess.temperature);
    let out = Array::new();
    for (l, p) in logits.iter().zip(&probs) {
        let k = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        let o = Object::new();
        set(&o, "label", sess.labels.get(k).cloned().unwrap_or_else(|| k.to_string()));
        set(&o, "id", k as u32);
        set(&o, "probabilities", p.iter().map(|&x| JsValue::from(x)).collect::<Array>());
        set(&o, "logits", Float32Array::from(&l[..]));
        out.push(&o);
    }
    out.into()
}

fn texts_of(v: JsValue) -> Result<Vec<String>> {
    from_js(v, "texts (an array of strings)")
}

/// A model loaded for classification or embeddings, with its adapter and head.
#[wasm_bindgen]
pub struct TaskModel {
    inner: Rc<RefCell<TaskSession>>,
}

#[wasm_bindgen]
impl TaskModel {
    /// Load from files (`{ "config.json", "model.safetensors", "tokenizer.json" }` or a
    /// `.gguf`) for `task`: "classification" (encoders and decoders) or "embedding" (encoders).
    #[wasm_bindgen(js_name = fromFiles)]
    pub fn from_files(files: JsValue, task: String) -> js_sys::Promise {
        promise(async move {
            let kind = match task.as_str() {
                "classification" => TaskKind::Classification,
                "embedding" => TaskKind::Embedding,
                other => return Err(err!(Config, "task {other:?} (classification, embedding)")),
            };
            let s = TaskSession::load(&ModelFiles::from_named(files_of(&files)?)?, compute()?, kind)?;
            Ok(TaskModel { inner: Rc::new(RefCell::new(s)) })
        })
    }

    /// `{ architecture, hiddenSize, labels, temperature, device }`
    pub fn info(&self) -> JsValue {
        let s = self.inner.borrow();
        let o = Object::new();
        set(
            &o,
            "architecture",
            match &s.model {
                crate::task::Backbone::Bert(_) => "bert",
                crate::task::Backbone::Decoder(m) => m.config.model_type.as_str(),
                crate::task::Backbone::Vit(_) => "vit",
            },
        );
        set(&o, "hiddenSize", s.model.hidden_size() as u32);
        set(&o, "labels", s.labels.iter().map(|l| JsValue::from(l.as_str())).collect::<Array>());
        set(&o, "temperature", s.temperature);
        set(&o, "device", s.compute.name.clone());
        o.into()
    }

    /// Add a LoRA adapter from a peft LoraConfig (object or JSON; `peft_type` may be left out).
    #[wasm_bindgen(js_name = addLora)]
    pub fn add_lora(&self, config: String, seed: Option<u64>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let mut v: serde_json::Value = serde_json::from_str(&config).map_err(|e| err!(Config, "config: {e}"))?;
            if let Some(o) = v.as_object_mut() {
                o.entry("peft_type").or_insert_with(|| "LORA".into());
            }
            s.try_borrow_mut().map_err(|_| busy())?.add_lora(LoraConfig::from_value(&v)?, seed.unwrap_or(0))?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Add a BitFit adapter: every bias of the model trains (with the classification head);
    /// saved as a SELECTIVE adapter. Resolves to the number of trainable values.
    #[wasm_bindgen(js_name = addBitFit)]
    pub fn add_bitfit(&self) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let mut s = s.try_borrow_mut().map_err(|_| busy())?;
            s.add_bitfit()?;
            Ok(JsValue::from_f64(s.num_trainable() as f64))
        })
    }

    /// Load a PEFT adapter: `{ "adapter_config.json", "adapter_model.safetensors", "webpeft_head.json"? }`.
    #[wasm_bindgen(js_name = loadAdapter)]
    pub fn load_adapter(&self, files: JsValue) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let f = files_of(&files)?;
            let text = |n: &str| f.get(n).map(|b| String::from_utf8(b.clone()).map_err(|_| err!(Format, "{n} is not UTF-8"))).transpose();
            let cfg = text("adapter_config.json")?.ok_or_else(|| err!(Io, "adapter_config.json missing"))?;
            let w = f.get("adapter_model.safetensors").ok_or_else(|| err!(Io, "adapter_model.safetensors missing"))?;
            s.try_borrow_mut().map_err(|_| busy())?.load_adapter(&cfg, w, text(HEAD_FILE)?.as_deref())?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The adapter's files (`adapter_config.json` as a string, `adapter_model.safetensors`
    /// bytes, and for a classifier `webpeft_head.json`).
    #[wasm_bindgen(js_name = saveAdapter)]
    pub fn save_adapter(&self) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let files = s.try_borrow_mut().map_err(|_| busy())?.save_adapter().await?;
            let o = Object::new();
            for (name, bytes) in files {
                if name.ends_with(".json") {
                    set(&o, &name, String::from_utf8(bytes).map_err(|_| err!(Format, "{name} is not UTF-8"))?);
                } else {
                    set(&o, &name, Uint8Array::from(&bytes[..]));
                }
            }
            Ok(JsValue::from(o))
        })
    }

    /// Train the classifier on `rows` (`[{text, label}]`); `onEpoch(report)` after each
    /// epoch may return false to stop. Resolves to `{ labels, epochs, bestEpoch, temperature,
    /// val, valCalibrated, trainExamples, valExamples }`.
    #[wasm_bindgen(js_name = trainClassifier)]
    pub fn train_classifier(&self, rows: JsValue, options: JsValue, on_epoch: Option<Function>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let rows: Vec<JsLabeled> = from_js(rows, "rows ([{text, label}])")?;
            let rows: Vec<Labeled> = rows
                .into_iter()
                .map(|r| {
                    let label = match r.label {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) => n.to_string(),
                        other => return Err(err!(Data, "label {other}: expected a string or a number")),
                    };
                    Ok(Labeled { text: r.text, label })
                })
                .collect::<Result<_>>()?;
            let o = from_js::<JsTaskOptions>(options, "options")?.options()?;
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let epochs = Array::new();
            let rep = sess
                .train_classifier(&rows, &o, |e| {
                    let r = epoch_js(e);
                    epochs.push(&r);
                    on_epoch.as_ref().is_none_or(|f| f.call1(&JsValue::NULL, &r).map(|v| v != JsValue::FALSE).unwrap_or(true))
                })
                .await?;
            Ok(report_js(&rep, epochs))
        })
    }

    /// Train an image classifier (ViT) on `rows` (`[{image, label}]`, `image` the bytes of a
    /// PNG or JPEG file, decoded and resized here); as `trainClassifier` otherwise.
    #[wasm_bindgen(js_name = trainImageClassifier)]
    pub fn train_image_classifier(&self, rows: Array, options: JsValue, on_epoch: Option<Function>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let o = from_js::<JsTaskOptions>(options, "options")?.options()?;
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let mut data = Vec::with_capacity(rows.length() as usize);
            for (i, r) in rows.iter().enumerate() {
                let image = js_sys::Reflect::get(&r, &"image".into()).map_err(|_| err!(Data, "row {i}: no image"))?;
                let label = js_sys::Reflect::get(&r, &"label".into())
                    .ok()
                    .and_then(|l| l.as_string().or_else(|| l.as_f64().map(|x| x.to_string())))
                    .ok_or_else(|| err!(Data, "row {i}: expected a string or number label"))?;
                let pixels = sess.image_pixels(&super::bytes_of(&image, &format!("row {i} image"))?)?;
                data.push(LabeledImage { pixels, label });
            }
            let epochs = Array::new();
            let rep = sess
                .train_image_classifier(&data, &o, |e| {
                    let r = epoch_js(e);
                    epochs.push(&r);
                    on_epoch.as_ref().is_none_or(|f| f.call1(&JsValue::NULL, &r).map(|v| v != JsValue::FALSE).unwrap_or(true))
                })
                .await?;
            Ok(report_js(&rep, epochs))
        })
    }

    /// Classify images (bytes of PNG / JPEG files): as `predict`.
    #[wasm_bindgen(js_name = predictImages)]
    pub fn predict_images(&self, images: Array, batch: Option<usize>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let sess = s.try_borrow().map_err(|_| busy())?;
            let pixels = images.iter().enumerate().map(|(i, b)| sess.image_pixels(&super::bytes_of(&b, &format!("image {i}"))?)).collect::<Result<Vec<_>>>()?;
            let logits = sess.image_logits(&pixels, batch.unwrap_or(32)).await?;
            Ok(predictions_js(&sess, &logits))
        })
    }

    /// Classify texts: `[{ label, id, probabilities, logits }]` (probabilities with the
    /// fitted temperature).
    pub fn predict(&self, texts: JsValue, seq_len: Option<usize>, batch: Option<usize>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let texts = texts_of(texts)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let sess = s.try_borrow().map_err(|_| busy())?;
            let logits = sess.logits(&refs, seq_len.unwrap_or(128), batch.unwrap_or(32)).await?;
            Ok(predictions_js(&sess, &logits))
        })
    }

    /// Sentence embeddings: one unit-length `Float32Array` per text.
    pub fn embed(&self, texts: JsValue, seq_len: Option<usize>, batch: Option<usize>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let texts = texts_of(texts)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let sess = s.try_borrow().map_err(|_| busy())?;
            let e = sess.embed(&refs, seq_len.unwrap_or(256), batch.unwrap_or(32)).await?;
            Ok(JsValue::from(e.iter().map(|v| JsValue::from(Float32Array::from(&v[..]))).collect::<Array>()))
        })
    }

    /// Tune the embeddings to `pairs` (`[{anchor, positive}]`, in-batch negatives);
    /// `onStep({step, loss, lr})` may return false to stop. Resolves to the steps' losses.
    #[wasm_bindgen(js_name = trainEmbeddings)]
    pub fn train_embeddings(&self, pairs: JsValue, options: JsValue, on_step: Option<Function>) -> js_sys::Promise {
        let s = self.inner.clone();
        promise(async move {
            let pairs: Vec<JsPair> = from_js(pairs, "pairs ([{anchor, positive}])")?;
            let pairs: Vec<Pair> = pairs.into_iter().map(|p| Pair { anchor: p.anchor, positive: p.positive }).collect();
            let o = from_js::<JsTaskOptions>(options, "options")?.options()?;
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let steps = sess
                .train_embeddings(&pairs, &o, |st| {
                    let r = Object::new();
                    set(&r, "step", st.step as u32);
                    set(&r, "loss", st.loss);
                    set(&r, "lr", st.lr);
                    on_step.as_ref().is_none_or(|f| f.call1(&JsValue::NULL, &r).map(|v| v != JsValue::FALSE).unwrap_or(true))
                })
                .await?;
            Ok(JsValue::from(steps.iter().map(|s| JsValue::from(s.loss)).collect::<Array>()))
        })
    }
}
