//! A Hugging Face model folder as the browser hands it over: config.json and
//! model.safetensors from the input (u16 little-endian length of the config first), the
//! tokenizer fixed; then the whole load onto Burn's CPU backend. Sizes in the config that
//! the weights do not back must be refused before anything is allocated.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
mod common;
use common::split;
use webpeft::device::{DeviceChoice, select};
use webpeft::io::source::ModelFiles;
use webpeft::session::Session;

const TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/tokenizer.json");

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = split(data) else { return };
    let files = BTreeMap::from([("config.json".to_string(), config.to_vec()), ("model.safetensors".to_string(), weights.to_vec()), ("tokenizer.json".to_string(), TOKENIZER.to_vec())]);
    let Ok(files) = ModelFiles::from_named(files) else { return };
    let _ = Session::load(&files, select(DeviceChoice::Cpu).expect("CPU backend"));
});
