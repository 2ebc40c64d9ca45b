//! Zip archives of a PEFT adapter folder: one file to download, share or drop on a page.
//! Written stored (f32 tensors barely compress); read stored or deflated. Sizes are checked
//! against a limit before anything is inflated, and the bytes read against what the archive
//! declares, so a hostile archive cannot make the reader allocate more than it claims.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};

use crate::error::{Result, bail, err};

/// The most bytes an adapter archive may unpack to (all files together).
pub const MAX_UNPACKED: u64 = 2 << 30;

/// Whether `bytes` start like a zip archive (a local file header).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// A zip holding `files` in the folder `folder/` (what `unzip -d` or the OS opens as the
/// PEFT folder `PeftModel.from_pretrained` loads).
pub fn zip_folder(folder: &str, files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let zerr = |e: zip::result::ZipError| err!(Io, "writing the zip: {e}");
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    // A fixed time stamp: the same adapter gives the same archive (and wasm has no clock here).
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default())
        .large_file(files.iter().any(|(_, b)| b.len() as u64 >= u32::MAX as u64));
    for (name, bytes) in files {
        w.start_file(format!("{folder}/{name}"), opts).map_err(zerr)?;
        w.write_all(bytes)?;
    }
    Ok(w.finish().map_err(zerr)?.into_inner())
}

/// The files of a zip by their base names (the folder they sit in does not matter; folders,
/// `__MACOSX/` and dot-files are skipped). `what` names the archive in errors.
pub fn unzip(bytes: &[u8], what: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| err!(Format, "{what}: not a readable zip archive: {e}"))?;
    let mut total = 0u64;
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).map_err(|e| err!(Format, "{what}: entry {i}: {e}"))?;
        let path = f.name().map_err(|e| err!(Format, "{what}: entry {i}: {e}"))?.replace('\\', "/");
        let base = path.rsplit('/').next().unwrap_or_default().to_string();
        if f.is_dir() || base.is_empty() || base.starts_with('.') || path.split('/').any(|p| p == "__MACOSX") {
            continue;
        }
        let size = f.size();
        total = total.saturating_add(size);
        if total > MAX_UNPACKED {
            bail!(Format, "{what}: unpacks to more than {} MiB (at {path}): not an adapter", MAX_UNPACKED >> 20);
        }
        if out.contains_key(&base) {
            bail!(Format, "{what}: two files named {base}");
        }
        let mut data = Vec::with_capacity(size as usize);
        // One byte more than declared is read to catch an entry that lies about its size.
        (&mut f).take(size + 1).read_to_end(&mut data).map_err(|e| err!(Format, "{what}: {path}: {e}"))?;
        if data.len() as u64 != size {
            bail!(Format, "{what}: {path}: holds {} bytes but declares {size}", data.len());
        }
        out.insert(base, data);
    }
    Ok(out)
}

/// An adapter's two files from named files: `adapter_config.json` and
/// `adapter_model.safetensors`, given as they are or inside one `.zip` (as [`zip_folder`] writes).
pub fn adapter_files(mut files: BTreeMap<String, Vec<u8>>) -> Result<(String, Vec<u8>)> {
    if files.len() == 1
        && let Some((name, bytes)) = files.iter().next()
        && (name.ends_with(".zip") || is_zip(bytes))
    {
        let name = name.clone();
        files = unzip(&files[&name], &name)?;
    }
    let what = |f: &str| if files.is_empty() { format!("{f} missing") } else { format!("{f} missing (got {})", files.keys().cloned().collect::<Vec<_>>().join(", ")) };
    let cfg = files.get("adapter_config.json").ok_or_else(|| err!(Io, "{}", what("adapter_config.json")))?;
    let cfg = String::from_utf8(cfg.clone()).map_err(|_| err!(Format, "adapter_config.json is not UTF-8"))?;
    let weights = files.get("adapter_model.safetensors").cloned().ok_or_else(|| err!(Io, "{}", what("adapter_model.safetensors")))?;
    Ok((cfg, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_archives() {
        let z = zip_folder("my-adapter", &[("adapter_config.json", b"{}"), ("adapter_model.safetensors", &[7u8; 1000])]).unwrap();
        assert!(is_zip(&z));
        assert_eq!(z, zip_folder("my-adapter", &[("adapter_config.json", b"{}"), ("adapter_model.safetensors", &[7u8; 1000])]).unwrap(), "deterministic");
        let files = unzip(&z, "a.zip").unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["adapter_config.json", "adapter_model.safetensors"]);
        let (cfg, w) = adapter_files(BTreeMap::from([("a.zip".to_string(), z.clone())])).unwrap();
        assert_eq!((cfg.as_str(), w.len()), ("{}", 1000));
        // Truncated anywhere: a Format error, never a panic.
        for cut in [0, 4, 30, z.len() / 2, z.len() - 1] {
            let e = unzip(&z[..cut], "a.zip").unwrap_err();
            assert_eq!(e.code, crate::ErrorCode::Format, "cut {cut}: {e}");
            assert!(e.message.starts_with("a.zip: "), "{e}");
        }
        // An entry whose declared size is bigger than its bytes (the sizes are in the local
        // header and the central directory): refused, whatever it claims.
        let mut lying = z.clone();
        let cd = lying.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
        lying[cd + 24..cd + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unzip(&lying, "a.zip").is_err());
        // No adapter inside.
        let other = zip_folder("x", &[("notes.txt", b"hi")]).unwrap();
        let e = adapter_files(BTreeMap::from([("x.zip".to_string(), other)])).unwrap_err();
        assert!(e.message.contains("adapter_config.json missing (got notes.txt)"), "{e}");
    }
}
