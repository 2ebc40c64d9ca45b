//! A training data file: plain text, JSONL or CSV/TSV (the first byte picks the name), read
//! as language-model examples and as labelled classification rows.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let name = ["data.txt", "data.jsonl", "data.csv", "data.tsv", "data"][kind as usize % 5];
    let _ = webpeft::train::data::parse_data_file(name, text);
    if let Ok(rows) = webpeft::train::classify::parse_labeled_file(name, text) {
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        let _ = webpeft::train::classify::label_ids(&labels, &[]);
    }
});
