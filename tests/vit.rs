#![cfg(not(target_family = "wasm"))]
//! ViT image classification against transformers + peft (fixtures from
//! scripts/fixtures/make_family_fixtures.py, tiny-vit/): the forward pass on pixel values,
//! ViTImageProcessor's preprocessing, a peft LoRA (q_proj, v_proj) + classifier, one AdamW
//! step of it, and an image classifier trained on images.

mod common;

use common::*;
use webpeft::peft::lora::LoraConfig;
use webpeft::task::{Backbone, ClassifyOptions, LabeledImage, TaskKind, TaskSession};
use webpeft::tensor::block_on;

fn vit() -> TaskSession {
    task_session("tiny-vit", TaskKind::Classification)
}

/// The fixture's two images of random pixel values, [C, H, W] each.
fn pixel_images() -> Vec<Vec<f32>> {
    let fx = load("tiny-vit/expected.safetensors");
    fx.f32["pixel_values"].data.chunks(3 * 16 * 16).map(<[f32]>::to_vec).collect()
}

#[test]
fn tiny_vit_matches_transformers() {
    let fx = load("tiny-vit/expected.safetensors");
    let s = vit();
    assert!(matches!(s.model, Backbone::Vit(_)));
    assert_eq!(s.labels, ["cat", "dog", "bird"]);
    assert_close("tiny ViTForImageClassification logits", &flat(block_on(s.image_logits(&pixel_images(), 2)).unwrap()), &fx.f32["logits"].data, 1e-4);
    // ViTImageProcessor: an image of the model's size (rescale + normalise) is exact ...
    let small = s.image_pixels(&std::fs::read(fixture("tiny-vit/small.png")).unwrap()).unwrap();
    assert_close("preprocessing of a 16x16 PNG", &small, &fx.f32["small_pixels"].data, 1e-6);
    // ... and a resized one (bilinear, PIL vs the image crate) within one intensity level.
    let big = s.image_pixels(&std::fs::read(fixture("tiny-vit/big.png")).unwrap()).unwrap();
    let d = max_abs_diff(&big, &fx.f32["big_pixels"].data);
    eprintln!("24x20 -> 16x16 bilinear resize vs PIL: max |d| = {d:.3e} in normalised units (2/255 = {:.3e})", 2.0 / 255.0);
    assert!(d <= 2.0 / 255.0 + 1e-6, "resize differs from PIL's by more than one intensity level: {d}");
    // A file that is no image, text into an image model, and a wrong image size, are refused.
    let e = s.image_pixels(b"not an image").unwrap_err();
    assert_eq!(e.code, webpeft::ErrorCode::Format, "{e}");
    assert!(s.encode(&["hello"], 8).is_err());
    assert!(block_on(s.image_logits(&[vec![0.0; 10]], 1)).unwrap_err().to_string().contains("3x16x16"));
}

#[test]
fn peft_lora_on_vit_loads_and_one_step_matches_torch() {
    let fx = load("tiny-vit/expected.safetensors");
    let mut s = vit();
    load_task_adapter(&mut s, "tiny-vit/lora");
    assert_close("tiny ViT + peft LoRA (q_proj, v_proj) + classifier", &flat(block_on(s.image_logits(&pixel_images(), 2)).unwrap()), &fx.f32["lora_logits"].data, 1e-4);
    let hp = json("tiny-vit/train.json");
    let before = block_on(s.trainable_tensors()).unwrap();
    let st = block_on(s.train_step_images(&mut trainer_from(&hp), &pixel_images(), &label_ids(&hp))).unwrap();
    assert_loss("ViT LoRA", st.loss, &hp, "loss");
    // peft's names: vit.layers.N.attention.q_proj, classifier.
    assert_step(&before, &block_on(s.trainable_tensors()).unwrap(), &load("tiny-vit/train.safetensors"));
}

#[test]
fn bitfit_on_vit_matches_torch() {
    // Every bias: patch embedding, q/k/v/o, fc1/fc2, the LayerNorms; and the classifier.
    let hp = json("tiny-vit/bitfit/train.json");
    let mut s = vit();
    s.add_bitfit().unwrap();
    let before = block_on(s.trainable_tensors()).unwrap();
    let st = block_on(s.train_step_images(&mut trainer_from(&hp), &pixel_images(), &label_ids(&hp))).unwrap();
    assert_loss("ViT BitFit", st.loss, &hp, "loss");
    assert_step_moving(&before, &block_on(s.trainable_tensors()).unwrap(), &load("tiny-vit/bitfit/train.safetensors"), not_key_bias);
    let want = load("tiny-vit/bitfit/expected.safetensors");
    assert_close("tiny ViT after one BitFit step", &flat(block_on(s.image_logits(&pixel_images(), 2)).unwrap()), &want.f32["logits"].data, 1e-4);
    let mut other = vit();
    load_task_adapter(&mut other, "tiny-vit/bitfit");
    assert_close("tiny ViT + torch's BitFit tensors", &flat(block_on(other.image_logits(&pixel_images(), 2)).unwrap()), &want.f32["logits"].data, 1e-4);
}

#[test]
fn vit_image_classifier_trains_saves_and_reloads() {
    // Three classes of 16x16 images: bright red, green or blue squares on noise.
    let mut rng: u64 = 7;
    let mut next = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as u8
    };
    let mut s = vit();
    let mut data = Vec::new();
    for i in 0..24 {
        let class = i % 3;
        let mut rgb: Vec<u8> = (0..16 * 16 * 3).map(|_| next() / 2).collect();
        for y in 4..12 {
            for x in 4..12 {
                rgb[(y * 16 + x) * 3 + class] = 255;
            }
        }
        let mut png = Vec::new();
        image::RgbImage::from_raw(16, 16, rgb).unwrap().write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        data.push(LabeledImage { pixels: s.image_pixels(&png).unwrap(), label: ["red", "green", "blue"][class].to_string() });
    }
    s.add_lora(LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})).unwrap(), 0).unwrap();
    let o = ClassifyOptions { epochs: 20, batch: 6, lr: 3e-2, val_fraction: 0.25, ..Default::default() };
    let rep = block_on(s.train_image_classifier(&data, &o, |e| {
        eprintln!("epoch {}: train loss {:.4}, val {:?}", e.epoch, e.train_loss, e.val.as_ref().map(|m| (m.loss, m.accuracy)));
        true
    }))
    .unwrap();
    assert_eq!(rep.labels, ["blue", "green", "red"]);
    let (first, last) = (rep.epochs[0].train_loss, rep.epochs.last().unwrap().train_loss);
    assert!(last < first * 0.5, "{first} -> {last}");
    assert!(rep.val_uncalibrated.as_ref().unwrap().accuracy >= 0.99, "{:?}", rep.val_uncalibrated);
    let files = block_on(s.save_adapter()).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let mut again = vit();
    again.load_adapter(std::str::from_utf8(&files[0].1).unwrap(), &files[1].1, Some(std::str::from_utf8(&files[2].1).unwrap())).unwrap();
    let images: Vec<Vec<f32>> = data.iter().take(6).map(|d| d.pixels.clone()).collect();
    assert_eq!(block_on(again.image_logits(&images, 6)).unwrap(), block_on(s.image_logits(&images, 6)).unwrap());
}

#[test]
fn cli_classifies_images_from_a_csv_of_paths() {
    let tmp = std::env::temp_dir().join(format!("webpeft-vit-cli-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("img")).unwrap();
    let mut csv = String::from("image,label\n");
    for i in 0..12 {
        let class = i % 2;
        let rgb: Vec<u8> = (0..16 * 16).flat_map(|p| if class == 0 { [250, (p % 7) as u8, 10] } else { [10, (p % 5) as u8, 250] }).collect();
        let name = format!("img/{i}.png");
        image::RgbImage::from_raw(16, 16, rgb).unwrap().save(tmp.join(&name)).unwrap();
        csv += &format!("{name},{}\n", ["red", "blue"][class]);
    }
    std::fs::write(tmp.join("data.csv"), csv).unwrap();
    let dev = std::env::var("WEBPEFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_webpeft")).args(args).args(["--device", &dev]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (m, out) = (fixture("tiny-vit"), tmp.join("adapter"));
    let data = tmp.join("data.csv");
    // classify with these options and `more` (the output folder, methods, ...).
    let classify = |more: &[&str]| {
        let mut args = vec!["classify", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--target", "q_proj,v_proj", "--r", "4"];
        args.extend(["--epochs", "6", "--batch", "4", "--lr", "3e-2", "--val-split", "0.25"]);
        args.extend(more);
        run(&args)
    };
    let (ok, _, err) = classify(&["--out", out.to_str().unwrap()]);
    assert!(ok && err.contains("epoch 6"), "{err}");
    // The labels `predict` gives the first two images with the adapter in `dir`.
    let predicted = |dir: &std::path::Path| -> Vec<String> {
        let (ok, stdout, err) = run(&[
            "predict",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            dir.to_str().unwrap(),
            "--image",
            tmp.join("img/0.png").to_str().unwrap(),
            "--image",
            tmp.join("img/1.png").to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        stdout.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(predicted(&out), ["red", "blue"]);
    let (ok, _, err) = run(&["predict", "--model", m.to_str().unwrap(), "--adapter", out.to_str().unwrap(), "--image", tmp.join("data.csv").to_str().unwrap()]);
    assert!(!ok && err.contains("image"), "a CSV is not an image: {err}");
    // LoRA vs BitFit from the same start: a folder and a table row each, and a joint report.
    let (cmp, report) = (tmp.join("compare"), tmp.join("report.json"));
    let (ok, stdout, err) = classify(&["--out", cmp.to_str().unwrap(), "--method", "lora", "--method", "bitfit", "--report", report.to_str().unwrap()]);
    assert!(ok && err.contains("[bitfit] epoch 6"), "{err}");
    eprintln!("{stdout}");
    assert!(stdout.lines().next().unwrap().starts_with("method") && stdout.lines().filter(|l| l.starts_with("lora ") || l.starts_with("bitfit ")).count() == 2, "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Head 2x32 + 2; LoRA r 4 on q, v of 2 layers: 4 x (32x4 + 4x32); BitFit: the patch bias
    // (32), per layer q/k/v/o (4x32), fc1 (64), fc2 (32) and two LayerNorms (2x32), the final LayerNorm (32).
    assert_eq!(r["methods"]["lora"]["trainable_parameters"], 66 + 4 * 256);
    assert_eq!(r["methods"]["bitfit"]["trainable_parameters"], 66 + 32 + 2 * (128 + 64 + 32 + 64) + 32);
    for method in ["lora", "bitfit"] {
        assert!(r["methods"][method]["val"]["accuracy"].as_f64().unwrap() >= 0.99, "{method}: {}", r["methods"][method]);
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cmp.join("bitfit/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "SELECTIVE");
    assert_eq!(predicted(&cmp.join("bitfit")), ["red", "blue"], "the BitFit classifier reloaded");
    std::fs::remove_dir_all(&tmp).ok();
}
