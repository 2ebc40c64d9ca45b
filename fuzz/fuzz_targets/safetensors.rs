//! safetensors bytes (a model shard or adapter_model.safetensors): header, offsets, dtypes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = webpeft::io::safetensors::read_all_f32(data);
});
