//! The same numeric checks inside headless Chromium (WebGPU on SwiftShader): a broken shader
//! on wasm returns stale or wrong data without an error, so these compare numbers against
//! the PyTorch fixtures. Run by scripts/test-browser (`cargo test --target wasm32-unknown-unknown`).
#![cfg(target_family = "wasm")]

use std::collections::BTreeMap;

use wasm_bindgen_test::*;
use webpeft::device::{Compute, init_webgpu, self_check};
use webpeft::io::safetensors::{HostTensor, read_all_f32};
use webpeft::io::source::ModelFiles;
use webpeft::session::Session;
use webpeft::train::data::Batch;
use webpeft::train::{AdamWConfig, TrainConfig, Trainer};

wasm_bindgen_test_configure!(run_in_browser);

macro_rules! fx {
    ($p:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/", $p)).as_slice()
    };
}

thread_local! {
    static GPU: std::cell::RefCell<Option<Compute>> = const { std::cell::RefCell::new(None) };
}

/// One WebGPU device per page (Burn cannot initialise it twice).
async fn gpu() -> Compute {
    if let Some(c) = GPU.with(|g| g.borrow().clone()) {
        return c;
    }
    let c = init_webgpu().await.expect("WebGPU available (Chromium with --enable-unsafe-webgpu)");
    GPU.with(|g| *g.borrow_mut() = Some(c.clone()));
    c
}

async fn tiny() -> Session {
    let mut files = BTreeMap::new();
    files.insert("config.json".to_string(), fx!("tiny-llama/config.json").to_vec());
    files.insert("model.safetensors".to_string(), fx!("tiny-llama/model.safetensors").to_vec());
    files.insert("tokenizer.json".to_string(), fx!("tiny-llama/tokenizer.json").to_vec());
    Session::load(&ModelFiles::from_named(files).unwrap(), gpu().await).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn ids_of(bytes: &[u8], key: &str) -> (Vec<usize>, Vec<i64>) {
    let st = webpeft::io::safetensors::parse(bytes).unwrap();
    webpeft::io::safetensors::view_to_i64(key, &st.tensor(key).unwrap()).unwrap()
}

fn f32_of(bytes: &[u8], key: &str) -> HostTensor {
    let st = webpeft::io::safetensors::parse(bytes).unwrap();
    webpeft::io::safetensors::view_to_f32(key, &st.tensor(key).unwrap()).unwrap()
}

#[wasm_bindgen_test]
async fn device_self_check_passes() {
    self_check(&gpu().await.device).await.expect("self-check");
}

#[wasm_bindgen_test]
async fn tiny_logits_and_peft_adapter_match_pytorch() {
    let mut s = tiny().await;
    let logits_fx = fx!("tiny-logits.safetensors");
    let (_, ids) = ids_of(logits_fx, "tiny.input_ids");
    // Row 0 of the fixture batch.
    let row: Vec<u32> = ids[..12].iter().map(|&i| i as u32).collect();
    let got = s.logits(&row, &[]).await.unwrap();
    let want = f32_of(logits_fx, "tiny.logits");
    let d = max_abs_diff(&got.data, &want.data[..got.data.len()]);
    web_sys_log(&format!("browser tiny logits max |d| = {d:e}"));
    assert!(d < 1e-4, "tiny logits |d| = {d}");

    s.load_adapter("qv", std::str::from_utf8(fx!("tiny-adapters/qv/adapter_config.json")).unwrap(), fx!("tiny-adapters/qv/adapter_model.safetensors")).unwrap();
    let got = s.logits(&row, &["qv"]).await.unwrap();
    let want = f32_of(fx!("tiny-adapters/qv/expected.safetensors"), "logits");
    let d = max_abs_diff(&got.data, &want.data[..got.data.len()]);
    web_sys_log(&format!("browser peft adapter logits max |d| = {d:e}"));
    assert!(d < 1e-4, "adapter logits |d| = {d}");
}

#[wasm_bindgen_test]
async fn one_training_step_matches_pytorch() {
    one_training_step(false).await;
}

/// The same step with gradient checkpointing (activations recomputed block by block).
#[wasm_bindgen_test]
async fn one_training_step_with_gradient_checkpointing_matches_pytorch() {
    one_training_step(true).await;
}

async fn one_training_step(gradient_checkpointing: bool) {
    let mut s = tiny().await;
    s.load_adapter("qv", std::str::from_utf8(fx!("tiny-adapters/qv/adapter_config.json")).unwrap(), fx!("tiny-adapters/qv/adapter_model.safetensors")).unwrap();
    let t = fx!("tiny-train.safetensors");
    let (shape, input_ids) = ids_of(t, "input_ids");
    let batch = Batch { batch: shape[0], len: shape[1], input_ids, attention_mask: ids_of(t, "attention_mask").1, labels: ids_of(t, "labels").1, tasks: vec![] };
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, gradient_checkpointing, ..Default::default() });
    let a = s.adapters.get_mut("qv").unwrap();
    webpeft::peft::set_trainable(a, true);
    let st = tr.step(&s.model, a, std::slice::from_ref(&batch)).await.unwrap();
    let want_loss = f32_of(t, "loss_step0").data[0];
    web_sys_log(&format!("browser loss {} vs torch {want_loss} (gradient checkpointing: {gradient_checkpointing})", st.loss));
    assert!((st.loss - want_loss).abs() < 1e-5);
    webpeft::peft::set_trainable(a, false);
    let (_, bytes) = s.save_adapter("qv").await.unwrap();
    let mut worst = 0f32;
    for (k, v) in read_all_f32(&bytes).unwrap() {
        worst = worst.max(max_abs_diff(&v.data, &f32_of(t, &format!("step1.{k}")).data));
    }
    web_sys_log(&format!("browser one-step weights max |d| = {worst:e} (gradient checkpointing: {gradient_checkpointing})"));
    assert!(worst < 5e-5, "weights after one step |d| = {worst}");
}

/// One AdamW step of each PEFT method in the browser, from the fixtures' start state,
/// against PyTorch's updated tensors.
#[wasm_bindgen_test]
async fn every_method_one_step_matches_pytorch() {
    let cases: Vec<(&str, &str, &[u8], &[u8], &[u8], bool)> = vec![
        ("ia3", "IA3", fx!("tiny-adapters/ia3/adapter_config.json"), fx!("tiny-adapters/ia3/adapter_model.safetensors"), fx!("tiny-train-ia3.safetensors"), false),
        ("prompt", "PROMPT_TUNING", fx!("tiny-adapters/prompt/adapter_config.json"), fx!("tiny-adapters/prompt/adapter_model.safetensors"), fx!("tiny-train-prompt.safetensors"), false),
        ("dora", "LORA+DoRA", fx!("tiny-adapters/dora/adapter_config.json"), fx!("tiny-adapters/dora/adapter_model.safetensors"), fx!("tiny-train-dora.safetensors"), false),
        ("prefix", "PREFIX_TUNING", fx!("tiny-adapters/prefix/adapter_config.json"), fx!("tiny-adapters/prefix/adapter_model.safetensors"), fx!("tiny-train-prefix.safetensors"), false),
        ("ptuning", "P_TUNING", fx!("tiny-adapters/ptuning/adapter_config.json"), fx!("tiny-adapters/ptuning/adapter_model.safetensors"), fx!("tiny-train-ptuning.safetensors"), true),
        ("ln", "LN_TUNING", fx!("tiny-adapters/ln/adapter_config.json"), fx!("tiny-adapters/ln/adapter_model.safetensors"), fx!("tiny-train-ln.safetensors"), false),
        (
            "bottleneck_serial",
            "BOTTLENECK serial",
            fx!("tiny-adapters/bottleneck_serial/adapter_config.json"),
            fx!("tiny-adapters/bottleneck_serial/adapter_model.safetensors"),
            fx!("tiny-train-bottleneck_serial.safetensors"),
            false,
        ),
        (
            "bottleneck_parallel",
            "BOTTLENECK parallel",
            fx!("tiny-adapters/bottleneck_parallel/adapter_config.json"),
            fx!("tiny-adapters/bottleneck_parallel/adapter_model.safetensors"),
            fx!("tiny-train-bottleneck_parallel.safetensors"),
            false,
        ),
    ];
    let mut s = tiny().await;
    for (name, what, cfg, weights, train, trainable_config) in cases {
        let cfg = std::str::from_utf8(cfg).unwrap();
        if trainable_config {
            let mut v: serde_json::Value = serde_json::from_str(cfg).unwrap();
            v["inference_mode"] = false.into();
            s.add_adapter(name, &v, 0).unwrap();
        } else {
            s.load_adapter(name, cfg, weights).unwrap();
        }
        let st = webpeft::io::safetensors::parse(train).unwrap();
        let mut init = BTreeMap::new();
        let mut step1 = BTreeMap::new();
        for (k, v) in st.tensors() {
            if let Ok(t) = webpeft::io::safetensors::view_to_f32(&k, &v) {
                if let Some(x) = k.strip_prefix("init.") {
                    init.insert(x.to_string(), t);
                } else if let Some(x) = k.strip_prefix("step1.") {
                    step1.insert(x.to_string(), t);
                }
            }
        }
        let a = s.adapters.get_mut(name).unwrap();
        webpeft::peft::load_params(a, &init).unwrap();
        let (shape, input_ids) = ids_of(train, "input_ids");
        let batch = Batch { batch: shape[0], len: shape[1], input_ids, attention_mask: ids_of(train, "attention_mask").1, labels: ids_of(train, "labels").1, tasks: vec![] };
        let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
        webpeft::peft::set_trainable(a, true);
        let r = tr.step(&s.model, a, std::slice::from_ref(&batch)).await.unwrap();
        let want_loss = f32_of(train, "loss_step0").data[0];
        let mut worst = 0f32;
        for (k, t) in webpeft::peft::read_params(a).await.unwrap() {
            worst = worst.max(max_abs_diff(&t.data, &step1[&k].data));
        }
        web_sys_log(&format!("browser {what}: loss {} (torch {want_loss}), one-step max |d| = {worst:e}", r.loss));
        assert!((r.loss - want_loss).abs() < 1e-5, "{what} loss");
        assert!(worst < 5e-5, "{what} weights |d| = {worst}");
    }
}

fn web_sys_log(s: &str) {
    wasm_bindgen_test::console_log!("{s}");
}

/// The BERT encoder in the browser: a tiny random BertForSequenceClassification and a peft
/// SEQ_CLS LoRA + classifier against transformers' logits, sentence embeddings, and one
/// AdamW step of LoRA + head against PyTorch.
#[wasm_bindgen_test]
async fn tiny_bert_classifier_matches_pytorch() {
    use webpeft::task::{TaskKind, TaskSession};
    let files = || {
        let mut f = BTreeMap::new();
        f.insert("config.json".to_string(), fx!("tiny-bert/config.json").to_vec());
        f.insert("model.safetensors".to_string(), fx!("tiny-bert/model.safetensors").to_vec());
        f.insert("tokenizer.json".to_string(), fx!("tiny-bert/tokenizer.json").to_vec());
        ModelFiles::from_named(f).unwrap()
    };
    let texts = ["Free entry to win a cash prize, text WIN now!", "Are you coming to dinner tonight?", "the meeting moved to thursday"];
    let exp = fx!("tiny-bert/expected.safetensors");
    let flat = |v: Vec<Vec<f32>>| v.into_iter().flatten().collect::<Vec<f32>>();
    let mut s = TaskSession::load(&files(), gpu().await, TaskKind::Classification).unwrap();
    let d = max_abs_diff(&flat(s.logits(&texts, 64, 3).await.unwrap()), &f32_of(exp, "logits").data);
    web_sys_log(&format!("browser tiny-bert logits max |d| = {d:e}"));
    assert!(d < 1e-4, "tiny-bert logits |d| = {d}");
    let e = TaskSession::load(&files(), gpu().await, TaskKind::Embedding).unwrap();
    let d = max_abs_diff(&flat(e.embed(&texts, 64, 3).await.unwrap()), &f32_of(exp, "embeddings").data);
    web_sys_log(&format!("browser tiny-bert embeddings max |d| = {d:e}"));
    assert!(d < 1e-5, "tiny-bert embeddings |d| = {d}");
    s.load_adapter(std::str::from_utf8(fx!("tiny-bert/lora/adapter_config.json")).unwrap(), fx!("tiny-bert/lora/adapter_model.safetensors"), None).unwrap();
    let d = max_abs_diff(&flat(s.logits(&texts, 64, 3).await.unwrap()), &f32_of(exp, "lora_logits").data);
    web_sys_log(&format!("browser tiny-bert + peft SEQ_CLS LoRA logits max |d| = {d:e}"));
    assert!(d < 1e-4, "tiny-bert LoRA logits |d| = {d}");
    let hp: serde_json::Value = serde_json::from_slice(fx!("tiny-bert/train.json")).unwrap();
    let labels: Vec<usize> = hp["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let st = s.train_step(&mut tr, &texts, &labels, None, 64).await.unwrap();
    let dl = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    let after = s.trainable_tensors().await.unwrap();
    let train = fx!("tiny-bert/train.safetensors");
    let worst = after.iter().map(|(k, v)| max_abs_diff(&v.data, &f32_of(train, k).data)).fold(0f32, f32::max);
    web_sys_log(&format!("browser tiny-bert one step: loss |d| = {dl:e}, LoRA + head max |d| = {worst:e} over {} tensors", after.len()));
    assert!(dl < 1e-5 && worst < 5e-5, "loss |d| {dl}, weights |d| {worst}");
    assert_eq!(after.len(), 10);
}

/// GPT-2 (learned positions, LayerNorm, fused Conv1D c_attn) in the browser: logits and a peft
/// LoRA with fan_in_fan_out against transformers, and one AdamW step against PyTorch; the
/// decoder as a classifier (a score head on the last token) with its peft SEQ_CLS LoRA.
#[wasm_bindgen_test]
async fn tiny_gpt2_and_decoder_classifier_match_pytorch() {
    let mut files = BTreeMap::new();
    files.insert("config.json".to_string(), fx!("tiny-gpt2/config.json").to_vec());
    files.insert("model.safetensors".to_string(), fx!("tiny-gpt2/model.safetensors").to_vec());
    files.insert("tokenizer.json".to_string(), fx!("tiny-gpt2/tokenizer.json").to_vec());
    let mut s = Session::load(&ModelFiles::from_named(files).unwrap(), gpu().await).unwrap();
    let exp = fx!("tiny-gpt2/expected.safetensors");
    let (shape, ids) = ids_of(exp, "input_ids");
    let mask = ids_of(exp, "attention_mask").1;
    let v = s.model.config.vocab_size;
    let real = |x: &[f32]| -> Vec<f32> { x.chunks(v).zip(&mask).filter(|(_, m)| **m == 1).flat_map(|(c, _)| c.to_vec()).collect() };
    let logits = |s: &Session, names: &[&str]| {
        let inputs = webpeft::models::llama::Inputs { ids: webpeft::tensor::ints(ids.clone(), [shape[0], shape[1]], &s.model.device), attention_mask: Some(mask.clone()) };
        s.model.forward(&inputs, &s.stack(names).unwrap(), None).unwrap()
    };
    let got = webpeft::tensor::read(logits(&s, &[])).await.unwrap();
    let d = max_abs_diff(&real(&got.data), &real(&f32_of(exp, "logits").data));
    web_sys_log(&format!("browser tiny GPT-2 logits max |d| = {d:e}"));
    assert!(d < 1e-4, "GPT-2 logits |d| = {d}");
    s.load_adapter("lora", std::str::from_utf8(fx!("tiny-gpt2/lora/adapter_config.json")).unwrap(), fx!("tiny-gpt2/lora/adapter_model.safetensors")).unwrap();
    let got = webpeft::tensor::read(logits(&s, &["lora"])).await.unwrap();
    let d = max_abs_diff(&real(&got.data), &real(&f32_of(exp, "lora_logits").data));
    web_sys_log(&format!("browser tiny GPT-2 + peft LoRA logits max |d| = {d:e}"));
    assert!(d < 1e-4, "GPT-2 LoRA logits |d| = {d}");
    let batch = Batch { batch: shape[0], len: shape[1], input_ids: ids.clone(), attention_mask: mask.clone(), labels: ids_of(exp, "labels").1, tasks: vec![] };
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let a = s.adapters.get_mut("lora").unwrap();
    webpeft::peft::set_trainable(a, true);
    let st = tr.step(&s.model, a, std::slice::from_ref(&batch)).await.unwrap();
    webpeft::peft::set_trainable(a, false);
    let hp: serde_json::Value = serde_json::from_slice(fx!("tiny-gpt2/train.json")).unwrap();
    let dl = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    let (_, bytes) = s.save_adapter("lora").await.unwrap();
    let train = fx!("tiny-gpt2/train.safetensors");
    let worst = read_all_f32(&bytes).unwrap().iter().map(|(k, t)| max_abs_diff(&t.data, &f32_of(train, k).data)).fold(0f32, f32::max);
    web_sys_log(&format!("browser tiny GPT-2 one step: loss |d| = {dl:e}, LoRA max |d| = {worst:e}"));
    assert!(dl < 1e-5 && worst < 5e-5, "loss |d| {dl}, weights |d| {worst}");

    use webpeft::task::{TaskKind, TaskSession};
    let mut files = BTreeMap::new();
    files.insert("config.json".to_string(), fx!("tiny-llama-cls/config.json").to_vec());
    files.insert("model.safetensors".to_string(), fx!("tiny-llama-cls/model.safetensors").to_vec());
    files.insert("tokenizer.json".to_string(), fx!("tiny-llama-cls/tokenizer.json").to_vec());
    let mut c = TaskSession::load(&ModelFiles::from_named(files).unwrap(), gpu().await, TaskKind::Classification).unwrap();
    c.load_adapter(std::str::from_utf8(fx!("tiny-llama-cls/lora/adapter_config.json")).unwrap(), fx!("tiny-llama-cls/lora/adapter_model.safetensors"), None).unwrap();
    let texts = ["Free entry to win a cash prize, text WIN now!", "Are you coming to dinner tonight?", "the meeting moved to thursday"];
    let got: Vec<f32> = c.logits(&texts, 64, 3).await.unwrap().into_iter().flatten().collect();
    let d = max_abs_diff(&got, &f32_of(fx!("tiny-llama-cls/expected.safetensors"), "lora_logits").data);
    web_sys_log(&format!("browser tiny LlamaForSequenceClassification + peft SEQ_CLS LoRA logits max |d| = {d:e}"));
    assert!(d < 1e-4, "decoder classifier logits |d| = {d}");
}

/// ViT in the browser: logits of pixel values and with a peft LoRA against transformers, the
/// preprocessing of a PNG decoded in wasm, and one AdamW step of LoRA + classifier.
#[wasm_bindgen_test]
async fn tiny_vit_matches_pytorch() {
    use webpeft::task::{TaskKind, TaskSession};
    let mut s = TaskSession::load(&ModelFiles::from_named(fx_files_vit()).unwrap(), gpu().await, TaskKind::Classification).unwrap();
    let exp = fx!("tiny-vit/expected.safetensors");
    let images: Vec<Vec<f32>> = f32_of(exp, "pixel_values").data.chunks(3 * 16 * 16).map(<[f32]>::to_vec).collect();
    let flat = |v: Vec<Vec<f32>>| v.into_iter().flatten().collect::<Vec<f32>>();
    let d = max_abs_diff(&flat(s.image_logits(&images, 2).await.unwrap()), &f32_of(exp, "logits").data);
    let dp = max_abs_diff(&s.image_pixels(fx!("tiny-vit/small.png")).unwrap(), &f32_of(exp, "small_pixels").data);
    s.load_adapter(std::str::from_utf8(fx!("tiny-vit/lora/adapter_config.json")).unwrap(), fx!("tiny-vit/lora/adapter_model.safetensors"), None).unwrap();
    let dl = max_abs_diff(&flat(s.image_logits(&images, 2).await.unwrap()), &f32_of(exp, "lora_logits").data);
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let st = s.train_step_images(&mut tr, &images, &[0, 2]).await.unwrap();
    let hp: serde_json::Value = serde_json::from_slice(fx!("tiny-vit/train.json")).unwrap();
    let dloss = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    let train = fx!("tiny-vit/train.safetensors");
    let worst = s.trainable_tensors().await.unwrap().iter().map(|(k, v)| max_abs_diff(&v.data, &f32_of(train, k).data)).fold(0f32, f32::max);
    web_sys_log(&format!("browser tiny ViT: logits |d| = {d:e}, PNG preprocessing |d| = {dp:e}, + peft LoRA |d| = {dl:e}, one step loss |d| = {dloss:e}, tensors |d| = {worst:e}"));
    assert!(d < 1e-4 && dp < 1e-6 && dl < 1e-4 && dloss < 1e-5 && worst < 5e-5);
    // BitFit: every bias + the classifier, one AdamW step from the checkpoint. A key bias gets
    // no gradient (only rounding noise, which AdamW scales up): compared within 1e-3.
    let mut s = TaskSession::load(&ModelFiles::from_named(fx_files_vit()).unwrap(), gpu().await, TaskKind::Classification).unwrap();
    s.add_bitfit().unwrap();
    let mut tr = Trainer::new(TrainConfig { optim: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, ..Default::default() });
    let st = s.train_step_images(&mut tr, &images, &[0, 2]).await.unwrap();
    let hp: serde_json::Value = serde_json::from_slice(fx!("tiny-vit/bitfit/train.json")).unwrap();
    let dloss = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    let train = fx!("tiny-vit/bitfit/train.safetensors");
    let tensors = s.trainable_tensors().await.unwrap();
    let (key, other): (Vec<_>, Vec<_>) = tensors.iter().partition(|(k, _)| k.ends_with("k_proj.bias"));
    let worst = |v: &[(&String, &webpeft::io::safetensors::HostTensor)]| v.iter().map(|(k, t)| max_abs_diff(&t.data, &f32_of(train, k).data)).fold(0f32, f32::max);
    let (wk, wo) = (worst(&key), worst(&other));
    let dl = max_abs_diff(&flat(s.image_logits(&images, 2).await.unwrap()), &f32_of(fx!("tiny-vit/bitfit/expected.safetensors"), "logits").data);
    web_sys_log(&format!("browser tiny ViT BitFit: one step loss |d| = {dloss:e}, tensors |d| = {wo:e} (key biases {wk:e}), logits after it |d| = {dl:e}"));
    assert!(tensors.len() == 20 && dloss < 1e-5 && wo < 5e-5 && wk < 1e-3 && dl < 1e-4);
}

fn fx_files_vit() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert("config.json".to_string(), fx!("tiny-vit/config.json").to_vec());
    files.insert("model.safetensors".to_string(), fx!("tiny-vit/model.safetensors").to_vec());
    files.insert("preprocessor_config.json".to_string(), fx!("tiny-vit/preprocessor_config.json").to_vec());
    files
}

/// The quantized base in the browser: the matmul kernel (compiled to WGSL, on WebGPU) and its
/// input gradient against the host reference for every format, and the tiny GGUF Q4_1 model
/// kept quantized against the same model dequantized to f32 (logits, and after LoRA steps).
#[wasm_bindgen_test]
async fn quantized_base_matches_its_reference() {
    use burn::tensor::{Tensor, TensorData};
    use webpeft::models::linear::{Linear, Weight};
    use webpeft::quant::weight::QuantWeight;
    use webpeft::quant::{BaseFormat, QuantFormat, QuantHost, reference_matmul, reference_matmul_t};
    use webpeft::tensor::read;
    let c = gpu().await;
    assert!(webpeft::quant::kernel::runs_kernel(&c.device), "WebGPU runs the kernel");
    let vals = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5 - 1.0).collect() };
    let (m, n, k) = (21, 70, 96);
    for f in QuantFormat::ALL {
        let q = QuantHost::quantize(f, n, k, &vals(n * k, 1)).unwrap();
        let lin = Linear { weight: Weight::Quant(QuantWeight::upload(&q, &c.device).unwrap()), bias: None };
        let (x, g) = (vals(m * k, 2), vals(m * n, 3));
        let y = read(lin.forward(&Tensor::from_data(TensorData::new(x.clone(), [m, k]), &c.device))).await.unwrap();
        let dy = max_abs_diff(&y.data, &reference_matmul_t(&x, m, &q));
        let ad = c.device.clone().autodiff();
        let xa = Tensor::<2>::from_data(TensorData::new(x, [m, k]), &ad).require_grad();
        let grads = (lin.forward(&xa) * Tensor::from_data(TensorData::new(g.clone(), [m, n]), &ad)).sum().backward();
        let dx = read(xa.grad(&grads).unwrap()).await.unwrap();
        let dg = max_abs_diff(&dx.data, &reference_matmul(&g, m, &q));
        web_sys_log(&format!("browser {} kernel: forward |d| = {dy:e}, input gradient |d| = {dg:e}", f.name()));
        assert!(dy < 5e-5 && dg < 5e-5, "{}: forward {dy}, gradient {dg}", f.name());
    }
    // A whole model: tiny Llama as GGUF Q4_1, kept vs dequantized, before and after training.
    let files = || ModelFiles::from_named(BTreeMap::from([("tiny.gguf".to_string(), fx!("tiny-gguf/tiny-q4_1.gguf").to_vec())])).unwrap();
    let mut kept = Session::load_as(&files(), c.clone(), BaseFormat::Keep).unwrap();
    let mut f32 = Session::load_as(&files(), c.clone(), BaseFormat::F32).unwrap();
    assert!(kept.model.base_memory().bytes * 4 < f32.model.base_memory().bytes, "Q4_1 holds under a quarter of f32");
    let ids = [1, 5, 9, 14, 2, 7, 30, 11];
    let d0 = max_abs_diff(&kept.logits(&ids, &[]).await.unwrap().data, &f32.logits(&ids, &[]).await.unwrap().data);
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]});
    let ex: Vec<_> = ["Beautiful is better than ugly.", "Explicit is better than implicit."].iter().map(|t| webpeft::train::data::Example::Text(t.to_string())).collect();
    let o = webpeft::session::TrainOptions { steps: 2, batch: 2, seq_len: 16, lr: 1e-2, seed: 5, ..Default::default() };
    for s in [&mut kept, &mut f32] {
        s.add_adapter("a", &cfg, 0).unwrap();
        s.train("a", &ex, &o, |_| true).await.unwrap();
    }
    let d1 = max_abs_diff(&kept.logits(&ids, &["a"]).await.unwrap().data, &f32.logits(&ids, &["a"]).await.unwrap().data);
    web_sys_log(&format!(
        "browser tiny Q4_1 kept vs f32: logits |d| = {d0:e}, after 2 LoRA steps {d1:e}; base {} vs {} bytes",
        kept.model.base_memory().bytes,
        f32.model.base_memory().bytes
    ));
    assert!(d0 < 1e-4 && d1 < 1e-3, "kept vs f32: {d0}, after training {d1}");
}
