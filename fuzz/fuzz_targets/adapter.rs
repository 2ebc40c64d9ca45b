//! A PEFT adapter (adapter_config.json + adapter_model.safetensors; u16 little-endian length
//! of the config first) loaded onto the tiny Llama on Burn's CPU backend, then deleted.
#![no_main]
use std::cell::RefCell;
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
mod common;
use common::split;
use webpeft::device::{DeviceChoice, select};
use webpeft::io::source::ModelFiles;
use webpeft::session::Session;

thread_local! {
    static SESSION: RefCell<Session> = RefCell::new({
        let f = |n: &str, b: &[u8]| (n.to_string(), b.to_vec());
        let files = BTreeMap::from([
            f("config.json", include_bytes!("../../tests/fixtures/tiny-llama/config.json")),
            f("model.safetensors", include_bytes!("../../tests/fixtures/tiny-llama/model.safetensors")),
            f("tokenizer.json", include_bytes!("../../tests/fixtures/tiny-llama/tokenizer.json")),
        ]);
        Session::load(&ModelFiles::from_named(files).expect("fixture"), select(DeviceChoice::Cpu).expect("CPU")).expect("tiny model")
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((config, weights)) = split(data) else { return };
    let Ok(config) = std::str::from_utf8(config) else { return };
    SESSION.with(|s| {
        let mut s = s.borrow_mut();
        if s.load_adapter("fuzz", config, weights).is_ok() {
            s.delete_adapter("fuzz").expect("delete");
        }
    });
});
