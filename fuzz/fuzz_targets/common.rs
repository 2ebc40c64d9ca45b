//! Shared by the fuzz targets that take two files in one input.
#![allow(dead_code)]

/// Split an input into two files: a u16 little-endian length, the first file, the second.
pub fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u16::from_le_bytes([*data.first()?, *data.get(1)?]) as usize;
    let rest = &data[2..];
    (n <= rest.len()).then(|| rest.split_at(n))
}

/// Join two files into one input (the inverse of `split`), for seeding corpora.
pub fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = (a.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v
}
