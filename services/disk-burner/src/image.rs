//! Images to burn: the manifest (size, BLAKE3, block map) and the bytes, read once and shared.
//!
//! The block map lists the 4 KiB-aligned ranges of the image file that hold data (found with
//! `SEEK_DATA`/`SEEK_HOLE`, as `mkfs.ext4 -d` leaves unused blocks as holes in a sparse file).
//! Only those ranges are written and verified: what a filesystem does not use does not matter,
//! as with bmaptool. Each range carries its own BLAKE3, so a verify names the range that differs.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const BLOCK: u64 = 4096;
pub const MANIFEST_FORMAT: &str = "motorpool.image.v1";

/// One mapped range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
}

/// What an image is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: String,
    /// At most 27 characters of `[A-Za-z0-9._-]` (it names the GPT partition).
    pub id: String,
    pub size: u64,
    /// BLAKE3 of the whole image, holes read as zeros.
    pub blake3: String,
    pub block_size: u64,
    pub ranges: Vec<Range>,
}

impl ImageManifest {
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// True for an id that fits a GPT partition name as `mp:<id>`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 27
        && id != "empty"
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The data extents of a file, rounded out to whole blocks and merged.
pub fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let start = match lseek(file, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            // A file system without SEEK_DATA: everything is data.
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(0, size.div_ceil(BLOCK) * BLOCK)]),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(file, start, Whence::SeekHole).map_err(std::io::Error::from)?;
        let (a, b) = (
            (start as u64) / BLOCK * BLOCK,
            (end as u64).div_ceil(BLOCK) * BLOCK,
        );
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= a => last.1 = last.1.max(b - last.0),
            _ => out.push((a, b - a)),
        }
        pos = end;
    }
    Ok(out)
}

/// An image in memory: the manifest and the mapped bytes, in range order.
#[derive(Debug)]
pub struct Image {
    pub manifest: ImageManifest,
    data: Vec<u8>,
}

impl Image {
    /// Reads an image file once: maps it, hashes it, keeps the mapped bytes.
    pub fn load(path: &Path, id: &str) -> std::io::Result<Image> {
        if !valid_id(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("image id {id:?} must be 1-27 letters, digits, '.', '-' or '_'"),
            ));
        }
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let extents = data_extents(&file, size)?;
        let mut data = Vec::with_capacity(extents.iter().map(|e| e.1 as usize).sum());
        let mut ranges = Vec::new();
        let mut whole = blake3::Hasher::new();
        let mut done = 0u64;
        let zeros = vec![0u8; 1 << 20];
        for (off, len) in extents {
            // Holes hash as zeros.
            let mut gap = off - done;
            while gap > 0 {
                let n = gap.min(zeros.len() as u64) as usize;
                whole.update(&zeros[..n]);
                gap -= n as u64;
            }
            let len = len.min(size.div_ceil(BLOCK) * BLOCK - off);
            let start = data.len();
            data.resize(start + len as usize, 0);
            let readable = len.min(size.saturating_sub(off)) as usize;
            file.read_exact_at(&mut data[start..start + readable], off)?;
            whole.update(&data[start..start + readable]);
            ranges.push(Range {
                offset: off,
                len,
                blake3: blake3::hash(&data[start..]).to_hex().to_string(),
            });
            done = off + readable as u64;
        }
        let mut gap = size - done.min(size);
        while gap > 0 {
            let n = gap.min(zeros.len() as u64) as usize;
            whole.update(&zeros[..n]);
            gap -= n as u64;
        }
        Ok(Image {
            manifest: ImageManifest {
                format: MANIFEST_FORMAT.into(),
                id: id.to_string(),
                size,
                blake3: whole.finalize().to_hex().to_string(),
                block_size: BLOCK,
                ranges,
            },
            data,
        })
    }

    /// The bytes of range `i`.
    pub fn range_bytes(&self, i: usize) -> &[u8] {
        let start: u64 = self.manifest.ranges[..i].iter().map(|r| r.len).sum();
        &self.data[start as usize..(start + self.manifest.ranges[i].len) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_maps_only_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 10_000], 4096).unwrap();
        f.write_all_at(&[9u8; 100], (32 << 20) + 5).unwrap();
        drop(f);
        let img = Image::load(&path, "v1").unwrap();
        let m = &img.manifest;
        assert_eq!(m.size, 64 << 20);
        assert_eq!(m.ranges.len(), 2, "{:?}", m.ranges);
        assert!(m.mapped_bytes() < 1 << 20, "{} mapped", m.mapped_bytes());
        assert_eq!(m.ranges[0].offset % BLOCK, 0);
        assert_eq!(img.range_bytes(0)[4096], 7);
        // The whole-image hash treats holes as zeros.
        assert_eq!(
            m.blake3,
            blake3::hash(&std::fs::read(&path).unwrap())
                .to_hex()
                .to_string()
        );
        assert!(Image::load(&path, "bad/id").is_err());
        assert!(Image::load(&path, "empty").is_err());
    }
}
