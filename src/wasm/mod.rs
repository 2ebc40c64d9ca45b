//! The JavaScript boundary (wasm-bindgen). Every call returns a Promise that rejects with an
//! `Error` carrying `code` (see [`crate::error::ErrorCode`]); bad input never reaches tensor
//! code. A `log` bridge forwards Rust logs to the console and treats any error logged by the
//! GPU stack (a shader that failed to compile, an uncaptured WebGPU error) as fatal for the
//! call in flight, because on the web such errors are only logged while results go wrong.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::device::{Compute, init_webgpu, self_check};
use crate::error::{Error, ErrorCode, Result, err};
use crate::generate::GenerateOptions;
use crate::io::source::ModelFiles;
use crate::peft::lora::combine::{Combination, CombineOptions, SignMethod};
use crate::session::{Session, TrainOptions};
use crate::train::Schedule;
use crate::train::data::Example;

mod task;

thread_local! {
    static COMPUTE: RefCell<Option<Compute>> = const { RefCell::new(None) };
    /// First GPU-stack error logged since the flag was last cleared.
    static FAULT: RefCell<Option<String>> = const { RefCell::new(None) };
    static PANICKED: Cell<bool> = const { Cell::new(false) };
    /// Called with a message when the module panics (the JS wrapper rejects pending calls).
    static ON_FATAL: RefCell<Option<Function>> = const { RefCell::new(None) };
    /// The kernel profile `startProfile` began, until `finishProfile`.
    static PROFILER: RefCell<Option<crate::profile::Profiler>> = const { RefCell::new(None) };
}

/// Runs once, right after instantiation (wasm-bindgen's start function): the module's static
/// constructors ([`crate::device::run_constructors`]).
#[wasm_bindgen(start)]
fn start() {
    crate::device::run_constructors();
}

/// Register `callback(message)` to hear about a crash of the module: after a panic a pending
/// promise would never settle, so the JS wrapper uses this to reject it.
#[wasm_bindgen(js_name = onFatal)]
pub fn on_fatal(callback: Function) {
    ON_FATAL.with(|f| *f.borrow_mut() = Some(callback));
}

fn js_error(e: &Error) -> JsValue {
    let je = js_sys::Error::new(&e.to_string());
    let _ = Reflect::set(&je, &"code".into(), &e.code.as_str().into());
    je.into()
}

struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = format!("[{}] {}", r.target(), r.args());
        if r.level() == log::Level::Error {
            web_sys::console::error_1(&msg.clone().into());
            FAULT.with(|f| {
                f.borrow_mut().get_or_insert(msg);
            });
        } else {
            web_sys::console::warn_1(&msg.into());
        }
    }
    fn flush(&self) {}
}

static LOGGER: ConsoleLog = ConsoleLog;

fn install_hooks() {
    let _ = log::set_logger(&LOGGER).map(|_| log::set_max_level(log::LevelFilter::Warn));
    std::panic::set_hook(Box::new(|info| {
        PANICKED.with(|p| p.set(true));
        console_error_panic_hook::hook(info);
        let msg = JsValue::from(info.to_string());
        ON_FATAL.with(|f| f.borrow().as_ref().map(|f| f.call1(&JsValue::NULL, &msg)));
    }));
}

/// Run `f`, failing if the module already panicked or the GPU stack logged an error meanwhile.
async fn guarded<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    if PANICKED.with(|p| p.get()) {
        return Err(err!(Device, "the webpeft module crashed earlier; reload the page"));
    }
    FAULT.with(|f| f.borrow_mut().take());
    let out = f.await?;
    if let Some(msg) = FAULT.with(|f| f.borrow_mut().take()) {
        return Err(err!(Device, "the GPU reported an error, results discarded: {msg}"));
    }
    Ok(out)
}

fn promise<T: Into<JsValue>>(f: impl std::future::Future<Output = Result<T>> + 'static) -> Promise {
    future_to_promise(async move { guarded(f).await.map(Into::into).map_err(|e| js_error(&e)) })
}

fn compute() -> Result<Compute> {
    COMPUTE.with(|c| c.borrow().clone()).ok_or_else(|| err!(Device, "call init() first"))
}

/// Acquire the WebGPU device (once per page) and check that it computes correctly.
/// Resolves to `{ device }`; rejects with code "device" when WebGPU is missing or wrong.
#[wasm_bindgen]
pub fn init() -> Promise {
    install_hooks();
    promise(async {
        let c = match COMPUTE.with(|c| c.borrow().clone()) {
            Some(c) => c,
            None => {
                let c = init_webgpu().await?;
                COMPUTE.with(|slot| *slot.borrow_mut() = Some(c.clone()));
                c
            }
        };
        self_check(&c.device).await?;
        let o = Object::new();
        let _ = Reflect::set(&o, &"device".into(), &c.name.into());
        Ok(JsValue::from(o))
    })
}

/// The device's measured peak: the best rate of the matmuls training uses (f32, f16 where the
/// device has it, the Q4_1 dequantizing kernel) on `[n, n] · [n, n]` for each `n` of `sizes`,
/// `reps` products each after a warm-up. Resolves to `{ tflops, kernel, n, rates: [{ kernel,
/// n, seconds, tflops }] }`.
#[wasm_bindgen(js_name = measurePeak)]
pub fn measure_peak(sizes: Vec<u32>, reps: u32) -> Promise {
    promise(async move {
        let c = compute()?;
        let sizes: Vec<usize> = sizes.into_iter().map(|n| n as usize).collect();
        let peak = crate::train::flops::matmul_peak(&c.device, &sizes, reps as usize).await?;
        serde_wasm_bindgen::to_value(&peak).map_err(|e| err!(Device, "peak: {e}"))
    })
}

/// Which matmul runs the f32 products (attention, LoRA, an f32 base) on the GPU: "ours"
/// (webpeft's kernel, the default in the browser) or "burn" (Burn's matmul). Throws (code
/// "config") on any other name.
#[wasm_bindgen(js_name = setMatmul)]
pub fn set_matmul(kind: &str) -> std::result::Result<(), JsValue> {
    match kind {
        "ours" => crate::matmul::set_tiled(true),
        "burn" => crate::matmul::set_tiled(false),
        other => return Err(js_error(&err!(Config, "setMatmul: {other:?} is not a matmul (ours | burn)"))),
    }
    Ok(())
}

/// Start timing every GPU kernel this module launches (WebGPU timestamp queries where the
/// adapter has `timestamp-query`, the host clock otherwise), until [`finish_profile`]. A second
/// call starts over.
#[wasm_bindgen(js_name = startProfile)]
pub fn start_profile() {
    PROFILER.with(|p| {
        // The running one first: one launch observer at a time.
        drop(p.borrow_mut().take());
        *p.borrow_mut() = Some(crate::profile::Profiler::start());
    });
}

/// Stop the profile `startProfile` began, wait for its kernels, and resolve to the kernels by
/// name: `{ timing, launches, timed, kernel_seconds, span_seconds, idle_seconds, wall_seconds,
/// kernels: [{ kernel, launches, seconds, share }], phases: [{ phase, launches, seconds, share }] }`
/// (training's phases: "forward", "backward", "update"). Rejects with code "config" when no
/// profile was started.
#[wasm_bindgen(js_name = finishProfile)]
pub fn finish_profile() -> Promise {
    let profiler = PROFILER.with(|p| p.borrow_mut().take());
    promise(async move {
        let profiler = profiler.ok_or_else(|| err!(Config, "finishProfile: no profile was started (call startProfile first)"))?;
        serde_wasm_bindgen::to_value(&profiler.finish().await).map_err(|e| err!(Device, "profile: {e}"))
    })
}

/// Parse a data file (text, JSONL or CSV, chosen by `name`'s extension) into examples:
/// `{text}`, `{prompt, completion}` or `{messages: [{role, content}]}` objects. Throws the typed error naming file and line.
#[wasm_bindgen(js_name = parseData)]
pub fn parse_data(name: &str, text: &str) -> std::result::Result<Array, JsValue> {
    let examples = crate::train::data::parse_data_file(name, text).map_err(|e| js_error(&e))?;
    Ok(examples
        .iter()
        .map(|e| {
            let o = Object::new();
            match e {
                Example::Text(t) => set(&o, "text", t.as_str()),
                Example::PromptCompletion { prompt, completion } => {
                    set(&o, "prompt", prompt.as_str());
                    set(&o, "completion", completion.as_str());
                }
                Example::Chat { messages } => {
                    let list = Array::new();
                    for (role, content) in messages {
                        let m = Object::new();
                        set(&m, "role", role.as_str());
                        set(&m, "content", content.as_str());
                        list.push(&m);
                    }
                    set(&o, "messages", list);
                }
            }
            JsValue::from(o)
        })
        .collect())
}

/// Parse labelled rows for a classifier (`TaskModel.trainClassifier`): CSV/TSV with `text` and
/// `label` columns, or JSONL `{"text": ..., "label": ...}` (by `name`'s extension), into
/// `{text, label}` objects. Throws the typed error naming file and line.
#[wasm_bindgen(js_name = parseLabeled)]
pub fn parse_labeled(name: &str, text: &str) -> std::result::Result<Array, JsValue> {
    let rows = crate::train::data::two_fields(name, text, ["text", "label"]).map_err(|e| js_error(&e))?;
    Ok(rows
        .iter()
        .map(|[t, l]| {
            let o = Object::new();
            set(&o, "text", t.as_str());
            set(&o, "label", l.as_str());
            JsValue::from(o)
        })
        .collect())
}

fn bytes_of(v: &JsValue, name: &str) -> Result<Vec<u8>> {
    if let Some(s) = v.as_string() {
        return Ok(s.into_bytes());
    }
    if v.is_instance_of::<Uint8Array>() || v.is_instance_of::<js_sys::ArrayBuffer>() {
        return Ok(Uint8Array::new(v).to_vec());
    }
    Err(err!(Data, "file {name}: expected a string, Uint8Array or ArrayBuffer"))
}

/// `{ name: bytes | string }` to a map.
fn files_of(files: &JsValue) -> Result<BTreeMap<String, Vec<u8>>> {
    if !files.is_object() {
        return Err(err!(Data, "expected an object mapping file names to contents"));
    }
    let entries = Object::entries(&Object::from(files.clone()));
    let mut m = BTreeMap::new();
    for e in entries.iter() {
        let pair = Array::from(&e);
        let name = pair.get(0).as_string().unwrap_or_default();
        m.insert(name.clone(), bytes_of(&pair.get(1), &name)?);
    }
    Ok(m)
}

/// Options objects go through JSON so that unknown keys are refused (serde-wasm-bindgen
/// only looks up the fields it knows).
fn from_js<T: for<'de> Deserialize<'de>>(v: JsValue, what: &str) -> Result<T> {
    let text = if v.is_undefined() || v.is_null() { "{}".to_string() } else { js_sys::JSON::stringify(&v).map(String::from).map_err(|_| err!(Config, "{what}: not a plain object"))? };
    serde_json::from_str(&text).map_err(|e| err!(Config, "{what}: {e}"))
}

/// One adapter name, or several (trained or applied together).
#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn list(o: Option<Names>) -> Vec<String> {
        match o {
            None => vec![],
            Some(Names::One(n)) => vec![n],
            Some(Names::Many(v)) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct JsCombineOptions {
    combination_type: Option<String>,
    svd_rank: Option<usize>,
    svd_clamp: Option<f64>,
    density: Option<f64>,
    majority_sign_method: Option<String>,
    seed: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct JsTrainOptions {
    adapter: Option<Names>,
    steps: Option<usize>,
    batch: Option<usize>,
    seq_len: Option<usize>,
    grad_accum: Option<usize>,
    lr: Option<f64>,
    warmup: Option<usize>,
    schedule: Option<String>,
    weight_decay: Option<f64>,
    max_grad_norm: Option<f64>,
    seed: Option<u64>,
    append_eos: Option<bool>,
    dp: Option<JsDpOptions>,
    /// Step reports carry `checkpoint` (its files) every this many steps and after the last.
    checkpoint_every: Option<usize>,
    /// The most memory a training step may use (MiB).
    #[serde(rename = "memoryBudgetMiB")]
    memory_budget_mib: Option<u64>,
    /// Hold out this share of the examples (seeded by `seed`) as a validation set.
    validation: Option<f64>,
    /// Or give the validation examples themselves.
    validation_data: Option<Vec<serde_json::Value>>,
    /// Evaluate on the validation set every this many steps (0 / unset: after the last only).
    eval_every: Option<usize>,
    /// Gradient checkpointing: true / false forces it; unset lets the memory plan decide.
    gradient_checkpointing: Option<bool>,
}

/// Train options from JS: `resume` (a checkpoint's files, binary) is taken out before the
/// rest goes through JSON.
fn train_options(options: JsValue) -> Result<(JsTrainOptions, TrainOptions)> {
    let mut resume = None;
    let options = if options.is_object() && Reflect::has(&options, &"resume".into()).unwrap_or(false) {
        let files = Reflect::get(&options, &"resume".into()).unwrap_or(JsValue::UNDEFINED);
        // `resume: undefined` / `null` is no checkpoint (as any unset option).
        resume =
            if files.is_undefined() || files.is_null() { None } else { Some(crate::train::checkpoint::Checkpoint::from_files(&files_of(&files)?).map_err(|e| e.context("options.resume"))?) };
        let copy = Object::assign(&Object::new(), &Object::from(options));
        let _ = Reflect::delete_property(&copy, &"resume".into());
        JsValue::from(copy)
    } else {
        options
    };
    let o: JsTrainOptions = from_js(options, "train options")?;
    let mut opts = o.options()?;
    opts.resume = resume;
    Ok((o, opts))
}

/// DP-SGD options of `train` / `trainTasks`.
#[derive(Deserialize, Default, Clone)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct JsDpOptions {
    noise_multiplier: Option<f64>,
    max_grad_norm: Option<f64>,
    delta: Option<f64>,
    target_epsilon: Option<f64>,
    /// "poisson" (default) or "shuffle".
    sampling: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct JsGenerateOptions {
    adapter: Option<Names>,
    max_new_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    chat: Option<bool>,
}

/// An optional value (undefined / null = None).
fn from_js_opt<T: for<'de> Deserialize<'de>>(v: JsValue, what: &str) -> Result<Option<T>> {
    if v.is_undefined() || v.is_null() {
        return Ok(None);
    }
    serde_wasm_bindgen::from_value(v).map(Some).map_err(|e| err!(Config, "{what}: {e}"))
}

/// `{ shape, data: Float32Array }`.
fn tensor_js(t: &crate::io::safetensors::HostTensor) -> JsValue {
    let o = Object::new();
    let shape = Array::new();
    t.shape.iter().for_each(|&d| {
        shape.push(&(d as u32).into());
    });
    set(&o, "shape", shape);
    set(&o, "data", js_sys::Float32Array::from(&t.data[..]));
    o.into()
}

fn examples_of(v: JsValue) -> Result<Vec<Example>> {
    let vals: Vec<serde_json::Value> = serde_wasm_bindgen::from_value(v).map_err(|e| err!(Data, "examples: {e}"))?;
    if vals.is_empty() {
        return Err(err!(Data, "examples: empty"));
    }
    examples_from_json(&vals, "example")
}

/// Examples from JSON records; errors name `what[i]`.
fn examples_from_json(vals: &[serde_json::Value], what: &str) -> Result<Vec<Example>> {
    vals.iter().enumerate().map(|(i, v)| Example::from_json(v).map_err(|e| e.context(format!("{what} {i}")))).collect()
}

impl JsTrainOptions {
    fn options(&self) -> Result<TrainOptions> {
        let d = TrainOptions::default();
        Ok(TrainOptions {
            steps: self.steps.unwrap_or(d.steps),
            batch: self.batch.unwrap_or(d.batch),
            seq_len: self.seq_len.unwrap_or(d.seq_len),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            lr: self.lr.unwrap_or(d.lr),
            warmup: self.warmup.unwrap_or(d.warmup),
            schedule: self.schedule.as_deref().map(Schedule::parse).transpose()?.unwrap_or(d.schedule),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: match self.max_grad_norm {
                Some(x) if x <= 0.0 => None,
                Some(x) => Some(x),
                None => d.max_grad_norm,
            },
            seed: self.seed.unwrap_or(d.seed),
            append_eos: self.append_eos.unwrap_or(d.append_eos),
            dp: match &self.dp {
                None => None,
                Some(p) => Some(crate::train::privacy::DpConfig {
                    noise_multiplier: p.noise_multiplier,
                    max_grad_norm: p.max_grad_norm.unwrap_or(1.0),
                    delta: p.delta.unwrap_or(1e-5),
                    target_epsilon: p.target_epsilon,
                    poisson: match p.sampling.as_deref() {
                        None | Some("poisson") => true,
                        Some("shuffle") => false,
                        Some(other) => return Err(err!(Config, "dp.sampling {other:?} (poisson, shuffle)")),
                    },
                }),
            },
            checkpoint_every: self.checkpoint_every.unwrap_or(0),
            memory_budget_mib: self.memory_budget_mib,
            resume: None,
            pause: None,
            validation: Vec::new(),
            eval_every: self.eval_every.unwrap_or(0),
            gradient_checkpointing: self.gradient_checkpointing,
        })
    }

    /// The training examples and the validation set (`validation` share or `validationData`).
    fn split(&self, examples: Vec<Example>, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
        match (self.validation, &self.validation_data) {
            (Some(_), Some(_)) => Err(err!(Config, "give validation (a share) or validationData (examples), not both")),
            (Some(f), None) => crate::train::data::split_validation(&examples, f, seed),
            (None, Some(v)) => Ok((examples, examples_from_json(v, "validationData")?)),
            (None, None) => Ok((examples, vec![])),
        }
    }
}

/// A step report as a JS object, kept in `all` and passed to `on_step`; returns whether to go on.
fn report_step(r: &crate::session::StepReport, all: &Array, on_step: Option<&Function>) -> bool {
    let j = Object::new();
    set(&j, "step", r.stats.step as u32);
    set(&j, "totalSteps", r.total_steps as u32);
    set(&j, "loss", r.stats.loss);
    set(&j, "lr", r.stats.lr);
    set(&j, "gradNorm", r.stats.grad_norm);
    set(&j, "tokens", r.stats.tokens as u32);
    set(&j, "tokensPerSecond", r.tokens_per_second);
    set(&j, "seconds", r.seconds);
    set(&j, "epoch", r.epoch as u32);
    set(&j, "skipped", r.stats.skipped);
    if r.paused {
        set(&j, "paused", true);
    }
    if let Some(m) = r.memory_in_use {
        set(&j, "memoryInUse", m as f64);
    }
    if let Some(e) = r.epsilon {
        set(&j, "epsilon", e);
    }
    if let Some(e) = &r.eval {
        let o = Object::new();
        set(&o, "loss", e.loss);
        set(&o, "targets", e.targets as u32);
        set(&j, "eval", o);
    }
    if !r.task_names.is_empty() {
        let t = Object::new();
        for (n, l) in r.task_names.iter().zip(&r.stats.task_losses) {
            set(&t, n, *l);
        }
        set(&j, "taskLosses", t);
    }
    all.push(&j);
    // The checkpoint goes to on_step only (the caller stores it), not into the kept list.
    let mut arg = j;
    if let Some(c) = &r.checkpoint {
        match c.to_files() {
            Ok(files) => {
                let o = Object::new();
                for (name, bytes) in files {
                    set(&o, &name, Uint8Array::from(&bytes[..]));
                }
                arg = Object::assign(&Object::new(), &arg);
                set(&arg, "checkpoint", o);
            }
            Err(e) => log::warn!("checkpoint at step {}: {e}", c.iteration),
        }
    }
    on_step.is_none_or(|f| f.call1(&JsValue::NULL, &arg).map(|v| v != JsValue::FALSE).unwrap_or(true))
}

fn set(o: &Object, k: &str, v: impl Into<JsValue>) {
    let _ = Reflect::set(o, &k.into(), &v.into());
}

/// A loaded model with its adapters.
#[wasm_bindgen]
pub struct Model {
    inner: Rc<RefCell<Session>>,
    /// Set by `requestPause` while a `train` / `trainTasks` call runs (it cannot borrow the
    /// session then); the run stops after its current step with a checkpoint.
    pause: Arc<AtomicBool>,
    /// True while a `train` / `trainTasks` call holds the session (not any other call).
    training: Rc<Cell<bool>>,
}

/// Marks a model as training for as long as it lives.
struct Training(Rc<Cell<bool>>);
impl Training {
    fn start(flag: &Rc<Cell<bool>>) -> Self {
        flag.set(true);
        Training(flag.clone())
    }
}
impl Drop for Training {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Model {
    fn session(&self) -> Rc<RefCell<Session>> {
        self.inner.clone()
    }

    /// The pause flag for a new training call, cleared.
    fn pause_flag(&self) -> Arc<AtomicBool> {
        self.pause.store(false, Ordering::SeqCst);
        self.pause.clone()
    }
}

/// An adapter config without `peft_type` is a LoRA (as `addAdapter` documents).
fn lora_by_default(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.entry("peft_type").or_insert_with(|| "LORA".into());
    }
    v
}

/// An adapter's `adapter_config.json` text and `adapter_model.safetensors` bytes.
async fn saved_adapter(s: &Rc<RefCell<Session>>, name: &str) -> Result<(String, Vec<u8>)> {
    let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
    sess.save_adapter(name).await
}

fn busy() -> Error {
    err!(Config, "the model is busy with another call; await it first")
}

#[wasm_bindgen]
impl Model {
    /// Load from `{ "config.json", "model.safetensors" | shards + index, "tokenizer.json" }` or
    /// `{ "name.gguf": bytes }`. `base`: how the frozen weights are held on the GPU — "keep"
    /// (the default: a GGUF's Q8_0 / Q4_0 / Q4_1 stay quantized), "f32", or "q8_0" | "q4_0" |
    /// "q4_1" | "nf4" (quantized at load). `attention`: "blocked" (the default), "reference" or
    /// "fused" (see `models::attention`). Resolves to a Model.
    #[wasm_bindgen(js_name = fromFiles)]
    pub fn from_files(files: JsValue, base: Option<String>, attention: Option<String>) -> Promise {
        promise(async move {
            let attention = attention.map(|a| crate::models::attention::AttentionImpl::parse(&a)).transpose()?;
            let files = ModelFiles::from_named(files_of(&files)?)?;
            let compute = compute()?;
            let format = match base {
                Some(b) => crate::quant::BaseFormat::parse(&b)?,
                None => crate::quant::BaseFormat::default_for(&compute),
            };
            let mut s = Session::load_as(&files, compute, format)?;
            if let Some(a) = attention {
                s.model.attention = a;
            }
            Ok(Model { inner: Rc::new(RefCell::new(s)), pause: Arc::default(), training: Rc::default() })
        })
    }

    /// Model facts: `{ modelType, vocabSize, hiddenSize, layers, parameters, device, base,
    /// baseBytes, attention }` (`base`: the linear layers' formats, e.g. "q4_1"; `baseBytes`:
    /// what the frozen base holds on the device; `attention`: the implementation that runs).
    pub fn info(&self) -> JsValue {
        let s = self.inner.borrow();
        let c = &s.model.config;
        let o = Object::new();
        set(&o, "modelType", c.model_type.clone());
        set(&o, "vocabSize", c.vocab_size as u32);
        set(&o, "hiddenSize", c.hidden_size as u32);
        set(&o, "layers", c.num_hidden_layers as u32);
        set(&o, "parameters", s.model.num_parameters() as f64);
        set(&o, "device", s.compute.name.clone());
        set(&o, "base", s.model.base_formats());
        set(&o, "baseBytes", s.model.base_memory().bytes as f64);
        set(&o, "attention", s.model.runs_attention().name());
        o.into()
    }

    /// Token ids of `text` (the tokenizer's default special tokens).
    pub fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, JsValue> {
        self.inner.borrow().tokenizer.encode(text).map_err(|e| js_error(&e))
    }

    /// Add a new adapter from a peft config (JSON string or object; `peft_type` LORA (the
    /// default), IA3 or PROMPT_TUNING).
    #[wasm_bindgen(js_name = addAdapter)]
    pub fn add_adapter(&self, name: String, config: JsValue, seed: Option<u64>) -> Promise {
        let s = self.session();
        promise(async move {
            let json = match config.as_string() {
                Some(t) => t,
                None => js_sys::JSON::stringify(&config).map(String::from).map_err(|_| err!(Config, "config is not JSON"))?,
            };
            let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| err!(Config, "config: {e}"))?;
            let v = lora_by_default(v);
            s.try_borrow_mut().map_err(|_| busy())?.add_adapter(&name, &v, seed.unwrap_or(0))?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Load a PEFT adapter from `{ "adapter_config.json", "adapter_model.safetensors" }`.
    #[wasm_bindgen(js_name = loadAdapter)]
    pub fn load_adapter(&self, name: String, files: JsValue) -> Promise {
        let s = self.session();
        promise(async move {
            let (cfg, w) = crate::io::archive::adapter_files(files_of(&files)?)?;
            s.try_borrow_mut().map_err(|_| busy())?.load_adapter(&name, &cfg, &w)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The adapter as one zip (a folder `name/` with its two PEFT files): resolves to a
    /// Uint8Array that `loadAdapter(name, {"name.zip": bytes})` and `unzip` both read.
    #[wasm_bindgen(js_name = saveAdapterZip)]
    pub fn save_adapter_zip(&self, name: String) -> Promise {
        let s = self.session();
        promise(async move {
            let (cfg, w) = saved_adapter(&s, &name).await?;
            let zip = crate::io::archive::zip_folder(&name, &[("adapter_config.json", cfg.as_bytes()), ("adapter_model.safetensors", &w)])?;
            Ok(JsValue::from(Uint8Array::from(&zip[..])))
        })
    }

    /// Before training: what a new adapter from `config` (as `addAdapter`) trained with
    /// `options` (as `train`) would take. Resolves to `{ trainable, batch, gradAccum,
    /// memory: { total, weights, adapter, activations, attention, logits, largestBuffer,
    /// largestBufferName } (bytes), stepFlops, rowSeconds, stepSeconds, totalSeconds }`
    /// (`stepFlops`: one optimizer step's FLOPs as `train::flops` counts them); the times (from
    /// one measured training step over one row) only with `probe: true`. Nothing is kept.
    pub fn estimate(&self, config: JsValue, options: JsValue, probe: Option<bool>) -> Promise {
        let s = self.session();
        promise(async move {
            let cfg = lora_by_default(from_js(config, "adapter config")?);
            let (_, opts) = train_options(options)?;
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let e = sess.estimate(&cfg, &opts, probe.unwrap_or(false)).await?;
            let m = &e.plan.estimate;
            let mem = Object::new();
            for (k, v) in [
                ("total", m.total()),
                ("weights", m.weights),
                ("adapter", m.adapter),
                ("activations", m.activations),
                ("attention", m.attention),
                ("logits", m.logits),
                ("largestBuffer", m.largest_buffer.0),
            ] {
                set(&mem, k, v as f64);
            }
            set(&mem, "largestBufferName", m.largest_buffer.1);
            let o = Object::new();
            set(&o, "trainable", e.trainable as f64);
            set(&o, "stepFlops", e.step_flops.total());
            set(&o, "batch", e.plan.batch as u32);
            set(&o, "gradAccum", e.plan.grad_accum as u32);
            set(&o, "memory", mem);
            if let (Some(f), Some(st)) = (e.row_seconds, e.step_seconds) {
                set(&o, "rowSeconds", f);
                set(&o, "stepSeconds", st);
                set(&o, "totalSeconds", st * opts.steps as f64);
            }
            Ok(JsValue::from(o))
        })
    }

    /// What training will see of `examples` (as `train` takes them): for each of the first
    /// `limit` (default 5) rows, `{ ids, pieces, trained }`: token ids, each token's text, and
    /// whether the loss counts it (a text longer than seqLen is several rows, its windows).
    /// Options: seqLen (default 128), appendEos, limit.
    pub fn preview(&self, examples: JsValue, options: JsValue) -> std::result::Result<Array, JsValue> {
        #[derive(Deserialize, Default)]
        #[serde(default, deny_unknown_fields, rename_all = "camelCase")]
        struct O {
            seq_len: Option<usize>,
            append_eos: Option<bool>,
            limit: Option<usize>,
        }
        let run = || -> Result<Array> {
            let o: O = from_js(options, "preview options")?;
            let ex = examples_of(examples)?;
            let s = self.inner.try_borrow().map_err(|_| busy())?;
            let out = Array::new();
            // The rows training sees: a long text becomes several windows.
            let limit = o.limit.unwrap_or(5);
            let rows = crate::train::data::tokenize_all(&s.tokenizer, &ex[..ex.len().min(limit)], o.append_eos.unwrap_or(false), o.seq_len.unwrap_or(128))?;
            for t in rows.iter().take(limit) {
                let pieces = Array::new();
                let trained = Array::new();
                for (&id, &l) in t.ids.iter().zip(&t.labels) {
                    pieces.push(&s.tokenizer.decode(&[id], false)?.into());
                    trained.push(&(l != crate::train::data::IGNORE).into());
                }
                let row = Object::new();
                set(&row, "ids", js_sys::Uint32Array::from(&t.ids[..]));
                set(&row, "pieces", pieces);
                set(&row, "trained", trained);
                out.push(&row);
            }
            Ok(out)
        };
        run().map_err(|e| js_error(&e))
    }

    /// The two PEFT files of an adapter.
    #[wasm_bindgen(js_name = saveAdapter)]
    pub fn save_adapter(&self, name: String) -> Promise {
        let s = self.session();
        promise(async move {
            let (cfg, w) = saved_adapter(&s, &name).await?;
            let o = Object::new();
            set(&o, "adapter_config.json", cfg);
            set(&o, "adapter_model.safetensors", Uint8Array::from(&w[..]));
            Ok(JsValue::from(o))
        })
    }

    /// Train adapter `options.adapter` (default "default"; a list trains several together)
    /// on `examples` (strings, `{text}` or `{prompt, completion}`). `onStep(report)` is called
    /// after each step; it may return `false` to stop. Resolves to the list of reports.
    pub fn train(&self, examples: JsValue, options: JsValue, on_step: Option<Function>) -> Promise {
        let s = self.session();
        let pause = self.pause_flag();
        let training = self.training.clone();
        promise(async move {
            let (o, mut opts) = train_options(options)?;
            let (ex, validation) = o.split(examples_of(examples)?, opts.seed)?;
            opts.validation = validation;
            opts.pause = Some(pause);
            let names = match o.adapter {
                None => vec!["default".to_string()],
                some => Names::list(some),
            };
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let _training = Training::start(&training);
            let all = Array::new();
            sess.train_together(&names, &ex, &opts, |r| report_step(r, &all, on_step.as_ref())).await?;
            Ok(JsValue::from(all))
        })
    }

    /// Multi-task training: `tasks` maps adapter names to their examples; all adapters train
    /// together over the shared base, each batch mixing the tasks' rows, each row routed to its
    /// own adapter (LoRA, IA3 or bottleneck adapters). Step reports add `taskLosses`
    /// (`{name: loss}`). Options as `train` (without `adapter`).
    #[wasm_bindgen(js_name = trainTasks)]
    pub fn train_tasks(&self, tasks: JsValue, options: JsValue, on_step: Option<Function>) -> Promise {
        let s = self.session();
        let pause = self.pause_flag();
        let training = self.training.clone();
        promise(async move {
            let obj: Object = tasks.dyn_into().map_err(|_| err!(Data, "tasks: expected an object {{adapter: examples}}"))?;
            let mut data = Vec::new();
            for entry in Object::entries(&obj).iter() {
                let pair = Array::from(&entry);
                let name = pair.get(0).as_string().unwrap_or_default();
                let ex = examples_of(pair.get(1)).map_err(|e| e.context(format!("task {name:?}")))?;
                data.push((name, ex));
            }
            let (o, mut opts) = train_options(options)?;
            opts.pause = Some(pause);
            if o.adapter.is_some() {
                return Err(err!(Config, "trainTasks: the tasks name the adapters; drop options.adapter"));
            }
            if o.validation.is_some() || o.validation_data.is_some() {
                return Err(err!(Unsupported, "trainTasks: no validation set with multi-task training; evaluate each task's adapter after the run"));
            }
            let refs: Vec<(&str, &[Example])> = data.iter().map(|(n, e)| (n.as_str(), e.as_slice())).collect();
            let mut sess = s.try_borrow_mut().map_err(|_| busy())?;
            let _training = Training::start(&training);
            let all = Array::new();
            sess.train_multitask(&refs, &opts, |r| report_step(r, &all, on_step.as_ref())).await?;
            Ok(JsValue::from(all))
        })
    }

    /// Generate text after `prompt`. Options: adapter (a name or a list applied together),
    /// maxNewTokens, temperature (0 = greedy), topP, seed, chat (wrap in the chat template).
    /// `onToken(id, text)` streams each token with the text it adds (a last call with id null
    /// flushes text held back at an incomplete character).
    pub fn generate(&self, prompt: String, options: JsValue, on_token: Option<Function>) -> Promise {
        let s = self.session();
        promise(async move {
            let o: JsGenerateOptions = from_js(options, "generate options")?;
            let d = GenerateOptions::default();
            let g = GenerateOptions {
                max_new_tokens: o.max_new_tokens.unwrap_or(d.max_new_tokens),
                temperature: o.temperature.unwrap_or(d.temperature),
                top_p: o.top_p.unwrap_or(d.top_p),
                seed: o.seed.unwrap_or(d.seed),
                stop: None,
            };
            let sess = s.try_borrow().map_err(|_| busy())?;
            let names = Names::list(o.adapter);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            // Stream text as well as ids: decode everything so far and pass on what is new. A
            // token may end inside a UTF-8 character (shown as U+FFFD): that text waits for the
            // next token, and whatever is still held at the end comes in a last call with id null.
            let mut ids = Vec::new();
            let mut shown = 0usize;
            let text = sess
                .generate(&prompt, o.chat.unwrap_or(false), &g, &names, |t| {
                    ids.push(t);
                    if let Some(f) = &on_token {
                        let full = sess.tokenizer.decode(&ids, true).unwrap_or_default();
                        let piece = if full.len() >= shown && full.is_char_boundary(shown) && !full.ends_with('\u{FFFD}') {
                            let p = full[shown..].to_string();
                            shown = full.len();
                            p
                        } else {
                            String::new()
                        };
                        // `false` from the callback stops generation (a caller's cancel).
                        return f.call2(&JsValue::NULL, &t.into(), &piece.into()).map_or(true, |v| v != JsValue::FALSE);
                    }
                    true
                })
                .await?;
            if let Some(f) = &on_token
                && text.len() > shown
                && text.is_char_boundary(shown)
            {
                let _ = f.call2(&JsValue::NULL, &JsValue::NULL, &text[shown..].into());
            }
            Ok(JsValue::from(text))
        })
    }

    /// Pause the running `train` / `trainTasks` call: it stops after its current step, and that
    /// step's report has `paused: true` and a `checkpoint`; passing it as `options.resume` to the
    /// same call continues the run to the byte. Returns whether a training call was running.
    #[wasm_bindgen(js_name = requestPause)]
    pub fn request_pause(&self) -> bool {
        let running = self.training.get();
        if running {
            self.pause.store(true, Ordering::SeqCst);
        }
        running
    }

    /// Logits of token ids: resolves to `{ shape: [1, T, V], data: Float32Array }`.
    /// `adapter`: a name, a list applied together, or nothing (the base model).
    pub fn logits(&self, ids: Vec<u32>, adapter: JsValue) -> Promise {
        let s = self.session();
        promise(async move {
            let names = Names::list(from_js_opt(adapter, "adapter")?);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let sess = s.try_borrow().map_err(|_| busy())?;
            Ok(tensor_js(&sess.logits(&ids, &names).await?))
        })
    }

    /// Logits of several sequences in one batch, each with its own adapter (`null`: the
    /// base), like peft's `adapter_names=`: resolves to `{ shape: [rows, T, V], data }`.
    #[wasm_bindgen(js_name = logitsPerRow)]
    pub fn logits_per_row(&self, rows: JsValue, adapters: JsValue) -> Promise {
        let s = self.session();
        promise(async move {
            let rows: Vec<Vec<u32>> = serde_wasm_bindgen::from_value(rows).map_err(|e| err!(Data, "rows: {e}"))?;
            let adapters: Vec<Option<String>> = serde_wasm_bindgen::from_value(adapters).map_err(|e| err!(Config, "adapters: {e}"))?;
            let adapters: Vec<Option<&str>> = adapters.iter().map(Option::as_deref).collect();
            let sess = s.try_borrow().map_err(|_| busy())?;
            Ok(tensor_js(&sess.logits_per_row(&rows, &adapters).await?))
        })
    }

    /// The loaded adapters: `[{ name, method }]`.
    pub fn adapters(&self) -> std::result::Result<Array, JsValue> {
        let s = self.inner.try_borrow().map_err(|_| js_error(&busy()))?;
        let out = Array::new();
        for (name, method) in s.adapter_list() {
            let o = Object::new();
            set(&o, "name", name);
            set(&o, "method", method);
            out.push(&o);
        }
        Ok(out)
    }

    /// Remove an adapter; the base model stays loaded.
    #[wasm_bindgen(js_name = deleteAdapter)]
    pub fn delete_adapter(&self, name: String) -> std::result::Result<(), JsValue> {
        let mut s = self.inner.try_borrow_mut().map_err(|_| js_error(&busy()))?;
        s.delete_adapter(&name).map_err(|e| js_error(&e))
    }

    /// A new LoRA adapter combining LoRA `adapters` with `weights`, as peft's
    /// `add_weighted_adapter`. Options: combinationType (svd, linear, cat, ties, ties_svd,
    /// dare_linear, dare_linear_svd, dare_ties, dare_ties_svd, magnitude_prune,
    /// magnitude_prune_svd; default svd), svdRank, svdClamp, density, majoritySignMethod
    /// ("total" | "frequency"), seed.
    #[wasm_bindgen(js_name = addWeightedAdapter)]
    pub fn add_weighted_adapter(&self, name: String, adapters: Vec<String>, weights: Vec<f64>, options: JsValue) -> Promise {
        let s = self.session();
        promise(async move {
            if adapters.len() != weights.len() {
                return Err(err!(Config, "{} adapters but {} weights", adapters.len(), weights.len()));
            }
            let o: JsCombineOptions = from_js(options, "combine options")?;
            let opts = CombineOptions {
                combination: Combination::parse(o.combination_type.as_deref().unwrap_or("svd"))?,
                svd_rank: o.svd_rank,
                svd_clamp: o.svd_clamp,
                density: o.density,
                majority_sign: match o.majority_sign_method.as_deref() {
                    None | Some("total") => SignMethod::Total,
                    Some("frequency") => SignMethod::Frequency,
                    Some(other) => {
                        return Err(err!(Config, "majoritySignMethod {other:?} (total, frequency)"));
                    }
                },
                seed: o.seed.unwrap_or(0),
            };
            let parts: Vec<(&str, f64)> = adapters.iter().map(String::as_str).zip(weights).collect();
            s.try_borrow_mut().map_err(|_| busy())?.add_weighted_adapter(&name, &parts, &opts).await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Fold a LoRA / DoRA / IA3 adapter into the base weights (then the base alone computes
    /// base + adapter); `unmergeAdapter` restores the original weights exactly.
    #[wasm_bindgen(js_name = mergeAdapter)]
    pub fn merge_adapter(&self, name: String) -> std::result::Result<(), JsValue> {
        let mut s = self.inner.try_borrow_mut().map_err(|_| js_error(&busy()))?;
        s.merge_adapter(&name).map_err(|e| js_error(&e))
    }

    #[wasm_bindgen(js_name = unmergeAdapter)]
    pub fn unmerge_adapter(&self, name: String) -> std::result::Result<(), JsValue> {
        let mut s = self.inner.try_borrow_mut().map_err(|_| js_error(&busy()))?;
        s.unmerge_adapter(&name).map_err(|e| js_error(&e))
    }

    /// The model (with merged adapters folded in) as a Hugging Face folder:
    /// `{ "config.json": string, "model.safetensors": Uint8Array, "tokenizer.json": string, ... }`.
    #[wasm_bindgen(js_name = exportModel)]
    pub fn export_model(&self) -> Promise {
        let s = self.session();
        promise(async move {
            let files = s.try_borrow().map_err(|_| busy())?.export_model().await?;
            let o = Object::new();
            for (name, bytes) in files {
                if name.ends_with(".safetensors") {
                    set(&o, &name, Uint8Array::from(&bytes[..]));
                } else {
                    set(&o, &name, String::from_utf8(bytes).map_err(|_| err!(Format, "{name} is not UTF-8"))?);
                }
            }
            Ok(JsValue::from(o))
        })
    }
}

impl From<ErrorCode> for JsValue {
    fn from(c: ErrorCode) -> Self {
        c.as_str().into()
    }
}
