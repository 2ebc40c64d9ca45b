//! Shared by the fuzz targets that take two files in one input.

/// Split an input into two files: a u16 little-endian length, the first file, the second.
pub fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u16::from_le_bytes([*data.first()?, *data.get(1)?]) as usize;
    let rest = &data[2..];
    (n <= rest.len()).then(|| rest.split_at(n))
}
