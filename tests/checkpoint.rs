#![cfg(not(target_family = "wasm"))]
//! Checkpoints: a run resumed from a checkpoint ends with the adapter the uninterrupted run
//! gives, byte for byte; checkpoint folders are switched atomically, and a damaged or
//! half-written one is detected (size, SHA-256) and the previous one used.
//! One training test per binary: Burn's device RNG (dropout) is shared by the process.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use webpeft::ErrorCode;
use webpeft::io::safetensors::HostTensor;
use webpeft::session::TrainOptions;
use webpeft::tensor::block_on;
use webpeft::train::Schedule;
use webpeft::train::checkpoint::{Checkpoint, load_dir, save_dir};
use webpeft::train::privacy::DpConfig;
use webpeft::train::scaler::LossScaler;

/// Train adapter "a" (LoRA with dropout) under `o`; returns its saved weights and the
/// checkpoints handed out.
fn run(o: &TrainOptions) -> (Vec<u8>, Vec<Checkpoint>) {
    let mut s = tiny();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]});
    s.add_adapter("a", &cfg, 3).unwrap();
    let mut kept = Vec::new();
    block_on(s.train("a", &zen_examples(), o, |r| {
        kept.extend(r.checkpoint.clone());
        true
    }))
    .unwrap();
    (block_on(s.save_adapter("a")).unwrap().1, kept)
}

#[test]
fn resumed_runs_end_byte_identical() {
    let dp = DpConfig { max_grad_norm: 0.5, noise_multiplier: Some(1.0), delta: 1e-5, target_epsilon: None, poisson: true };
    let base = TrainOptions { steps: 6, batch: 2, grad_accum: 2, seq_len: 32, lr: 1e-2, warmup: 2, schedule: Schedule::Cosine, seed: 5, checkpoint_every: 2, ..Default::default() };
    for (what, o) in [("AdamW + cosine + dropout + grad-accum", base.clone()), ("DP-SGD with Poisson sampling", TrainOptions { dp: Some(dp), ..base.clone() })] {
        let (whole, kept) = run(&o);
        assert_eq!(kept.iter().map(|c| c.iteration).collect::<Vec<_>>(), [2, 4, 6], "{what}: checkpoints every 2 steps and after the last");
        for c in &kept[..2] {
            // Through the files and back, as a reload after a crash would.
            let files: BTreeMap<String, Vec<u8>> = c.to_files().unwrap().into_iter().collect();
            let c = Checkpoint::from_files(&files).unwrap();
            let (resumed, _) = run(&TrainOptions { resume: Some(c.clone()), ..o.clone() });
            assert!(resumed == whole, "{what}: resumed at step {} differs from the uninterrupted run", c.iteration);
            eprintln!("{what}: resumed at step {} of 6: byte-identical adapter ({} bytes)", c.iteration, whole.len());
        }
        // Control: the same checkpoint without AdamW's moments ends elsewhere.
        let mut no_moments = kept[0].clone();
        no_moments.moments.iter_mut().for_each(|m| *m = None);
        assert!(run(&TrainOptions { resume: Some(no_moments), ..o.clone() }).0 != whole, "{what}: the optimizer state matters");
        let other = TrainOptions { lr: 2e-2, resume: Some(kept[0].clone()), ..o.clone() };
        let mut s = tiny();
        s.add_adapter("a", &serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}), 3).unwrap();
        let e = block_on(s.train("a", &zen_examples(), &other, |_| true)).unwrap_err();
        assert!(e.code == ErrorCode::Config && e.message.contains("lr"), "{e}");
        let mut other_data = zen_examples();
        other_data[0] = webpeft::train::data::Example::Text("Ugly is better than beautiful.".into());
        let e = block_on(s.train("a", &other_data, &TrainOptions { resume: Some(kept[0].clone()), ..o.clone() }, |_| true)).unwrap_err();
        assert!(e.code == ErrorCode::Config && e.message.contains("data_sha256"), "{e}");
    }
}

/// A small checkpoint made by hand (no training: see the module note).
fn sample(iteration: usize) -> Checkpoint {
    let t = |v: f32| HostTensor::new(vec![2, 3], vec![v; 6]);
    Checkpoint {
        iteration,
        opt_step: iteration,
        nonfinite: 0,
        loss_scale: (iteration % 2 == 1).then_some(LossScaler { scale: 2048.0, good_steps: iteration }),
        params: vec![("w".into(), t(iteration as f32))],
        moments: vec![Some((t(0.5), t(0.25)))],
        fingerprint: serde_json::json!({"seed": 1}),
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("webpeft-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("checkpoint")
}

fn sibling(dir: &Path, ext: &str) -> PathBuf {
    dir.with_file_name(format!("checkpoint.{ext}"))
}

#[test]
fn folders_switch_atomically_and_damage_is_detected() {
    let dir = tmp("atomic");
    assert!(load_dir(&dir).unwrap().is_none(), "no checkpoint yet");
    save_dir(&dir, &sample(1)).unwrap();
    save_dir(&dir, &sample(2)).unwrap();
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 2);
    assert!(!sibling(&dir, "old").exists() && !sibling(&dir, "new").exists(), "no leftovers after a clean save");

    // A crash while writing the new one: a half-written .new is ignored, then replaced.
    std::fs::create_dir_all(sibling(&dir, "new")).unwrap();
    std::fs::write(sibling(&dir, "new").join("tensors.safetensors"), b"half").unwrap();
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 2);
    save_dir(&dir, &sample(3)).unwrap();
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 3);
    assert_eq!(load_dir(&dir).unwrap().unwrap().loss_scale, Some(LossScaler { scale: 2048.0, good_steps: 3 }), "the loss scaler is kept");

    // A crash between the two renames: only .old is there.
    std::fs::rename(&dir, sibling(&dir, "old")).unwrap();
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 3, "the previous checkpoint is used");
    save_dir(&dir, &sample(4)).unwrap();
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 4);

    // Damage: one flipped byte, then a truncation; with .old present it is used instead.
    let tensors = dir.join("tensors.safetensors");
    let good = std::fs::read(&tensors).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    std::fs::write(&tensors, &bad).unwrap();
    let e = load_dir(&dir).unwrap_err();
    assert!(e.code == ErrorCode::Format && e.message.contains("SHA-256"), "{e}");
    std::fs::write(&tensors, &good[..good.len() - 10]).unwrap();
    let e = load_dir(&dir).unwrap_err();
    assert!(e.message.contains("truncated"), "{e}");
    let old = sibling(&dir, "old");
    std::fs::create_dir_all(&old).unwrap();
    for (name, bytes) in sample(3).to_files().unwrap() {
        std::fs::write(old.join(name), bytes).unwrap();
    }
    assert_eq!(load_dir(&dir).unwrap().unwrap().iteration, 3, "damaged newest: the previous one");
    std::fs::remove_file(dir.join("state.json")).unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    let e = load_dir(&dir).unwrap_err();
    assert!(e.code == ErrorCode::Io && e.message.contains("state.json"), "{e}");
}
