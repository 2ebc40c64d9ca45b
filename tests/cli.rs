#![cfg(not(target_family = "wasm"))]
//! The `webpeft` command line, end to end on the tiny model: train, save, reload, logits,
//! generate, bench, and one-line errors on bad input.

mod common;

use std::process::Command;

use common::*;
use webpeft::io::safetensors::{parse, view_to_f32};

fn webpeft(args: &[&str]) -> (bool, String, String) {
    let dev = std::env::var("WEBPEFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let out = Command::new(env!("CARGO_BIN_EXE_webpeft")).args(args).args(["--device", &dev]).output().expect("run webpeft");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The loss of each `step ... loss X ...` line `train` printed.
fn step_losses(stdout: &str) -> Vec<f32> {
    stdout.lines().filter(|l| l.starts_with("step")).filter_map(|l| l.split_whitespace().skip_while(|w| *w != "loss").nth(1)).map(|x| x.parse().unwrap()).collect()
}

#[test]
fn train_then_use_the_adapter() {
    let tmp = std::env::temp_dir().join(format!("webpeft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.txt");
    std::fs::write(&data, "Beautiful is better than ugly.\nExplicit is better than implicit.\nSimple is better than complex.\n").unwrap();
    let model = fixture("tiny-llama");
    let (m, d, out) = (model.to_str().unwrap(), data.to_str().unwrap(), tmp.join("adapter"));
    let (ok, stdout, stderr) = webpeft(&[
        "train",
        "--model",
        m,
        "--data",
        d,
        "--out",
        out.to_str().unwrap(),
        "--r",
        "4",
        "--alpha",
        "8",
        "--target",
        "all-linear",
        "--steps",
        "8",
        "--lr",
        "1e-2",
        "--batch",
        "3",
        "--seq-len",
        "32",
        "--schedule",
        "cosine",
        "--warmup",
        "1",
        "--seed",
        "1",
    ]);
    assert!(ok, "train failed: {stderr}");
    let losses = step_losses(&stdout);
    assert_eq!(losses.len(), 8, "{stdout}");
    assert!(losses[7] < losses[0] - 0.5, "loss must fall on 3 memorised lines: {losses:?}");
    assert!(out.join("adapter_config.json").exists() && out.join("adapter_model.safetensors").exists());

    // Logits with and without the adapter differ; with it, the trained text is more likely.
    let f0 = tmp.join("base.safetensors");
    let f1 = tmp.join("tuned.safetensors");
    let text = "Simple is better than complex.";
    assert!(webpeft(&["logits", "--model", m, "--text", text, "--out", f0.to_str().unwrap()]).0);
    let (ok, _, e) = webpeft(&["logits", "--model", m, "--adapter", out.to_str().unwrap(), "--text", text, "--out", f1.to_str().unwrap()]);
    assert!(ok, "{e}");
    let read = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        let st = parse(&b).unwrap();
        view_to_f32("logits", &st.tensor("logits").unwrap()).unwrap()
    };
    let (a, b) = (read(&f0), read(&f1));
    assert_eq!(a.shape, b.shape);
    assert!(max_abs_diff(&a.data, &b.data) > 0.1);
    // The same with the adapter merged into the weights.
    let f2 = tmp.join("merged.safetensors");
    let (ok, _, e) = webpeft(&["logits", "--model", m, "--adapter", out.to_str().unwrap(), "--merge", "--text", text, "--out", f2.to_str().unwrap()]);
    assert!(ok, "{e}");
    assert!(max_abs_diff(&read(&f2).data, &b.data) < 1e-4, "merged logits");

    // Continue training from the saved adapter.
    let out2 = tmp.join("adapter2");
    let (ok, stdout2, e) = webpeft(&[
        "train",
        "--model",
        m,
        "--data",
        d,
        "--out",
        out2.to_str().unwrap(),
        "--init-adapter",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--batch",
        "3",
        "--seq-len",
        "32",
    ]);
    assert!(ok, "{e}");
    let first = step_losses(&stdout2)[0];
    assert!(first < losses[0] - 0.5, "resumed training starts from the trained adapter: {first} vs {}", losses[0]);

    let (ok, text_out, e) = webpeft(&["generate", "--model", m, "--adapter", out.to_str().unwrap(), "--prompt", "Simple is", "--max-new-tokens", "6"]);
    assert!(ok, "{e}");
    assert!(!text_out.trim().is_empty());

    let (ok, json, e) = webpeft(&["bench", "--model", m, "--batch", "2", "--seq-len", "16", "--steps", "2", "--gen-tokens", "4"]);
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for k in ["train_tokens_per_s", "train_ms_per_step", "forward_tokens_per_s", "generate_tokens_per_s"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {json}");
    }
    assert!(v["profile"].is_null(), "no profile unless asked");
    if std::env::var("WEBPEFT_MATMUL").is_err() {
        assert_eq!(v["matmul"], "burn", "Burn's matmul natively unless asked");
    }
    // --profile: one more step, its kernels by name on the device; refused on the CPU backend.
    let (ok, json, e) = webpeft(&["bench", "--model", m, "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", "2", "--profile"]);
    if v["device"].as_str().unwrap().starts_with("cpu") {
        assert!(!ok && e.contains("--profile times GPU kernels"), "{e}");
    } else {
        assert!(ok, "{e}");
        let p = &serde_json::from_str::<serde_json::Value>(&json).unwrap()["profile"];
        let kernels = p["kernels"].as_array().unwrap();
        assert!(p["launches"].as_u64().unwrap() > 0 && p["launches"].as_u64() == Some(kernels.iter().map(|k| k["launches"].as_u64().unwrap()).sum()), "{p}");
        assert!(kernels.iter().any(|k| k["kernel"].as_str().unwrap().starts_with("MatmulEntry")), "{p}");
        assert!(e.contains("one training step, by kernel:") && e.contains("| kernel | launches | ms | share |"), "{e}");
        // --matmul ours: the products run through our f32 kernel.
        let (ok, json, e) = webpeft(&["bench", "--model", m, "--batch", "2", "--seq-len", "16", "--steps", "1", "--gen-tokens", "2", "--profile", "--matmul", "ours"]);
        assert!(ok, "{e}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["matmul"], "ours");
        assert!(v["profile"]["kernels"].as_array().unwrap().iter().any(|k| k["kernel"].as_str().unwrap().starts_with("MatmulKernel")), "{}", v["profile"]);
        assert!(v["train_tokens_per_s"].as_f64().unwrap() > 0.0, "{json}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn bad_input_exits_with_one_line() {
    let m = fixture("tiny-llama");
    let m = m.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["logits", "--model", "/nonexistent/model", "--text", "x", "--out", "/tmp/x.st"],
        vec!["train", "--model", m, "--data", "/nonexistent.txt", "--out", "/tmp/webpeft-x"],
        vec!["train", "--model", m, "--data", "Cargo.toml", "--out", "/tmp/webpeft-x", "--target", "nope_proj"],
        vec!["train", "--model", m, "--data", "Cargo.toml", "--out", "/tmp/webpeft-x", "--method", "bogus"],
        vec!["train", "--model", m, "--data", "Cargo.toml", "--out", "/tmp/webpeft-x", "--schedule", "weird"],
        vec!["generate", "--model", m, "--adapter", "/nonexistent", "--prompt", "x"],
        // BitFit on a model without biases.
        vec!["train", "--model", m, "--data", "Cargo.toml", "--out", "/tmp/webpeft-x", "--method", "bitfit"],
    ];
    for c in cases {
        let (ok, _, stderr) = webpeft(&c);
        assert!(!ok, "{c:?} should fail");
        let last = stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("webpeft: "), "{c:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{c:?}: {stderr}");
    }
    // Settings a task session cannot honour are refused, not ignored.
    let bert = fixture("tiny-bert");
    let bert = bert.to_str().unwrap();
    for (flag, value) in [("--attention", "fused"), ("--base", "f16")] {
        let (ok, _, stderr) = webpeft(&["embed", "--model", bert, "--text", "x", flag, value]);
        assert!(!ok, "{flag} {value} should fail");
        let last = stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("webpeft: ") && last.contains(flag), "{flag}: {stderr}");
    }
}

#[test]
fn every_method_trains_saves_and_reloads() {
    let tmp = std::env::temp_dir().join(format!("webpeft-methods-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.txt");
    std::fs::write(&data, "Beautiful is better than ugly.\nExplicit is better than implicit.\nSimple is better than complex.\n").unwrap();
    let model = fixture("tiny-llama");
    let m = model.to_str().unwrap();
    let methods: Vec<(&str, Vec<&str>)> = vec![
        ("lora", vec!["--r", "4", "--target", "all-linear"]),
        ("dora", vec!["--r", "4", "--target", "q_proj,v_proj"]),
        ("ia3", vec![]),
        ("prompt-tuning", vec!["--num-virtual-tokens", "4"]),
        ("p-tuning", vec!["--num-virtual-tokens", "4", "--encoder-hidden-size", "16"]),
        ("prefix-tuning", vec!["--num-virtual-tokens", "4"]),
        ("prefix-tuning", vec!["--num-virtual-tokens", "4", "--prefix-projection", "--encoder-hidden-size", "16"]),
        ("ln-tuning", vec![]),
        ("adapter", vec!["--reduction-factor", "8"]),
        ("parallel-adapter", vec!["--reduction-factor", "8", "--adapter-scaling", "2"]),
        ("full", vec![]),
        ("selective", vec!["--parameters", r".*norm.*|.*\.1\.mlp\.down_proj\.weight"]),
        // Hybrid: prefix tuning + LoRA trained together (MAM-style), saved as two adapters.
        ("prefix-tuning", vec!["--method", "lora", "--num-virtual-tokens", "4", "--r", "4"]),
    ];
    for (method, extra) in methods {
        let out = tmp.join(format!("{method}-{}", extra.len()));
        let mut args = vec!["train", "--model", m, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--method", method];
        args.extend(extra.iter().copied());
        args.extend(["--steps", "10", "--lr", "3e-2", "--batch", "3", "--seq-len", "32"]);
        let (ok, stdout, stderr) = webpeft(&args);
        assert!(ok, "{method}: {stderr}");
        let losses = step_losses(&stdout);
        eprintln!("{method} {extra:?}: losses {losses:?}");
        assert!(losses[9] < losses[0] - 0.2, "{method}: loss must fall: {losses:?}");
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert!(cfg["peft_type"].is_string());
        if extra.contains(&"--method") {
            assert!(out.join("lora/adapter_config.json").exists(), "the second method is saved in a subfolder");
        }
        let f = tmp.join("l.safetensors");
        let (ok, _, e) = webpeft(&["logits", "--model", m, "--adapter", out.to_str().unwrap(), "--text", "Simple is better", "--out", f.to_str().unwrap()]);
        assert!(ok, "{method} reload: {e}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn bitfit_trains_the_biases_of_a_model_that_has_them() {
    let tmp = std::env::temp_dir().join(format!("webpeft-bitfit-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.txt");
    std::fs::write(&data, "Beautiful is better than ugly.\nExplicit is better than implicit.\n").unwrap();
    let model = fixture("tiny-llama-bias");
    let out = tmp.join("bitfit");
    let (ok, stdout, e) = webpeft(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "bitfit",
        "--steps",
        "8",
        "--lr",
        "5e-2",
        "--batch",
        "2",
        "--seq-len",
        "32",
    ]);
    assert!(ok, "{e}");
    let losses = step_losses(&stdout);
    assert!(losses[7] < losses[0] - 0.2, "{losses:?}");
    let saved = webpeft::io::safetensors::read_all_f32(&std::fs::read(out.join("adapter_model.safetensors")).unwrap()).unwrap();
    assert!(!saved.is_empty() && saved.keys().all(|k| k.ends_with(".bias")), "{:?}", saved.keys().collect::<Vec<_>>());
    std::fs::remove_dir_all(&tmp).ok();
}

fn logits_file(p: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(p).unwrap();
    let st = parse(&bytes).unwrap();
    view_to_f32("logits", &st.tensor("logits").unwrap()).unwrap().data
}

#[test]
fn combine_and_export_merged() {
    let tmp = std::env::temp_dir().join(format!("webpeft-cli-combine-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let model = fixture("tiny-llama");
    let m = model.to_str().unwrap();
    let (x, y) = (fixture("tiny-combine/x"), fixture("tiny-combine/y"));
    let out = tmp.join("cat");
    let (ok, _, stderr) = webpeft(&[
        "combine",
        "--model",
        m,
        "--adapter",
        x.to_str().unwrap(),
        "--adapter",
        y.to_str().unwrap(),
        "--weights",
        "0.7,-0.4",
        "--combination",
        "cat",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "combine failed: {stderr}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(8.0)));
    // Its logits (through `logits --adapter`) are peft's, and merged + exported they stay so.
    let text = "Beautiful is better than ugly.";
    let (with, merged) = (tmp.join("with.safetensors"), tmp.join("merged.safetensors"));
    let (ok, _, stderr) = webpeft(&["logits", "--model", m, "--adapter", out.to_str().unwrap(), "--text", text, "--out", with.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let folder = tmp.join("exported");
    let (ok, _, stderr) = webpeft(&["export", "--model", m, "--adapter", out.to_str().unwrap(), "--out", folder.to_str().unwrap()]);
    assert!(ok, "export failed: {stderr}");
    let (ok, _, stderr) = webpeft(&["logits", "--model", folder.to_str().unwrap(), "--text", text, "--out", merged.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_close("exported merged model vs model + combined adapter", &logits_file(&merged), &logits_file(&with), 1e-4);
    let (ok, _, stderr) = webpeft(&["combine", "--model", m, "--adapter", x.to_str().unwrap(), "--weights", "1,2", "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("1 adapters but 2 weights"), "{stderr}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn multitask_training_writes_one_adapter_per_task() {
    let tmp = std::env::temp_dir().join(format!("webpeft-cli-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (a, b) = (tmp.join("zen.txt"), tmp.join("qa.jsonl"));
    std::fs::write(&a, "Beautiful is better than ugly.\nExplicit is better than implicit.\n").unwrap();
    std::fs::write(&b, "{\"prompt\": \"Is it spam?\", \"completion\": \" yes\"}\n{\"prompt\": \"Is it ham?\", \"completion\": \" no\"}\n").unwrap();
    let model = fixture("tiny-llama");
    let out = tmp.join("out");
    let (zen, qa) = (format!("zen={}", a.display()), format!("qa={}", b.display()));
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--task",
        &zen,
        "--task",
        &qa,
        "--steps",
        "5",
        "--batch",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--r",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = webpeft(&args);
    assert!(ok, "multi-task train failed: {stderr}");
    // Each step line carries both tasks' losses; both fall.
    let task_loss = |line: &str, name: &str| -> f32 { line.split(&format!("{name} ")).nth(1).unwrap().split([',', ']']).next().unwrap().parse().unwrap() };
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).collect();
    assert_eq!(steps.len(), 5);
    for name in ["zen", "qa"] {
        assert!(task_loss(steps[4], name) < task_loss(steps[0], name) - 0.5, "{name}: {stdout}");
    }
    for name in ["zen", "qa"] {
        assert!(out.join(name).join("adapter_model.safetensors").is_file(), "{name} written");
    }
    let (ok, _, stderr) = webpeft(&["train", "--model", model.to_str().unwrap(), "--task", "nodata", "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("NAME=DATA"), "{stderr}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// `webpeft train` on the tiny Llama fixture into a scratch folder: `base` arguments, then
/// each call's own (`--lr 1e-2` unless it sets one); gives (ok, stdout, stderr, out folder).
struct TinyTrain {
    tmp: std::path::PathBuf,
    data: std::path::PathBuf,
    base: &'static [&'static str],
}

impl TinyTrain {
    fn new(name: &str, file: &str, text: &str, base: &'static [&'static str]) -> Self {
        let tmp = std::env::temp_dir().join(format!("webpeft-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let data = tmp.join(file);
        std::fs::write(&data, text).unwrap();
        Self { tmp, data, base }
    }

    fn run(&self, out: &str, extra: &[&str]) -> (bool, String, String, std::path::PathBuf) {
        let (model, out) = (fixture("tiny-llama"), self.tmp.join(out));
        let mut args = vec!["train", "--model", model.to_str().unwrap(), "--data", self.data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(self.base);
        args.extend(extra);
        if !extra.contains(&"--lr") {
            args.extend(["--lr", "1e-2"]);
        }
        let (ok, stdout, stderr) = webpeft(&args);
        (ok, stdout, stderr, out)
    }
}

/// The adapter weights a run wrote, as bytes.
fn weights(out: &std::path::Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn checkpoints_and_resume() {
    let t = TinyTrain::new(
        "ckpt",
        "data.csv",
        "id,text\n1,\"Beautiful is better than ugly, said the zen.\"\n2,Explicit is better than implicit.\n3,Simple is better than complex.\n",
        &["--r", "4", "--steps", "4", "--batch", "2", "--seq-len", "32", "--dropout", "0.1", "--seed", "4"],
    );
    let train = |out: &str, extra: &[&str]| t.run(out, extra);
    let (ok, _, stderr, plain) = train("plain", &[]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr, kept) = train("kept", &["--checkpoint-every", "2"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("checkpoint at step 2") && stderr.contains("checkpoint at step 4"), "{stderr}");
    assert_eq!(weights(&plain), weights(&kept), "checkpointing does not change the run");
    let (ok, stdout, stderr, _) = train("kept", &["--resume"]);
    assert!(ok && stderr.contains("resuming from") && step_losses(&stdout).is_empty(), "{stderr}");
    assert_eq!(weights(&plain), weights(&kept), "resumed after the last step: the same adapter");
    let (ok, _, stderr, _) = train("kept", &["--resume", "--lr", "2e-2"]);
    assert!(!ok && stderr.contains("other settings (lr)"), "{stderr}");
    let t = kept.join("checkpoint/tensors.safetensors");
    let mut b = std::fs::read(&t).unwrap();
    b[100] ^= 0x40;
    std::fs::write(&t, b).unwrap();
    let (ok, _, stderr, _) = train("kept", &["--resume"]);
    assert!(!ok && stderr.contains("SHA-256") && stderr.lines().count() == 1, "{stderr}");
}

/// `--gradient-checkpointing on` recomputes activations (the plan says so) and trains as the
/// plain run does; auto leaves it off when the batch fits.
#[test]
fn gradient_checkpointing_trains_as_the_plain_run() {
    let t = TinyTrain::new(
        "gc",
        "data.txt",
        "Beautiful is better than ugly.\nExplicit is better than implicit.\nSimple is better than complex.\n",
        &["--r", "4", "--steps", "3", "--batch", "3", "--seq-len", "32", "--seed", "2"],
    );
    let (ok, plain, stderr, _) = t.run("auto", &[]);
    assert!(ok && !stderr.contains("gradient checkpointing"), "{stderr}");
    let (ok, recomputed, stderr, _) = t.run("on", &["--gradient-checkpointing", "on"]);
    assert!(ok && stderr.contains("; gradient checkpointing"), "{stderr}");
    let (a, b) = (step_losses(&plain), step_losses(&recomputed));
    assert_eq!(a.len(), 3);
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    eprintln!("step losses {a:?} vs {b:?}: max |d| = {d:e}");
    assert!(d < 1e-4, "{a:?} vs {b:?}");
}

/// A GPU device lost mid-run (destroyed after step 4, as a driver reset would): the run takes
/// a new device, reloads the model, resumes from its step-3 checkpoint and ends with the
/// uninterrupted run's adapter, byte for byte. Without a checkpoint it stops with an error
/// saying how to survive it; the CPU backend cannot lose its device and says so.
#[test]
fn a_lost_gpu_device_is_replaced_and_the_run_resumes() {
    let t = TinyTrain::new(
        "lost",
        "data.txt",
        "Beautiful is better than ugly.\nExplicit is better than implicit.\nSimple is better than complex.\n",
        &["--r", "4", "--steps", "6", "--batch", "2", "--seq-len", "32", "--seed", "5"],
    );
    let train = |out: &str, extra: &[&str]| t.run(out, extra);
    let on_gpu = std::env::var("WEBPEFT_TEST_DEVICE").is_ok_and(|d| d == "gpu");
    if !on_gpu {
        let (ok, _, stderr, _) = train("cpu", &["--checkpoint-every", "3", "--simulate-device-loss", "4"]);
        assert!(!ok && stderr.contains("the CPU backend cannot lose its device"), "{stderr}");
        return;
    }
    let (ok, _, stderr, plain) = train("plain", &[]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr, lost) = train("lost", &["--checkpoint-every", "3", "--simulate-device-loss", "4"]);
    assert!(ok, "{stderr}");
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "4", "5", "6"], "{stdout}");
    assert!(stderr.contains("warning: the GPU device was lost") && stderr.contains("resuming from the checkpoint at step 3"), "{stderr}");
    assert_eq!(weights(&plain), weights(&lost), "the recovered run ends with the uninterrupted run's adapter");
    let (ok, _, stderr, _) = train("unkept", &["--simulate-device-loss", "2"]);
    let last = stderr.lines().last().unwrap_or("");
    assert!(!ok && last.contains("no checkpoint of this run to resume from (train with --checkpoint-every N") && last.contains("the GPU device was lost"), "{stderr}");
}

#[test]
fn classify_predict_and_embed_on_an_encoder() {
    let tmp = std::env::temp_dir().join(format!("webpeft-cli-cls-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.csv");
    let mut rows = String::from("text,label\n");
    for i in 0..12 {
        rows += &format!("\"free cash prize, text win now {i}\",spam\nare you coming to dinner tonight {i},ham\nthe meeting moved to thursday {i},work\n");
    }
    std::fs::write(&data, rows).unwrap();
    let model = fixture("tiny-bert");
    let (m, d, out, report) = (model.to_str().unwrap(), data.to_str().unwrap(), tmp.join("cls"), tmp.join("report.json"));
    let (ok, _, stderr) = webpeft(&[
        "classify",
        "--model",
        m,
        "--data",
        d,
        "--out",
        out.to_str().unwrap(),
        "--r",
        "4",
        "--epochs",
        "4",
        "--batch",
        "6",
        "--lr",
        "3e-2",
        "--val-split",
        "0.25",
        "--seq-len",
        "32",
        "--patience",
        "2",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "classify failed: {stderr}");
    assert!(stderr.contains("epoch 1 step 5 train_loss") && stderr.contains("confusion"), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["labels"], serde_json::json!(["ham", "work", "spam"]), "the checkpoint's head and its id2label are kept");
    assert_eq!((r["train_examples"].as_u64(), r["val_examples"].as_u64()), (Some(27), Some(9)), "3 of each class held out");
    let losses: Vec<f64> = r["epochs"].as_array().unwrap().iter().map(|e| e["val"]["loss"].as_f64().unwrap()).collect();
    assert!(losses.last() < losses.first(), "validation loss falls: {losses:?}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "webpeft_head.json"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["task_type"].as_str(), cfg["modules_to_save"].clone()), (Some("SEQ_CLS"), serde_json::json!(["classifier"])));
    // predict: one JSON line per row, the labels by name, the metrics on stderr.
    let (ok, stdout, stderr) = webpeft(&["predict", "--model", m, "--adapter", out.to_str().unwrap(), "--data", d]);
    assert!(ok, "predict failed: {stderr}");
    let preds: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), 36);
    let sum: f64 = preds[0]["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-9);
    let acc: f64 = serde_json::from_str::<serde_json::Value>(stderr.lines().last().unwrap()).unwrap()["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "the three easy classes are learnt: {acc}");
    // embed: unit vectors of the hidden size.
    let (ok, stdout, stderr) = webpeft(&["embed", "--model", m, "--text", "hello world", "--text", "free cash"]);
    assert!(ok, "embed failed: {stderr}");
    let e: Vec<Vec<f64>> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((e.len(), e[0].len()), (2, 32));
    assert!((e[0].iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-5);
    // embed-train: a FEATURE_EXTRACTION LoRA from pairs, then used by embed.
    let pairs = tmp.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"anchor\": \"free cash\", \"positive\": \"win a prize\"}\n{\"anchor\": \"dinner\", \"positive\": \"are you coming tonight\"}\n{\"anchor\": \"meeting\", \"positive\": \"moved to thursday\"}\n").unwrap();
    let emb = tmp.join("emb");
    let (ok, _, stderr) =
        webpeft(&["embed-train", "--model", m, "--data", pairs.to_str().unwrap(), "--out", emb.to_str().unwrap(), "--r", "4", "--epochs", "3", "--batch", "3", "--lr", "1e-2"]);
    assert!(ok && stderr.contains("step 3 loss"), "embed-train failed: {stderr}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(emb.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "FEATURE_EXTRACTION");
    let (ok, tuned, stderr) = webpeft(&["embed", "--model", m, "--adapter", emb.to_str().unwrap(), "--text", "hello world", "--text", "free cash"]);
    assert!(ok, "embed with the adapter failed: {stderr}");
    assert_ne!(tuned, stdout, "the adapter changes the embeddings");
    // Bad input: one line naming the problem.
    std::fs::write(&data, "text,label\nonly one class,ham\n").unwrap();
    let (ok, _, stderr) = webpeft(&["classify", "--model", m, "--data", d, "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("at least two labels"), "{stderr}");
    let (ok, _, stderr) = webpeft(&["embed", "--model", fixture("tiny-llama").to_str().unwrap(), "--text", "x"]);
    assert!(!ok && stderr.contains("need an encoder"), "{stderr}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn train_holds_out_a_validation_share_and_reports_its_loss() {
    let tmp = std::env::temp_dir().join(format!("webpeft-cli-val-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("data.jsonl");
    let lines: Vec<String> = (0..8).map(|i| format!("{{\"prompt\": \"Q{i}:\", \"completion\": \" answer number {i}\"}}")).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let m = fixture("tiny-llama");
    let out = tmp.join("a");
    let args = ["train", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", "4", "--lr", "1e-2", "--batch", "2", "--seq-len", "16"];
    let (ok, stdout, stderr) = webpeft(&[&args[..], &["--val-split", "0.25", "--eval-every", "2"]].concat());
    assert!(ok, "{stderr}");
    assert!(stderr.contains("training on 6 examples, 2 held out"), "{stderr}");
    let evals: Vec<(usize, f64)> = stdout
        .lines()
        .filter(|l| l.starts_with("eval"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[1].parse().unwrap(), w[3].parse().unwrap())
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4], "{stdout}");
    assert!(evals.iter().all(|e| e.1.is_finite() && e.1 > 0.0), "{stdout}");
    let (ok, _, stderr) = webpeft(&[&args[..], &["--val-split", "1.5"]].concat());
    assert!(!ok && stderr.contains("validation share"), "{stderr}");
}
