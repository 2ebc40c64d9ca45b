//! A Hugging Face model folder as the browser hands it over: config.json and
//! model.safetensors from the input (u16 little-endian length of the config first), the
//! tokenizer fixed (the tiny Llama's, or the tiny BERT's when the config says bert); then the
//! whole load onto Burn's CPU backend, as a decoder, or as an encoder or ViT classifier. Sizes in the config that
//! the weights do not back must be refused before anything is allocated.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
mod common;
use common::split;
use webpeft::device::{DeviceChoice, select};
use webpeft::task::{TaskSession, TaskKind};
use webpeft::io::source::ModelFiles;
use webpeft::session::Session;

const TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/tokenizer.json");
const BERT_TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/tiny-bert/tokenizer.json");

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = split(data) else { return };
    let text = std::str::from_utf8(config).unwrap_or("");
    // Encoders and ViTs load as task models (a ViT ignores the tokenizer).
    let bert = webpeft::models::bert::BertConfig::is_bert(text) || webpeft::models::vit::VitConfig::is_vit(text);
    let tokenizer = if bert { BERT_TOKENIZER } else { TOKENIZER };
    let files = BTreeMap::from([("config.json".to_string(), config.to_vec()), ("model.safetensors".to_string(), weights.to_vec()), ("tokenizer.json".to_string(), tokenizer.to_vec())]);
    let Ok(files) = ModelFiles::from_named(files) else { return };
    let cpu = select(DeviceChoice::Cpu).expect("CPU backend");
    if bert {
        let _ = TaskSession::load(&files, cpu, TaskKind::Classification);
    } else {
        let _ = Session::load(&files, cpu);
    }
});
