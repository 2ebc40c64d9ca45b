#![cfg(not(target_family = "wasm"))]
//! Sequence classification and sentence embeddings against transformers + peft (fixtures
//! from scripts/fixtures/make_family_fixtures.py). BERT: the forward pass, the pooler, sentence
//! embeddings, a peft SEQ_CLS LoRA with its classifier head, one AdamW step of LoRA + head,
//! a FEATURE_EXTRACTION LoRA and one step of MultipleNegativesRankingLoss, MiniLM's real
//! weights, and a classifier trained end to end on SMS spam. Decoders: tiny-llama as a
//! LlamaForSequenceClassification, with a peft SEQ_CLS LoRA + score head and one step.

mod common;

use std::path::PathBuf;

use common::*;
use webpeft::io::source::ModelFiles;
use webpeft::models::bert::Bert;
use webpeft::models::hooks::NoHook;
use webpeft::peft::lora::LoraConfig;
use webpeft::task::{Backbone, ClassifyOptions, TaskKind, TaskSession};
use webpeft::tensor::{block_on, ints, read};
use webpeft::train::classify::{Labeled, parse_labeled_file};

const TEXTS: [&str; 3] = ["Free entry to win a cash prize, text WIN now!", "Are you coming to dinner tonight?", "the meeting moved to thursday"];

fn session(dir: &str, task: TaskKind) -> TaskSession {
    task_session(dir, task)
}

fn bert(s: &TaskSession) -> &Bert {
    match &s.model {
        Backbone::Bert(m) => m,
        _ => panic!("expected an encoder"),
    }
}

fn load_tiny_lora(s: &mut TaskSession) {
    load_task_adapter(s, "tiny-bert/lora");
}

#[test]
fn tiny_bert_matches_transformers() {
    let fx = load("tiny-bert/expected.safetensors");
    let s = session("tiny-bert", TaskKind::Classification);
    assert_eq!(s.labels, ["ham", "work", "spam"], "id2label of the checkpoint");
    // The tokenizer (WordPiece from tokenizer.json) and padding as `tokenizer(texts, padding=True)`.
    let b = s.encode(&TEXTS, 64).unwrap();
    assert_eq!(b.ids, fx.i64["input_ids"].1);
    assert_eq!(b.mask, fx.i64["attention_mask"].1);
    let hidden = bert(&s).hidden(ints(b.ids.clone(), [b.rows, b.len], &bert(&s).device), Some(&b.mask), &NoHook).unwrap();
    assert_close("tiny-bert last hidden state (padded positions too)", &block_on(read(hidden.clone())).unwrap().data, &fx.f32["hidden"].data, 1e-4);
    assert_close("tiny-bert pooler", &block_on(read(bert(&s).pool(hidden, b.rows, &NoHook).unwrap())).unwrap().data, &fx.f32["pooled"].data, 1e-4);
    assert_close("tiny-bert classifier logits", &flat(block_on(s.logits(&TEXTS, 64, 2)).unwrap()), &fx.f32["logits"].data, 1e-4);
    // A bare BertModel for embeddings: mean pooling over the mask + L2 norm.
    let e = session("tiny-bert", TaskKind::Embedding);
    assert_close("tiny-bert sentence embeddings", &flat(block_on(e.embed(&TEXTS, 64, 3)).unwrap()), &fx.f32["embeddings"].data, 1e-5);
    assert_close("tiny-bert embeddings, one text per batch", &flat(block_on(e.embed(&TEXTS, 64, 1)).unwrap()), &fx.f32["embeddings"].data, 1e-5);
}

#[test]
fn peft_seq_cls_lora_loads_and_round_trips() {
    let fx = load("tiny-bert/expected.safetensors");
    let mut s = session("tiny-bert", TaskKind::Classification);
    load_tiny_lora(&mut s);
    let got = flat(block_on(s.logits(&TEXTS, 64, 3)).unwrap());
    assert_close("tiny-bert + peft SEQ_CLS LoRA (query, value) + classifier", &got, &fx.f32["lora_logits"].data, 1e-4);
    // Saved again, the tensors are peft's, key for key.
    let files = block_on(s.save_adapter()).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors", "webpeft_head.json"]);
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier", "score"]), "peft's own list is kept");
    let ours = webpeft::io::safetensors::read_all_f32(&files[1].1).unwrap();
    let theirs = webpeft::io::safetensors::read_all_f32(&std::fs::read(fixture("tiny-bert/lora/adapter_model.safetensors")).unwrap()).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (k, t) in &theirs {
        assert_eq!(ours[k].shape, t.shape, "{k}");
        assert_eq!(ours[k].data, t.data, "{k}: saved bit for bit");
    }
    // And back: a session that loads our files gives the same logits.
    let mut again = session("tiny-bert", TaskKind::Classification);
    again.load_adapter(std::str::from_utf8(&files[0].1).unwrap(), &files[1].1, Some(std::str::from_utf8(&files[2].1).unwrap())).unwrap();
    assert_eq!(flat(block_on(again.logits(&TEXTS, 64, 3)).unwrap()), got);
}

#[test]
fn one_adamw_step_of_lora_and_head_matches_torch() {
    let want = load("tiny-bert/train.safetensors");
    let hp = json("tiny-bert/train.json");
    let labels = label_ids(&hp);
    let mut s = session("tiny-bert", TaskKind::Classification);
    load_tiny_lora(&mut s);
    let before = block_on(s.trainable_tensors()).unwrap();
    let stats = block_on(s.train_step(&mut trainer_from(&hp), &TEXTS, &labels, None, 64)).unwrap();
    assert_loss("tiny-bert LoRA", stats.loss, &hp, "loss");
    assert_step(&before, &block_on(s.trainable_tensors()).unwrap(), &want);
    // Class weights: torch's cross_entropy(weight=w) divides by the rows' total weight.
    let mut s = session("tiny-bert", TaskKind::Classification);
    load_tiny_lora(&mut s);
    let w: Vec<f32> = hp["class_weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let stats = block_on(s.train_step(&mut trainer_from(&hp), &TEXTS, &labels, Some(&w), 64)).unwrap();
    assert_loss("tiny-bert LoRA, class-weighted", stats.loss, &hp, "weighted_loss");
}

#[test]
fn bitfit_on_bert_matches_torch() {
    // BitFit: every bias (linear layers, LayerNorms, the pooler) and the classifier train.
    let hp = json("tiny-bert/bitfit/train.json");
    let mut s = session("tiny-bert", TaskKind::Classification);
    s.add_bitfit().unwrap();
    let before = block_on(s.trainable_tensors()).unwrap();
    let stats = block_on(s.train_step(&mut trainer_from(&hp), &TEXTS, &label_ids(&hp), None, 64)).unwrap();
    assert_loss("tiny-bert BitFit", stats.loss, &hp, "loss");
    assert_step_moving(&before, &block_on(s.trainable_tensors()).unwrap(), &load("tiny-bert/bitfit/train.safetensors"), not_key_bias);
    let after_step = flat(block_on(s.logits(&TEXTS, 64, 3)).unwrap());
    let want = load("tiny-bert/bitfit/expected.safetensors");
    assert_close("tiny-bert after one BitFit step", &after_step, &want.f32["logits"].data, 1e-4);
    // Saved as a SELECTIVE adapter, state_dict names, the same tensors as the fixture's.
    let files = block_on(s.save_adapter()).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["parameters"].as_str(), cfg["task_type"].as_str()), (Some("SELECTIVE"), Some(r".*\.bias"), Some("SEQ_CLS")));
    let ours = webpeft::io::safetensors::read_all_f32(&files[1].1).unwrap();
    assert_eq!(ours.into_keys().collect::<Vec<_>>(), want_keys("tiny-bert/bitfit/adapter_model.safetensors"));
    // The fixture's adapter (torch's tensors after the step) loads and gives torch's logits.
    let mut other = session("tiny-bert", TaskKind::Classification);
    load_task_adapter(&mut other, "tiny-bert/bitfit");
    assert_close("tiny-bert + torch's BitFit tensors", &flat(block_on(other.logits(&TEXTS, 64, 3)).unwrap()), &want.f32["logits"].data, 1e-4);
    // Ours reloads to the same logits.
    let mut again = session("tiny-bert", TaskKind::Classification);
    again.load_adapter(std::str::from_utf8(&files[0].1).unwrap(), &files[1].1, Some(std::str::from_utf8(&files[2].1).unwrap())).unwrap();
    assert_eq!(flat(block_on(again.logits(&TEXTS, 64, 3)).unwrap()), after_step);
}

fn want_keys(p: &str) -> Vec<String> {
    webpeft::io::safetensors::read_all_f32(&std::fs::read(fixture(p)).unwrap()).unwrap().into_keys().collect()
}

#[test]
fn bert_loaders_refuse_what_they_do_not_support() {
    let cfg = std::fs::read_to_string(fixture("tiny-bert/config.json")).unwrap();
    let refuse = |text: String, words: &[&str]| {
        let e = webpeft::models::bert::BertConfig::from_json(&text).unwrap_err();
        for w in words {
            assert!(e.to_string().contains(w), "{e} should name {w}");
        }
    };
    refuse(cfg.replace("\"gelu\"", "\"relu\""), &["hidden_act", "relu"]);
    refuse(cfg.replace("\"model_type\": \"bert\"", "\"model_type\": \"roberta\""), &["roberta"]);
    refuse(cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 100000"), &["num_hidden_layers"]);
    refuse(cfg.replace("\"is_decoder\": false", "\"is_decoder\": true"), &["is_decoder"]);
    // A LoRA for Llama modules matches nothing of BERT: the error shows BERT's names.
    let mut s = session("tiny-bert", TaskKind::Classification);
    let e = s.add_lora(LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "target_modules": ["q_proj"]})).unwrap(), 0).unwrap_err();
    assert!(e.to_string().contains("bert.encoder.layer.0.attention.self.query"), "{e}");
    // Too many tokens for the positions: refused, not a panic.
    let ids = ints(vec![5; 100], [1, 100], &bert(&s).device);
    assert!(bert(&s).hidden(ids, None, &NoHook).unwrap_err().to_string().contains("max_position_embeddings"));
    // A classifier adapter without its head, and a head of the wrong size.
    let d = fixture("tiny-bert/lora");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    let mut tensors = webpeft::io::safetensors::read_all_f32(&std::fs::read(d.join("adapter_model.safetensors")).unwrap()).unwrap();
    let out = |t: &std::collections::BTreeMap<String, webpeft::io::safetensors::HostTensor>| {
        let m = t.iter().map(|(k, v)| (k.clone(), webpeft::io::safetensors::OutTensor::F32(v.clone()))).collect();
        webpeft::io::safetensors::write(&m, None).unwrap()
    };
    let w = tensors.remove("base_model.model.classifier.weight").unwrap();
    let e = s.load_adapter(&cfg, &out(&tensors), None).unwrap_err();
    assert!(e.to_string().contains("classifier"), "{e}");
    tensors.insert("base_model.model.classifier.weight".into(), webpeft::io::safetensors::HostTensor::new(vec![3, 16], w.data[..48].to_vec()));
    let e = s.load_adapter(&cfg, &out(&tensors), None).unwrap_err();
    assert!(e.to_string().contains("hidden size"), "{e}");
}

fn minilm_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/minilm");
    if p.join("model.safetensors").is_file() {
        Some(p)
    } else if std::env::var("WEBPEFT_REQUIRE_MINILM").is_ok() {
        panic!("MiniLM is required (WEBPEFT_REQUIRE_MINILM) but {} is missing: run scripts/fetch-minilm", p.display());
    } else {
        eprintln!("skipping: {} missing (scripts/fetch-minilm fetches it)", p.display());
        None
    }
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let Some(p) = minilm_path() else { return };
    let fx = load("minilm/expected.safetensors");
    let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(fixture("minilm/texts.json")).unwrap()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let s = TaskSession::load(&ModelFiles::from_path(&p).unwrap(), compute(), TaskKind::Embedding).unwrap();
    let b = s.encode(&texts, 256).unwrap();
    assert_eq!(b.ids, fx.i64["input_ids"].1, "WordPiece ids as the transformers tokenizer");
    assert_eq!(b.mask, fx.i64["attention_mask"].1);
    assert_close("MiniLM sentence embeddings vs sentence-transformers' recipe", &flat(block_on(s.embed(&texts, 256, 3)).unwrap()), &fx.f32["embeddings"].data, 1e-4);
    let hidden = bert(&s).hidden(ints(b.ids.clone(), [b.rows, b.len], &bert(&s).device), Some(&b.mask), &NoHook).unwrap();
    let h = bert(&s).config.hidden_size;
    let cls: Vec<f32> = block_on(read(hidden.clone())).unwrap().data.chunks(h).step_by(b.len).flatten().copied().collect();
    assert_close("MiniLM [CLS] hidden state", &cls, &fx.f32["cls_hidden"].data, 1e-3);
    assert_close("MiniLM pooler", &block_on(read(bert(&s).pool(hidden.clone(), b.rows, &NoHook).unwrap())).unwrap().data, &fx.f32["pooled"].data, 1e-4);
    // Mean pooling itself on these hidden states.
    assert_close("MiniLM mean pooling + L2 norm", &block_on(read(Bert::mean_pool(hidden, &b.mask, b.rows))).unwrap().data, &fx.f32["embeddings"].data, 1e-4);
}

/// SMS spam (data/sms-cls-*.csv from scripts/fetch-data), or None when it is not there.
fn sms() -> Option<(Vec<Labeled>, Vec<Labeled>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let read = |n: &str| -> Option<Vec<Labeled>> {
        let p = dir.join(n);
        p.is_file().then(|| parse_labeled_file(n, &std::fs::read_to_string(&p).unwrap()).unwrap())
    };
    match (read("sms-cls-train.csv"), read("sms-cls-eval.csv")) {
        (Some(t), Some(e)) => Some((t, e)),
        _ if std::env::var("WEBPEFT_REQUIRE_MINILM").is_ok() => panic!("data/sms-cls-*.csv missing: run scripts/fetch-data"),
        _ => None,
    }
}

#[test]
fn minilm_lora_spam_classifier_end_to_end() {
    let (Some(p), Some((train, eval))) = (minilm_path(), sms()) else { return };
    let mut s = TaskSession::load(&ModelFiles::from_path(&p).unwrap(), compute(), TaskKind::Classification).unwrap();
    let config = LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]})).unwrap();
    s.add_lora(config, 0).unwrap();
    let train: Vec<Labeled> = train.into_iter().take(160).collect();
    let o = ClassifyOptions { epochs: 2, batch: 16, seq_len: 64, lr: 2e-3, val_fraction: 0.2, class_weights: true, ..Default::default() };
    let rep = block_on(s.train_classifier(&train, &o, |e| {
        eprintln!("epoch {}: train loss {:.4}, val {:?}, {:.1} s", e.epoch, e.train_loss, e.val.as_ref().map(|m| (m.loss, m.accuracy, m.macro_f1)), e.seconds);
        true
    }))
    .unwrap();
    assert_eq!(rep.labels, ["ham", "spam"]);
    assert_eq!(rep.val_examples, 32, "20% of each class");
    let first = rep.epochs[0].train_loss;
    let last = rep.epochs.last().unwrap().val.as_ref().unwrap();
    eprintln!("temperature {:.3}; validation ECE {:.4} -> {:.4}", rep.temperature, rep.val_uncalibrated.as_ref().unwrap().ece, rep.val_calibrated.as_ref().unwrap().ece);
    assert!(last.loss < first, "validation loss {} below the first epoch's training loss {first}", last.loss);
    assert!(rep.val_calibrated.as_ref().unwrap().loss <= rep.val_uncalibrated.as_ref().unwrap().loss + 1e-9, "temperature scaling does not raise the NLL it minimises");
    // Held-out accuracy on 100 messages (50 ham / 50 spam) the run never saw.
    let texts: Vec<&str> = eval.iter().map(|r| r.text.as_str()).collect();
    let ids = webpeft::train::classify::ids_of(&eval, &s.labels).unwrap();
    let logits = block_on(s.logits(&texts, 64, 25)).unwrap();
    let m = webpeft::train::classify::metrics(&logits, &ids, s.temperature);
    eprintln!("held-out SMS: accuracy {:.3}, macro F1 {:.3}, confusion {:?}", m.accuracy, m.macro_f1, m.confusion);
    assert!(m.accuracy >= 0.85, "held-out accuracy {}", m.accuracy);
    // Saved and loaded again: the same predictions.
    let files = block_on(s.save_adapter()).unwrap();
    let mut again = TaskSession::load(&ModelFiles::from_path(&p).unwrap(), compute(), TaskKind::Classification).unwrap();
    again.load_adapter(std::str::from_utf8(&files[0].1).unwrap(), &files[1].1, Some(std::str::from_utf8(&files[2].1).unwrap())).unwrap();
    assert_eq!(again.labels, s.labels);
    assert_eq!(again.temperature, s.temperature);
    assert_eq!(block_on(again.logits(&texts[..10], 64, 10)).unwrap(), logits[..10].to_vec());
}

#[test]
fn feature_extraction_lora_and_one_mnrl_step_match_torch() {
    let mut s = session("tiny-bert", TaskKind::Embedding);
    load_task_adapter(&mut s, "tiny-bert/embed");
    let hp = json("tiny-bert/embed-train.json");
    let pairs: Vec<(String, String)> = hp["pairs"].as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string())).collect();
    let anchors: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    // The FEATURE_EXTRACTION LoRA under BertModel's names (no `bert.` prefix).
    assert_close(
        "tiny-bert + peft FEATURE_EXTRACTION LoRA embeddings",
        &flat(block_on(s.embed(&anchors, 64, 3)).unwrap()),
        &load("tiny-bert/embed/expected.safetensors").f32["embeddings"].data,
        1e-5,
    );
    let before = block_on(s.trainable_tensors()).unwrap();
    let refs: Vec<(&str, &str)> = pairs.iter().map(|p| (p.0.as_str(), p.1.as_str())).collect();
    let st = block_on(s.embedding_step(&mut trainer_from(&hp), &refs, hp["scale"].as_f64().unwrap(), 64)).unwrap();
    let d = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    eprintln!("MNRL loss {} vs torch {}: |d| = {d:.2e}", st.loss, hp["loss"]);
    assert!(d < 1e-5);
    assert_step(&before, &block_on(s.trainable_tensors()).unwrap(), &load("tiny-bert/embed-train.safetensors"));
    // Saved as a FEATURE_EXTRACTION adapter without a head file.
    let files = block_on(s.save_adapter()).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&files[0].1).unwrap()["task_type"], "FEATURE_EXTRACTION");
    // A classifier adapter is refused by an embedding session, and tuning needs an embedding session.
    let mut e = session("tiny-bert", TaskKind::Embedding);
    let cfg = std::fs::read_to_string(fixture("tiny-bert/lora/adapter_config.json")).unwrap();
    assert!(e.load_adapter(&cfg, &std::fs::read(fixture("tiny-bert/lora/adapter_model.safetensors")).unwrap(), None).is_err());
    let mut c = session("tiny-bert", TaskKind::Classification);
    load_tiny_lora(&mut c);
    assert!(block_on(c.embedding_step(&mut trainer_from(&hp), &refs, 20.0, 64)).unwrap_err().to_string().contains("embeddings"));
}

#[test]
fn embedding_training_pulls_pairs_together() {
    let mut s = session("tiny-bert", TaskKind::Embedding);
    s.add_lora(LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})).unwrap(), 0).unwrap();
    let pairs: Vec<webpeft::train::contrastive::Pair> =
        [("free cash prize", "text win now"), ("dinner tonight", "are you coming to dinner"), ("meeting moved", "thursday morning report"), ("love you", "pick up some milk")]
            .iter()
            .map(|(a, p)| webpeft::train::contrastive::Pair { anchor: a.to_string(), positive: p.to_string() })
            .collect();
    let o = ClassifyOptions { epochs: 15, batch: 4, lr: 2e-2, schedule: webpeft::train::Schedule::Constant, ..Default::default() };
    let steps = block_on(s.train_embeddings(&pairs, &o, |_| true)).unwrap();
    let (first, last) = (steps[0].loss, steps.last().unwrap().loss);
    eprintln!("MNRL over {} steps: {first:.4} -> {last:.4}", steps.len());
    assert_eq!(steps.len(), 15);
    assert!(last < first * 0.5, "{first} -> {last}");
    // Each anchor's nearest positive is its own.
    let a = block_on(s.embed(&pairs.iter().map(|p| p.anchor.as_str()).collect::<Vec<_>>(), 64, 4)).unwrap();
    let p = block_on(s.embed(&pairs.iter().map(|p| p.positive.as_str()).collect::<Vec<_>>(), 64, 4)).unwrap();
    for (i, ai) in a.iter().enumerate() {
        let sims: Vec<f32> = p.iter().map(|pj| ai.iter().zip(pj).map(|(x, y)| x * y).sum()).collect();
        let best = sims.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
        assert_eq!(best, i, "anchor {i}: similarities {sims:?}");
    }
}

#[test]
fn decoder_classifier_matches_transformers_and_peft() {
    let fx = load("tiny-llama-cls/expected.safetensors");
    let mut s = session("tiny-llama-cls", TaskKind::Classification);
    assert!(matches!(s.model, Backbone::Decoder(_)));
    assert_eq!(s.labels, ["ham", "work", "spam"]);
    let b = s.encode(&TEXTS, 64).unwrap();
    assert_eq!(b.ids, fx.i64["input_ids"].1, "right-padded with pad_token_id");
    // The score head on each row's last non-padding token, as LlamaForSequenceClassification.
    assert_close("tiny LlamaForSequenceClassification logits", &flat(block_on(s.logits(&TEXTS, 64, 3)).unwrap()), &fx.f32["logits"].data, 1e-4);
    assert_close("the same one text per batch (no padding)", &flat(block_on(s.logits(&TEXTS, 64, 1)).unwrap()), &fx.f32["logits"].data, 1e-4);
    load_task_adapter(&mut s, "tiny-llama-cls/lora");
    assert_close("+ peft SEQ_CLS LoRA (q_proj, v_proj) + score", &flat(block_on(s.logits(&TEXTS, 64, 3)).unwrap()), &fx.f32["lora_logits"].data, 1e-4);
    let hp = json("tiny-llama-cls/train.json");
    let labels: Vec<usize> = hp["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let before = block_on(s.trainable_tensors()).unwrap();
    let st = block_on(s.train_step(&mut trainer_from(&hp), &TEXTS, &labels, None, 64)).unwrap();
    let d = (st.loss as f64 - hp["loss"].as_f64().unwrap()).abs();
    eprintln!("decoder classifier loss {} vs torch {}: |d| = {d:.2e}", st.loss, hp["loss"]);
    assert!(d < 1e-5);
    assert_step(&before, &block_on(s.trainable_tensors()).unwrap(), &load("tiny-llama-cls/train.safetensors"));
    let files = block_on(s.save_adapter()).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier", "score"]), "peft's own list is kept");
    // A new classifier on a causal-LM checkpoint: a fresh `score` (no bias), saved under peft's name.
    let mut n = session("tiny-llama", TaskKind::Classification);
    assert!(n.head.is_none());
    n.add_lora(LoraConfig::from_value(&serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})).unwrap(), 0).unwrap();
    let rows: Vec<Labeled> = (0..12).map(|i| Labeled { text: TEXTS[i % 3].to_string(), label: ["a", "b", "c"][i % 3].to_string() }).collect();
    let o = ClassifyOptions { epochs: 5, batch: 6, lr: 5e-2, val_fraction: 0.25, ..Default::default() };
    let rep = block_on(n.train_classifier(&rows, &o, |_| true)).unwrap();
    assert!(rep.epochs.last().unwrap().train_loss < rep.epochs[0].train_loss, "{:?}", rep.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>());
    let saved = webpeft::io::safetensors::read_all_f32(&block_on(n.save_adapter()).unwrap()[1].1).unwrap();
    assert_eq!(saved["base_model.model.score.weight"].shape, [3, 64]);
    assert!(!saved.contains_key("base_model.model.score.bias"));
    // Decoders give no sentence embeddings.
    let e = TaskSession::load(&ModelFiles::from_path(&fixture("tiny-llama")).unwrap(), compute(), TaskKind::Embedding).err().unwrap();
    assert!(e.to_string().contains("encoder"), "{e}");
}
