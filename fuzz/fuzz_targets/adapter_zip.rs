//! An adapter given as one .zip (what `loadAdapter({"x.zip": bytes})` and the app's import
//! read): unpacked with its sizes checked, then the two PEFT files picked out. Any input must
//! give files or a typed error, never a panic or an allocation beyond what the archive holds.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(files) = webpeft::io::archive::unzip(data, "a.zip") {
        assert!(files.values().map(|f| f.len() as u64).sum::<u64>() <= webpeft::io::archive::MAX_UNPACKED);
    }
    let _ = webpeft::io::archive::adapter_files(BTreeMap::from([("a.zip".to_string(), data.to_vec())]));
});
